"""``cxr-search index ...``: the Typer sub-app that builds, extends, checks and inspects an index (mounted by ``cli.py``).

Every command names the index with ``--index/-i`` (``remove``, ``verify``, ``stats`` and ``failures`` also
take it as their first argument; ``build``/``add`` still accept the old ``--out/-o``). Options are checked
before a model is loaded (exit code 2), writers take the index's writer lock before anything heavy
(exit code 7 at once when another writer holds it, or ``--wait SECONDS``). Tables go to stdout, messages
to stderr, and ``--json`` prints one JSON document on stdout instead of the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import typer
from rich.table import Table

from cxr_search.cli_options import (
    DB_HELP,
    DEVICE_HELP,
    INDEX_HELP,
    JSON_HELP,
    MODEL_HELP,
    TOKENIZER_HELP,
    check_device,
    check_precision,
)
from cxr_search.errors import ConfigError, DatasetError, SearchIndexError
from cxr_search.fileio import emit_json
from cxr_search.terminal import err_console as console
from cxr_search.terminal import out_console, styled

index_app = typer.Typer(help="Build, extend, check and inspect a search index.", no_args_is_help=True)

_INDEX_ARG_HELP = "Index folder (or give it with --index)."
_WAIT_HELP = ("Seconds to wait when another writer (build, add, remove) holds the index; by default exit at once "
              "with code 7, naming it.")
_MAX_WAIT_S = 7 * 24 * 3600.0


def _load(model: str, tokenizer: Optional[Path], *, need_text: bool) -> Any:
    from cxr_search.checkpoints import load_model

    return load_model(model, tokenizer=tokenizer, require_tokenizer=need_text)


def _table(title: str, *columns: str, right: tuple = ()) -> Table:
    """A table whose cells wrap (never cut) at the terminal width: identifiers stay whole, on several lines."""
    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col, overflow="fold", no_wrap=False, justify="right" if col in right else "left")
    return t


def index_folder(positional: Optional[Path], option: Optional[Path], *, usage: str) -> Path:
    """The index folder from the positional argument or ``--index`` (the same one when both are given).

    Raises:
        ConfigError: Neither, or two different folders.
    """
    if positional is not None and option is not None and Path(positional) != Path(option):
        raise ConfigError(f"two index folders given ({positional} and --index {option}); give one")
    chosen = positional if positional is not None else option
    if chosen is None:
        raise ConfigError(f"give the index folder, e.g. {usage}")
    return Path(chosen)


def parse_shard(text: str) -> tuple:
    """``"K/N"`` (1 <= K <= N) to the 0-based ``(K - 1, N)``.

    Raises:
        ConfigError: Malformed or out of range.
    """
    try:
        k, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: write K/N, e.g. --shard 2/4 for the second of four shards") from None
    if not 1 <= k <= n:
        raise ConfigError(f"--shard {text!r}: K must be between 1 and N")
    return (k - 1, n)


# ---------------------------------------------------------------------------------------------- build / add
def _check_executor(executor: str, shard: Optional[tuple], ray_address: Optional[str], gpus: float) -> None:
    """The executor options, checked without importing torch or Ray (``index.build.check_executor`` checks
    them again for library callers).

    Raises:
        ConfigError: Unknown executor, options that do not fit together, or Ray not installed.
    """
    import importlib.util

    if executor not in ("local", "ray"):
        raise ConfigError(f"--executor {executor!r}: use local or ray")
    if executor == "local" and (ray_address or gpus):
        raise ConfigError("--ray-address and --num-gpus-per-worker are options of --executor ray")
    if executor == "ray" and shard is not None:
        raise ConfigError("--shard K/N and --executor ray: Ray splits the work over its workers itself; "
                          "use one or the other")
    if executor == "ray" and (importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.data") is None):
        raise ConfigError("--executor ray needs Ray with Ray Data: pip install 'cxr-search[ray]'")


def _build(command: str, archive: Path, model: Optional[str], tokenizer: Optional[Path], reports: Optional[Path],
           index: Path, batch_size: int, workers: int, device: str, precision: str, factory: Optional[str],
           bytes_per_vector: Optional[float], all_body_parts: bool, db: Optional[str], json_out: bool,
           shard: Optional[str], catalogue_only: bool, wait: float, executor: str = "local",
           ray_address: Optional[str] = None, gpus_per_worker: float = 0.0) -> None:
    from index.layout import META_FILE, build_lock, writer_target

    # Everything cheap first: a bad option or a missing file ends here, before the model loads.
    parsed = parse_shard(shard) if shard else None
    if parsed and catalogue_only:
        raise ConfigError("--shard and --catalogue-only are two steps: catalogue once, then run the shards")
    check_device(device)
    check_precision(precision)
    _check_executor(executor, parsed, ray_address, gpus_per_worker)
    if not archive.expanduser().exists():
        raise DatasetError(f"{archive}: no such folder or manifest; give a PACS export folder or a manifest CSV")
    if reports is not None and not reports.expanduser().is_file():
        raise DatasetError(f"{reports}: reports CSV not found; give the RIS export file")
    if model is None and command == "build" and not (index.expanduser() / META_FILE).is_file():
        raise ConfigError(f"--model is required to build a new index ({index} holds none yet)")
    root = writer_target(index, command, shard=parsed is not None)
    # The lock before torch, FAISS and the model load: a second writer is told in a fraction of a second.
    with build_lock(root, command, shard=parsed is not None, wait=wait, say=console.print):
        from index.build import BuildOptions, build, check_executor
        from index.model_ref import resolve_model

        opts = BuildOptions(reports_csv=reports, batch_size=batch_size, num_workers=workers, device=device,
                            precision=precision, factory=factory, bytes_per_vector=bytes_per_vector,
                            body_part_filter=not all_body_parts, db_url=db, progress=not json_out, shard=parsed,
                            catalogue_only=catalogue_only, lock_wait=wait, say=console.print,
                            executor=executor, ray_address=ray_address, ray_workers=max(1, workers),
                            gpus_per_worker=gpus_per_worker)
        check_executor(opts)  # before the model loads: a bad value or a missing Ray is exit code 2 at once
        m = _load(model if model else resolve_model(root, None), tokenizer, need_text=True)
        summary = build(archive, root, m, opts, command=command)
    if json_out:
        emit_json(summary)
        return
    t = _table(f"index {command}: {root}", "", "images", "studies", "sections", "failed",
               right=("images", "studies", "sections", "failed"))
    for row in ("totals", "added"):
        t.add_row(row, *(str(summary[row][k]) for k in ("images", "studies", "sections", "failed")))
    out_console.print(t)
    for kind, f in summary["faiss"].items():
        recall = f.get("recall_at_10")
        console.print(f"{kind}: {f.get('n')} vectors, {f.get('factory')}"
                      + (f", recall@10 vs exact {recall:.3f}" if isinstance(recall, float) else ""))
    if summary["shard"]:
        console.print(f"shard {summary['shard']} done; when every shard is done, run the same command without "
                      "--shard to embed any leftovers and write the FAISS files")
    elif catalogue_only:
        console.print("catalogued; now embed with --shard K/N on each worker (same --index and --db), then once without")
    cat = summary["catalogue"] or {}
    if cat:  # the intake's accounting: every input in exactly one outcome
        console.print(f"{cat['files_seen']} inputs: " + ", ".join(
            f"{cat[k]} {k.replace('_', ' ')}" for k in ("already_catalogued", "indexed", "reports", "failures",
                                                        "skipped", "duplicates", "skipped_by_request") if cat.get(k)))
    if cat.get("skipped_reasons"):
        console.print("skipped: " + ", ".join(f"{k} ({v})" for k, v in sorted(cat["skipped_reasons"].items())))
    reasons = cat.get("failure_reasons", {})
    if reasons:
        console.print("not indexed: " + ", ".join(f"{k} ({v})" for k, v in sorted(reasons.items()))
                      + f"; list them with: cxr-search index failures {root}")


def _from_dicomweb(command: str, url: str, archive: Optional[Path], folder: Path, model: Optional[str],
                   tokenizer: Optional[Path], *, local_only: Dict[str, bool], **options: Any) -> None:
    """``index build/add --dicomweb URL``: the options checked, then the import (index/node/dicomweb.py)."""
    from index.layout import META_FILE
    from index.model_ref import resolve_model
    from index.node.commands import run_dicomweb

    if archive is not None:
        raise ConfigError(f"give either an archive ({archive}) or --dicomweb {url}, not both")
    refused = [name for name, given in local_only.items() if given]
    if refused:
        raise ConfigError(f"{', '.join(refused)}: not with --dicomweb (reports come as SR from the PACS; the import "
                          "embeds in this process)")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--dicomweb {url!r}: give the DICOMweb base URL, e.g. http://pacs:8042/dicom-web/")
    check_device(options["device"])
    exists = (folder.expanduser() / META_FILE).is_file()
    if command == "add" and not exists:
        raise SearchIndexError(f"{folder}: no index to add to; create it with cxr-search index build --dicomweb URL "
                               f"-m MODEL -i {folder}")
    if model is None and not exists:
        raise ConfigError(f"--model is required to build a new index ({folder} holds none yet)")
    run_dicomweb(url, folder, model or resolve_model(folder.expanduser(), None), tokenizer, **options)


def _build_command(command: str, doc: str) -> None:
    @index_app.command(command, help=doc)
    def _cmd(
        archive: Optional[Path] = typer.Argument(None, help="PACS export folder or manifest CSV (cxr-search data "
                                                 "prepare); none with --dicomweb.", show_default=False,
                                                 metavar="ARCHIVE"),
        index: Optional[Path] = typer.Option(None, "--index", "-i", help=INDEX_HELP),
        out: Optional[Path] = typer.Option(None, "--out", "-o", hidden=True, help="Old name of --index."),
        model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP + " Default: the index's own "
                                            "(required for a new index)."),
        tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP),
        reports: Optional[Path] = typer.Option(None, "--reports", help="RIS reports CSV (accession / StudyInstanceUID)."),
        batch_size: int = typer.Option(32, "--batch-size", min=1, max=65536, help="Images per forward pass."),
        workers: int = typer.Option(0, "--workers", min=0, max=512, help="Decoding worker processes (local "
                                    "executor); with --executor ray, embedding actors, each holding one model "
                                    "copy (0 means 1)."),
        device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
        precision: str = typer.Option("fp32", "--precision", help="fp32, bf16, fp16 (GPU) or auto."),
        factory: Optional[str] = typer.Option(None, "--factory", help="FAISS factory string (default: chosen by size)."),
        bytes_per_vector: Optional[float] = typer.Option(None, "--bytes-per-vector", min=1.0, max=1e6,
                                                         help="Memory budget per vector for the automatic choice."),
        all_body_parts: bool = typer.Option(False, "--all-body-parts", help="Keep CR/DX images whatever BodyPartExamined says."),
        db: Optional[str] = typer.Option(None, "--db", help=DB_HELP),
        json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
        shard: Optional[str] = typer.Option(None, "--shard", help="K/N: embed only shard K of N (after --catalogue-only; "
                                            "processes sharing the store split the work)."),
        catalogue_only: bool = typer.Option(False, "--catalogue-only", help="Read headers and reports into the "
                                            "store only (first step of a sharded build)."),
        wait: float = typer.Option(0.0, "--wait", min=0.0, max=_MAX_WAIT_S, help=_WAIT_HELP),
        executor: str = typer.Option("local", "--executor", help="Where images and report sections are embedded: "
                                     "local (this process) or ray (a Ray cluster: decoding tasks and a pool of "
                                     "model actors; pip install 'cxr-search[ray]'). Same store, same results."),
        ray_address: Optional[str] = typer.Option(None, "--ray-address", help="With --executor ray: the cluster "
                                                  "(auto: the running one, or HOST:PORT); default: a local "
                                                  "cluster started for this run."),
        gpus_per_worker: float = typer.Option(0.0, "--num-gpus-per-worker", min=0.0, max=64.0,
                                              help="With --executor ray: GPUs per embedding actor (0: CPU "
                                              "actors; 0.5: two actors share a GPU)."),
        dicomweb: Optional[str] = typer.Option(None, "--dicomweb", help="Import from a PACS over DICOMweb instead "
                                               "of a folder: its base URL (QIDO-RS finds the studies, WADO-RS fetches "
                                               "new instances; a rerun resumes)."),
        since: Optional[str] = typer.Option(None, "--since", help="With --dicomweb: only studies from this date on "
                                            "(YYYY-MM-DD)."),
        modality: str = typer.Option("CR,DX", "--modality", help="With --dicomweb: modalities in study to look for "
                                     "(comma separated)."),
        auth: Optional[str] = typer.Option(None, "--auth", help="With --dicomweb: basic or bearer; the secret is read "
                                           "from $CXR_SEARCH_DICOMWEB_PASSWORD (with --user) or "
                                           "$CXR_SEARCH_DICOMWEB_TOKEN."),
        user: Optional[str] = typer.Option(None, "--user", help="With --dicomweb: user name of --auth basic."),
        page_size: int = typer.Option(100, "--page-size", min=1, max=10000, help="With --dicomweb: studies per "
                                      "QIDO-RS page."),
    ) -> None:
        if index is not None and out is not None and index != out:
            raise ConfigError(f"--index {index} and --out {out}: give the index folder once (--index)")
        folder = index if index is not None else out
        if folder is None:
            raise ConfigError(f"give the index folder with --index, e.g. cxr-search index {command} ARCHIVE -i /indices/chest")
        if dicomweb is not None:
            _from_dicomweb(command, dicomweb, archive, folder, model, tokenizer, since=since, modality=modality,
                           auth=auth, user=user, page_size=page_size, batch_size=batch_size, device=device,
                           all_body_parts=all_body_parts, db=db, json_out=json_out,
                           local_only={"--reports": reports is not None, "--shard": shard is not None,
                                       "--catalogue-only": catalogue_only, "--executor ray": executor != "local"})
            return
        if since is not None or auth is not None or user is not None:
            raise ConfigError("--since, --auth and --user go with --dicomweb URL")
        if archive is None:
            raise ConfigError(f"give the archive: cxr-search index {command} ARCHIVE -i {folder} (a PACS export folder "
                              "or a manifest CSV), or --dicomweb URL")
        _build(command, archive, model, tokenizer, reports, folder, batch_size, workers, device, precision, factory,
               bytes_per_vector, all_body_parts, db, json_out, shard, catalogue_only, wait, executor, ray_address,
               gpus_per_worker)


# Typer keeps the line breaks of a help text: one paragraph per line.
_build_command("build", """Index an archive (resumes an interrupted build: run the same command again).

