"""``cxr-search index ...``: the Typer sub-app that builds, extends, checks and inspects an index (mounted by ``cli.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from cxr_search.errors import ConfigError
from cxr_search.fileio import emit_json
from cxr_search.terminal import err_console as console
from cxr_search.terminal import out_console, styled

index_app = typer.Typer(help="Build, extend, check and inspect a search index.", no_args_is_help=True)

_MODEL_HELP = "Model: released CXR-CLIP file, our model directory, or preset (the index's model)."
_DB_HELP = "Store URL (SQLAlchemy, e.g. postgresql+psycopg://host/db); default: INDEX_DIR/store.sqlite or $CXR_SEARCH_DB_URL."


def _load(model: str, tokenizer: Optional[Path], *, need_text: bool) -> Any:
    from cxr_search.checkpoints import load_model

    return load_model(model, tokenizer=tokenizer, require_tokenizer=need_text)


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


def _build(command: str, archive: Path, model: str, tokenizer: Optional[Path], reports: Optional[Path], out: Path,
           batch_size: int, workers: int, device: str, precision: str, factory: Optional[str],
           bytes_per_vector: Optional[float], all_body_parts: bool, db: Optional[str], json_out: bool,
           shard: Optional[str] = None, catalogue_only: bool = False) -> None:
    from index.build import BuildOptions, build

    parsed = parse_shard(shard) if shard else None
    if parsed and catalogue_only:
        raise ConfigError("--shard and --catalogue-only are two steps: catalogue once, then run the shards")
    m = _load(model, tokenizer, need_text=True)
    opts = BuildOptions(reports_csv=reports, batch_size=batch_size, num_workers=workers, device=device,
                        precision=precision, factory=factory, bytes_per_vector=bytes_per_vector,
                        body_part_filter=not all_body_parts, db_url=db, progress=not json_out, shard=parsed,
                        catalogue_only=catalogue_only)
    summary = build(archive, out, m, opts, command=command)
    if json_out:
        emit_json(summary)
        return
    t = Table(title=f"index {command}: {out}")
    for col in ("", "images", "studies", "sections", "failed"):
        t.add_column(col, justify="right" if col else "left")
    for row in ("totals", "added"):
        t.add_row(row, *(str(summary[row][k]) for k in ("images", "studies", "sections", "failed")))
    console.print(t)
    for kind, f in summary["faiss"].items():
        recall = f.get("recall_at_10")
        console.print(f"{kind}: {f.get('n')} vectors, {f.get('factory')}"
                      + (f", recall@10 vs exact {recall:.3f}" if isinstance(recall, float) else ""))
    if summary["shard"]:
        console.print(f"shard {summary['shard']} done; when every shard is done, run the same command without "
                      "--shard to embed any leftovers and write the FAISS files")
    elif catalogue_only:
        console.print("catalogued; now embed with --shard K/N on each worker (same --out and --db), then once without")
    reasons = (summary["catalogue"] or {}).get("failure_reasons", {})
    if reasons:
        console.print("not indexed: " + ", ".join(f"{k} ({v})" for k, v in sorted(reasons.items())))


def _build_command(command: str, doc: str) -> None:
    @index_app.command(command, help=doc)
    def _cmd(
        archive: Path = typer.Argument(..., help="PACS export folder or manifest CSV (cxr-search data prepare)."),
        model: str = typer.Option(..., "--model", "-m", help=_MODEL_HELP),
        out: Path = typer.Option(..., "--out", "-o", "--index", help="Index folder."),
        tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer directory (released files)."),
        reports: Optional[Path] = typer.Option(None, "--reports", help="RIS reports CSV (accession / StudyInstanceUID)."),
        batch_size: int = typer.Option(32, "--batch-size", min=1),
        workers: int = typer.Option(0, "--workers", min=0, help="Decoding worker processes."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
        precision: str = typer.Option("fp32", "--precision", help="fp32, bf16, fp16 (GPU) or auto."),
        factory: Optional[str] = typer.Option(None, "--factory", help="FAISS factory string (default: chosen by size)."),
        bytes_per_vector: Optional[float] = typer.Option(None, "--bytes-per-vector", help="Memory budget per vector for the automatic choice."),
        all_body_parts: bool = typer.Option(False, "--all-body-parts", help="Keep CR/DX images whatever BodyPartExamined says."),
        db: Optional[str] = typer.Option(None, "--db", help=_DB_HELP),
        json_out: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
        shard: Optional[str] = typer.Option(None, "--shard", help="K/N: embed only shard K of N (after --catalogue-only; "
                                            "processes sharing the store split the work)."),
        catalogue_only: bool = typer.Option(False, "--catalogue-only", help="Read headers and reports into the "
                                            "store only (first step of a sharded build)."),
    ) -> None:
        _build(command, archive, model, tokenizer, reports, out, batch_size, workers, device, precision, factory,
               bytes_per_vector, all_body_parts, db, json_out, shard, catalogue_only)


_build_command("build", "Index an archive (resumes an interrupted build: run the same command again).")
_build_command("add", "Add the new images (new SOPInstanceUIDs) of an archive to an existing index.")


@index_app.command("remove")
def index_remove(
    index: Path = typer.Argument(..., help="Index folder."),
    study: List[str] = typer.Option([], "--study", help="StudyInstanceUID to remove (repeatable)."),
    patient: List[str] = typer.Option([], "--patient", help="PatientID (as in the DICOM) whose studies to remove."),
    db: Optional[str] = typer.Option(None, "--db", help=_DB_HELP),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Remove studies or patients from the store and every FAISS index."""
    from index.index_dir import IndexDir

    if not study and not patient:
        raise ConfigError("give --study UID or --patient ID (repeatable)")
    idx = IndexDir.open(index, db_url=db)
    try:
        removed = idx.remove(study_uids=study, patient_ids=patient)
    finally:
        idx.close()
    if json_out:
        emit_json({"index": str(index), "removed": removed})
    else:
        console.print(f"removed {removed['study']} studies, {removed['image']} images, {removed['section']} sections")


