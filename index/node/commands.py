"""``cxr-search node`` (the DICOM node) and ``cxr-search index import-dicomweb`` (pull from a PACS).

Both keep an index current from the PACS through the node folder of the index (see
:mod:`index.node.inbox`); ``cli.py`` mounts them.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any, List, Optional

import typer

from cxr_search.fileio import emit_json
from cxr_search.terminal import err_console as console

_MODEL_HELP = "Model: released CXR-CLIP file, our model directory, or preset (the index's model)."
_DB_HELP = "Store URL (SQLAlchemy); default: INDEX_DIR/store.sqlite or $CXR_SEARCH_DB_URL."


# The node's options, shared by `cxr-search node` and `cxr-search serve --node-port` (same names, same meaning).
AE_TITLE_OPTION = typer.Option("CXRSEARCH", "--ae-title", help="The node's AE title (the PACS sends to it).")
ALLOW_OPTION = typer.Option([], "--allow", help="AE_TITLE@HOST allowed to send (repeatable); others are rejected at "
                            "association.")
ALLOW_ANY_OPTION = typer.Option(False, "--allow-any", help="Accept any caller on a non-loopback address.")
QUIET_OPTION = typer.Option(10.0, "--quiet", min=0.0, help="Seconds without a new instance after which a study is "
                            "indexed.")
HL7_PORT_OPTION = typer.Option(None, "--hl7-port", min=0, max=65535, help="Also receive HL7 ORU^R01 reports over "
                               "MLLP on this port.")
HL7_ALLOW_OPTION = typer.Option([], "--hl7-allow", help="Address allowed to send HL7 (repeatable).")


def _load(model: str, tokenizer: Optional[Path]) -> Any:
    from cxr_search.checkpoints import load_model

    return load_model(model, tokenizer=tokenizer, require_tokenizer=True)


def node(
    index: Path = typer.Argument(..., help="Index folder (created, empty, when missing)."),
    model: str = typer.Option(..., "--model", "-m", help=_MODEL_HELP),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer directory (released files)."),
    ae_title: str = AE_TITLE_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; the hospital network's address to "
                             "receive from the PACS (then --allow is required)."),
    port: int = typer.Option(11112, "--port", min=0, max=65535, help="DICOM port."),
    allow: List[str] = ALLOW_OPTION,
    allow_any: bool = ALLOW_ANY_OPTION,
    quiet: float = QUIET_OPTION,
    hl7_port: Optional[int] = HL7_PORT_OPTION,
    hl7_allow: List[str] = HL7_ALLOW_OPTION,
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per embedding batch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16, fp16 (GPU) or auto."),
    all_body_parts: bool = typer.Option(False, "--all-body-parts", help="Keep CR/DX images whatever "
                                        "BodyPartExamined says."),
    db: Optional[str] = typer.Option(None, "--db", help=_DB_HELP),
) -> None:
    """Receive studies from the PACS (DICOM C-STORE) and reports (SR, HL7) and index them as they come.

    Example: cxr-search node /indices/chest -m models/r50_mcc --host 10.1.2.3 --port 11112 --allow PACS@10.1.2.9
    """
    from index.build import BuildOptions
    from index.node.runtime import Node, node_config
    from index.node.worker import WorkerOptions

    config = node_config(ae_title, host, port, allow)
    opts = WorkerOptions(quiet_s=quiet, build=BuildOptions(batch_size=batch_size, device=device, precision=precision,
                                                           body_part_filter=not all_body_parts, db_url=db))
    m = _load(model, tokenizer)
    n = Node(index, m, config, opts, hl7_port=hl7_port, hl7_allowed=frozenset(hl7_allow), allow_any=allow_any)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    n.start()
    console.print(n.describe())
    try:
        while not stop.wait(1.0):
            pass
    finally:
        console.print("node stopping (the inbox is on disk: a restart finishes it)")
        n.stop()


def import_dicomweb(
    url: str = typer.Argument(..., help="DICOMweb base URL, e.g. http://pacs:8042/dicom-web/"),
    out: Path = typer.Option(..., "--index", "-i", "--out", "-o", help="Index folder (created, empty, when missing)."),
    model: str = typer.Option(..., "--model", "-m", help=_MODEL_HELP),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer directory (released files)."),
    since: Optional[str] = typer.Option(None, "--since", help="Only studies from this date on (YYYY-MM-DD)."),
    modality: str = typer.Option("CR,DX", "--modality", help="Modalities in study to look for (comma separated)."),
    auth: Optional[str] = typer.Option(None, "--auth", help="basic or bearer; the secret is read from "
                                       "$CXR_SEARCH_DICOMWEB_PASSWORD (with --user) or $CXR_SEARCH_DICOMWEB_TOKEN."),
    user: Optional[str] = typer.Option(None, "--user", help="User name of --auth basic."),
    page_size: int = typer.Option(100, "--page-size", min=1, help="Studies per QIDO-RS page."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per embedding batch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
    all_body_parts: bool = typer.Option(False, "--all-body-parts", help="Keep CR/DX images whatever "
                                        "BodyPartExamined says."),
    db: Optional[str] = typer.Option(None, "--db", help=_DB_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
) -> None:
    """Old name of index add --dicomweb: import the new radiographs (and SR) of a PACS over DICOMweb.

    Example: cxr-search index import-dicomweb http://pacs:8042/dicom-web/ -i /indices/chest -m models/r50_mcc --since 2026-11-01
    """
    run_dicomweb(url, out, model, tokenizer, since=since, modality=modality, auth=auth, user=user, page_size=page_size,
                 batch_size=batch_size, device=device, all_body_parts=all_body_parts, db=db, json_out=json_out)


def run_dicomweb(url: str, out: Path, model: Any, tokenizer: Optional[Path], *, since: Optional[str], modality: str,
                 auth: Optional[str], user: Optional[str], page_size: int, batch_size: int, device: str,
                 all_body_parts: bool, db: Optional[str], json_out: bool) -> None:
    """Import over DICOMweb into ``out`` and print the summary (``index add/build --dicomweb`` and the old
    ``index import-dicomweb``).

    Args:
        model: A model reference (loaded here, after the options are checked) or a loaded model.
    """
    from index.build import BuildOptions
    from index.node.dicomweb import ImportOptions, make_session
    from index.node.dicomweb import import_dicomweb as run_import

    session = make_session(auth, user)
    opts = ImportOptions(since=since, modalities=[m.strip().upper() for m in modality.split(",") if m.strip()],
                         page_size=page_size,
                         build=BuildOptions(batch_size=batch_size, device=device, db_url=db,
                                            body_part_filter=not all_body_parts))
    loaded = _load(model, tokenizer) if isinstance(model, str) else model
    summary = run_import(url, out, loaded, opts, session=session, progress=not json_out)
    if json_out:
        emit_json(summary)
        return
    f = summary["fetch"]
    console.print(f"{f['studies']} studies found, {f['instances_found']} instances; fetched {f['fetched']} new, "
                  f"{f['known']} already here, {f['not_wanted']} of other SOP classes, {f['failed']} failed")
    t = summary["totals"]
    console.print(f"index {out}: {t['images']} images, {t['studies']} studies, {t['sections']} report sections, "
                  f"{t['failed']} files not indexed")


__all__ = ["import_dicomweb", "node", "run_dicomweb"]