Example: cxr-search index build /pacs/export --reports /pacs/ris.csv -m models/r50_mcc -i /indices/chest
""")
_build_command("add", """Add the new images (new SOPInstanceUIDs) of an archive to an existing index.

Patients, studies and images removed with index remove are skipped.

Example: cxr-search index add /pacs/export-2026-11-23 --reports /pacs/ris.csv -i /indices/chest

Example: cxr-search index add --dicomweb http://pacs:8042/dicom-web/ --since 2026-11-01 -i /indices/chest
""")


# ---------------------------------------------------------------------------------------------- remove
def _say_removal(result: Dict[str, Any]) -> None:
    r = result["removed"]
    if any(r[k] for k in ("study", "image")):
        console.print(f"removed {r['study']} studies, {r['image']} images, {r['section']} report sections, "
                      f"{r['patient']} patients and {r['failure']} failure records of their files")
    for what in result["not_in_index"]:
        console.print(f"{what}: nothing to remove (not in this index); tombstone recorded, so it is kept out "
                      "when it arrives")
    console.print(f"{result['tombstones_added']} new tombstones: later intakes (index add, build) skip what was "
                  "removed; index remove --undo lifts them")


@index_app.command("remove")
def index_remove(
    index_arg: Optional[Path] = typer.Argument(None, metavar="INDEX", help=_INDEX_ARG_HELP, show_default=False),
    index: Optional[Path] = typer.Option(None, "--index", "-i", help=INDEX_HELP),
    patient: List[str] = typer.Option([], "--patient", help="Patient to remove with all studies (repeatable): the "
                                      "DICOM PatientID, or DATASET:PATIENT_ID for an index built from a manifest."),
    study: List[str] = typer.Option([], "--study", help="StudyInstanceUID to remove (repeatable)."),
    sop: List[str] = typer.Option([], "--sop", help="SOPInstanceUID of a single image to remove (repeatable)."),
    undo: bool = typer.Option(False, "--undo", help="Lift earlier removals of these ids instead: the next index "
                              "add (or build) re-admits them."),
    wait: float = typer.Option(0.0, "--wait", min=0.0, max=_MAX_WAIT_S, help=_WAIT_HELP),
    db: Optional[str] = typer.Option(None, "--db", help=DB_HELP),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Remove patients, studies or images from the store and every FAISS index, and keep them out.

    Each removal is kept as a tombstone (a keyed hash, never the id itself): no later intake brings it back.

    Removing an id the index does not hold succeeds and records it all the same; --undo lifts a removal.

    Example: cxr-search index remove /indices/chest --patient 0042371 --study 1.2.840.113619.2.55.3
    """
    from index.layout import META_FILE
    from index.lock import writer_lock

    folder = index_folder(index_arg, index, usage="cxr-search index remove /indices/chest --patient ID")
    if not (study or patient or sop):
        raise ConfigError("give what to remove: --patient ID, --study UID or --sop UID (each repeatable)")
    if not (folder.expanduser() / META_FILE).is_file():
        raise SearchIndexError(f"{folder}: no {META_FILE}; not an index folder")
    # The lock first: a busy or read-only index is reported as such, before the store is opened for writing.
    with writer_lock(folder, "index remove" + (" --undo" if undo else ""), wait=wait, say=console.print):
        from index.index_dir import IndexDir

        idx = IndexDir.open(folder, db_url=db)
        try:
            if undo:
                result = idx.readmit(study_uids=study, patient_ids=patient, sop_uids=sop)
            else:
                result = idx.remove(study_uids=study, patient_ids=patient, sop_uids=sop)
        finally:
            idx.close()
    if json_out:
        emit_json({**result, "undo": undo})
    elif undo:
        for what in result["not_removed"]:
            console.print(f"{what}: no removal on record; nothing to lift")
        console.print(f"lifted {result['lifted']} tombstones; the next index add (or build) over an archive that "
                      "holds them re-admits them")
    else:
        _say_removal(result)