@index_app.command("verify")
def index_verify(
    index: Path = typer.Argument(..., help="Index folder."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Also check this model is the index's."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer"),
    deep: bool = typer.Option(False, "--deep", help="Re-read every DICOM header (slow on large archives)."),
    db: Optional[str] = typer.Option(None, "--db", help=_DB_HELP),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Check that every row has exactly one vector and vice versa, the model, and the files."""
    from index.verify import verify

    m = _load(model, tokenizer, need_text=False) if model else None
    report = verify(index, model=m, deep=deep, db_url=db, progress=not json_out)
    if json_out:
        emit_json(report)
    else:
        for p in report["problems"]:
            console.print(styled(p["kind"], "red"), f": {p['problem']} ({p['count']}; e.g. ids {p['examples']})", sep="")
        console.print(styled("index OK", "green") if report["ok"] else styled("index has problems", "red"))
    if not report["ok"]:
        raise typer.Exit(1)


@index_app.command("stats")
def index_stats(
    index: Path = typer.Argument(..., help="Index folder."),
    db: Optional[str] = typer.Option(None, "--db", help=_DB_HELP),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Totals, FAISS index types and the last builds."""
    from index.index_dir import stats

    info = stats(index, db_url=db)
    if json_out:
        emit_json(info)
        return
    t = Table(title=f"index {index}")
    t.add_column("")
    t.add_column("value", justify="right")
    for k, v in info["totals"].items():
        t.add_row(k, str(v))
    for kind, f in info["faiss"].items():
        t.add_row(f"{kind} index", f"{f.get('n')} × {f.get('factory')}")
    t.add_row("model", f"{str(info['model_sha256'])[:12]} {info.get('model_source') or ''}")
    out_console.print(t)


__all__ = ["index_app"]