# ---------------------------------------------------------------------------------------------- verify
@index_app.command("verify")
def index_verify(
    index_arg: Optional[Path] = typer.Argument(None, metavar="INDEX", help=_INDEX_ARG_HELP, show_default=False),
    index: Optional[Path] = typer.Option(None, "--index", "-i", help=INDEX_HELP),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Also check that this model is the index's."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP),
    deep: bool = typer.Option(False, "--deep", help="Re-read every DICOM header (slow on large archives)."),
    archive: Optional[Path] = typer.Option(None, "--archive", help="Also check that every file of this export "
                                           "folder has a row (indexed, or recorded with its reason)."),
    db: Optional[str] = typer.Option(None, "--db", help=DB_HELP),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Check that every row has exactly one vector and vice versa, the model, and the files (exit 1 on problems).

    Reads only: works on a read-only index folder and next to a running writer.

    Example: cxr-search index verify /indices/chest --json
    """
    from index.verify import verify

    folder = index_folder(index_arg, index, usage="cxr-search index verify /indices/chest")
    m = _load(model, tokenizer, need_text=False) if model else None
    report = verify(folder, model=m, deep=deep, db_url=db, progress=not json_out, archive=archive)
    if json_out:
        emit_json(report)
    else:
        t = _table(f"index verify: {folder}", "checked", "in the store", "in FAISS", right=("in the store", "in FAISS"))
        for kind, c in report["checked"].items():
            if isinstance(c, dict):
                t.add_row(kind, str(c.get("store")), str(c.get("faiss")))
            else:
                t.add_row(f"{kind} (readable)" if kind == "files" else kind, str(c), "")
        out_console.print(t)
        if report["problems"]:
            p = _table("problems", "kind", "problem", "count", "example ids", right=("count",))
            for prob in report["problems"]:
                p.add_row(prob["kind"], prob["problem"], str(prob["count"]), " ".join(str(i) for i in prob["examples"]))
            out_console.print(p)
        console.print(styled("index OK", "green") if report["ok"] else styled("index has problems", "red"))
    if not report["ok"]:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------- stats
@index_app.command("stats")
def index_stats(
    index_arg: Optional[Path] = typer.Argument(None, metavar="INDEX", help=_INDEX_ARG_HELP, show_default=False),
    index: Optional[Path] = typer.Option(None, "--index", "-i", help=INDEX_HELP),
    db: Optional[str] = typer.Option(None, "--db", help=DB_HELP),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Totals, inputs not indexed (by kind and reason), removals on record, FAISS indices, model, last runs.

    Example: cxr-search index stats /indices/chest --json
    """
    from index.index_dir import stats

    folder = index_folder(index_arg, index, usage="cxr-search index stats /indices/chest")
    info = stats(folder, db_url=db)
    if json_out:
        emit_json(info)
        return
    t = _table(f"index {folder}", "", "value", right=("value",))
    for k, v in info["totals"].items():
        t.add_row(k, str(v))
    for kind, reasons in info["failures"].items():
        for reason, n in reasons.items():
            t.add_row(f"{kind}: {reason}", str(n))
    for kind, n in sorted(info["tombstones"].items()):
        t.add_row(f"removed {kind}s (tombstones)", str(n))
    for kind, f in info["faiss"].items():
        t.add_row(f"{kind} index", f"{f.get('n')} × {f.get('factory')}")
    t.add_row("model", f"{str(info['model_sha256'])[:12]} {info.get('model_source') or ''}".strip())
    for w in info["writers"]:
        t.add_row("writer running", f"{w['command']} (pid {w['pid']} on {w['host']}, since {w['since']})")
    out_console.print(t)
    if info["builds"]:
        b = _table("last runs", "id", "command", "started", "finished", right=("id",))
        for run in info["builds"]:
            b.add_row(str(run["id"]), run["command"], run["created"], run["finished"] or "(not finished)")
        out_console.print(b)


# ---------------------------------------------------------------------------------------------- failures
@index_app.command("failures")
def index_failures(
    index_arg: Optional[Path] = typer.Argument(None, metavar="INDEX", help=_INDEX_ARG_HELP, show_default=False),
    index: Optional[Path] = typer.Option(None, "--index", "-i", help=INDEX_HELP),
    kind: Optional[str] = typer.Option(None, "--kind", help="Only failed (unreadable), skipped (by rule or by "
                                       "removal request) or duplicate inputs."),
    reason: Optional[str] = typer.Option(None, "--reason", help="Only inputs whose reason contains this text (any case)."),
    db: Optional[str] = typer.Option(None, "--db", help=DB_HELP),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Every input that is not in the index, with its file path and why (the index owner's view: paths decrypted).

    Example: cxr-search index failures /indices/chest --kind failed --reason DICOM
    """
    from index.failures import FAILURE_KINDS, list_failures
    from index.index_dir import IndexDir

    if kind is not None and kind not in FAILURE_KINDS:
        raise ConfigError(f"--kind {kind!r}: use {', '.join(FAILURE_KINDS)}")
    folder = index_folder(index_arg, index, usage="cxr-search index failures /indices/chest")
    idx = IndexDir.open(folder, db_url=db, readonly=True)
    try:
        rows = list_failures(idx.store, idx.secret, kind=kind, reason=reason)
    finally:
        idx.close()
    if json_out:
        emit_json({"index": str(folder), "kind": kind, "reason": reason, "count": len(rows), "failures": rows})
        return
    if not rows:
        console.print("no inputs recorded as not indexed" + (" that match" if kind or reason else ""))
        return
    t = _table(f"not indexed: {folder}", "file", "kind", "reason")
    for r in rows:
        # The file's own path is in the first column; in the reason its name stands for it (same row).
        kind_txt = r["kind"] if r["kind"] == r["stage"] else f"{r['kind']} ({r['stage']})"
        t.add_row(r["path"], kind_txt, r["stored_reason"].replace("<file>", Path(r["path"]).name))
    out_console.print(t)
    by_kind: Dict[str, int] = {}
    for r in rows:
        by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + 1
    console.print(f"{len(rows)} inputs not indexed: " + ", ".join(f"{n} {k}" for k, n in sorted(by_kind.items())))


__all__ = ["index_app", "index_folder", "parse_shard"]
