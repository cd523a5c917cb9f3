"""``cxr-search bench ...``: the Typer sub-app of the benchmarks (mounted by ``cli.py``).

Each benchmark lives in its own module (retrieval and speed in :mod:`index.bench`, zero-shot and overlap in
:mod:`cxr_search.evaluation`); this file only parses options, calls it, and prints a table (or JSON with
``--json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from cxr_search.fileio import emit_json

console = Console(stderr=True)
bench_app = typer.Typer(help="Reproducible benchmarks: retrieval, zero-shot, overlap, speed.", no_args_is_help=True)

MODEL_HELP = "Model: released CXR-CLIP file, our model directory, or preset."
TOKENIZER_HELP = "Tokenizer directory (needed for released CXR-CLIP files)."


def load_bench_model(model: str, tokenizer: Optional[Path], device: str = "auto") -> Any:
    """Load a model for benchmarking (both towers; the tokenizer is required)."""
    from cxr_search.checkpoints import load_model

    return load_model(model, tokenizer=tokenizer, device=device,
                      require_tokenizer=True)


# ------------------------------------------------------------------------------- retrieval (lead)
@bench_app.command("retrieval")
def retrieval(
    manifest: Path = typer.Argument(..., help="Manifest CSV (cxr-search data prepare)."),
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP),
    protocol: str = typer.Option("cxr-clip", "--protocol", help="cxr-clip (the reference, image->text) or full."),
    split: str = typer.Option("test", "--split", help="Manifest split to evaluate ('all' = every row)."),
    ids: Optional[Path] = typer.Option(None, "--ids", help="evaluated_ids.csv of an earlier run: evaluate exactly those images."),
    text_rule: str = typer.Option("auto", "--text-rule", help="auto (reference rule per dataset), longest, findings, impression, both."),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=0, help="Bootstrap resamples for 95% intervals (full)."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda ..."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for retrieval-<protocol>.json and evaluated_ids.csv."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write Recall@K curves to this PNG (needs the plot extra)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Recall@K of image->text (and text->image) retrieval on a manifest split, through the index engine."""
    from cxr_search.datasets import read_manifest
    from cxr_search.evaluation.retrieval_protocol import (
        evaluated_ids,
        read_ids,
        restrict_rows,
        select_studies,
        write_ids,
    )
    from cxr_search.fileio import write_json_atomic
    from cxr_search.inference import Embedder
    from index.bench.retrieval import evaluate

    rows = read_manifest(manifest, split=None if split == "all" else split)
    if not rows:
        from cxr_search.errors import DatasetError

        present = sorted({r.split for r in read_manifest(manifest)})
        raise DatasetError(f"{manifest}: no rows in split {split!r}; splits present: {', '.join(present) or 'none'}")
    rows = restrict_rows(rows, read_ids(ids) if ids else None)
    studies, skipped = select_studies(rows, text_rule=text_rule)
    m = load_bench_model(model, tokenizer, device)
    embedder = Embedder(m, device=device, batch_size=batch_size, text_batch_size=batch_size)
    result, ranks = evaluate(studies, embedder, protocol=protocol, bootstrap=bootstrap, seed=seed,
                             progress=not json_out)
    result["skipped"] = skipped
    result["split"] = split
    result["model"] = {"fingerprint": m.provenance.get("fingerprint", ""), "source": str(model)}
    if out is not None:
        write_json_atomic(out / f"retrieval-{protocol}.json", result)
        write_ids(out / "evaluated_ids.csv", evaluated_ids(studies, protocol))
    if plot is not None:
        from cxr_search.evaluation.plot import plot_recall_curves

        plot_recall_curves(ranks, plot, title=f"{manifest.name} ({split}), {protocol} protocol")
    if json_out:
        emit_json(result)
        return
    _print_retrieval(result)


def _print_retrieval(result: Any) -> None:
    from rich.table import Table

    table = Table(title=f"retrieval, {result['protocol']} protocol: {result['studies']} studies, "
                        f"{result['images']} images, {result['unique_texts']} distinct texts")
    for col in ("level", "texts", "dir", "R@1", "R@5", "R@10", "R@10 95% CI", "mean rank", "queries", "pool"):
        table.add_column(col, justify="left" if col in ("level", "texts", "dir") else "right")

    def add(level: str, texts: str, direction: str, m: Any) -> None:
        ci = m.get("ci95", {}).get("R@10")
        table.add_row(level, texts, "i->t" if direction == "image_to_text" else "t->i",
                      *(f"{m[k]:.3f}" for k in ("R@1", "R@5", "R@10")),
                      f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "", f"{m['mean_rank']:.1f}", str(m["n_queries"]),
                      str(m["n_candidates"]))

    if result["protocol"] == "cxr-clip":
        add("first image", "dedup", "image_to_text", result["image_to_text"])
    else:
        for level in ("image_level", "study_level"):
            for dedup in ("dedup", "no_dedup"):
                for direction, m in result[level][dedup].items():
                    add(level.split("_")[0], "dedup" if dedup == "dedup" else "all", direction, m)
    console.print(table)
    if result.get("skipped", {}).get("studies_without_text"):
        console.print(f"left out: {result['skipped']['studies_without_text']} studies without a report text")


# ------------------------------------------------------------------------------- zeroshot (helper)
@bench_app.command("zeroshot")
def bench_zeroshot(
    manifest: Path = typer.Argument(..., help="Manifest CSV (from `cxr-search data prepare`)."),
    task: str = typer.Option(..., "--task", help="vindr, rsna, siim or chexpert5x200."),
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP),
    split: str = typer.Option("test", "--split", help="Manifest split to evaluate (one image per row)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:0, ..."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write zeroshot-<task>.json and evaluated_ids.csv here."),
) -> None:
    """Zero-shot classification with the reference CXR-CLIP prompts, plus separately reported prompt variants."""
    from cxr_search.datasets.manifest import read_manifest
    from cxr_search.evaluation.zeroshot import render_tables, run_zeroshot, select_rows, write_outputs
    from cxr_search.evaluation.zeroshot_prompts import check_task
    from cxr_search.inference import Embedder

    check_task(task)  # before loading anything, so a typo fails fast
    rows = select_rows(read_manifest(manifest), task, split)
    if batch_size < 1:
        from cxr_search.errors import ConfigError

        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    clip = load_bench_model(model, tokenizer, device)
    embedder = Embedder(clip, device=device, batch_size=batch_size)
    result = {"model": model, "model_fingerprint": getattr(clip, "provenance", {}).get("fingerprint"),
              "split": split, **run_zeroshot(rows, embedder, task, progress=not json_out)}  # fmt: skip
    if out is not None:
        json_path, ids_path = write_outputs(result, rows, out)
        console.print(f"wrote {json_path} and {ids_path}", highlight=False)
    if json_out:
        emit_json(result)
        return
    table_console = Console()
    for table in render_tables(result):
        table_console.print(table)
    for note in result["notes"]:
        console.print(f"note: {note}", highlight=False)


# ------------------------------------------------------------------------------- overlap (helper)
@bench_app.command("overlap")
def bench_overlap(
    train_manifest: Path = typer.Argument(..., help="Training-set manifest CSV."),
    test_manifest: Path = typer.Argument(..., help="Evaluation-set manifest CSV (may be the same file, see --test-split)."),
    by: str = typer.Option("all", "--by", help="ids (patients, image ids, UIDs, paths), pixels (decoded content) or all."),
    train_split: Optional[str] = typer.Option(None, "--train-split", help="Use only these training rows (train, validate, test)."),
    test_split: Optional[str] = typer.Option(None, "--test-split", help="Use only these test rows."),
    min_correlation: float = typer.Option(0.999, "--min-correlation", help="Near-duplicate threshold on thumbnail correlation."),
    workers: int = typer.Option(2, "--workers", min=1, help="Decoding processes for the content fingerprints."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Fingerprint cache (SQLite); default ~/.cache/cxr-search/image-hashes.sqlite."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the fingerprint cache."),
    examples: int = typer.Option(5, "--examples", min=0, help="Example pairs per criterion in the report."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for overlap_summary.json and the CSVs of every pair."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Patients and images of an evaluation set that also occur in a training set (ids and pixels)."""
    from cxr_search.evaluation.image_hash import default_cache_file
    from cxr_search.evaluation.overlap import overlap_manifests, render_overlap

    result = overlap_manifests(train_manifest, test_manifest, train_split=train_split, test_split=test_split, by=by,
                               min_correlation=min_correlation, workers=workers, examples=examples,
                               cache_file=None if no_cache else (cache or default_cache_file()), progress=True)
    if out is not None:
        written = result.write(out)
        console.print(f"wrote {', '.join(str(p) for p in written)}", highlight=False)
    if json_out:
        emit_json(result.to_dict())
        return
    Console().print(render_overlap(result.to_dict()))


# ------------------------------------------------------------------------------- speed (helper)
@bench_app.command("speed")
def bench_speed(
    preset: list[str] = typer.Option(["cxr-clip-r50"], "--preset", metavar="PRESET", help="Model preset (random weights); repeat for several."),
    images: int = typer.Option(16, "--images", min=1, help="Images per throughput measurement."),
    texts: int = typer.Option(16, "--texts", min=1, help="Texts per throughput measurement."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Batch size of the throughput measurements."),
    precision: str = typer.Option("auto", "--precision", help="fp32, bf16 or auto (bf16 only where the CPU has it natively)."),
    index_size: int = typer.Option(20_000, "--index-size", min=0, help="Synthetic vectors in the search benchmark (0 skips it)."),
    queries: int = typer.Option(200, "--queries", min=1, help="Single queries timed in the search benchmark."),
    text_queries: int = typer.Option(20, "--text-queries", min=0, help="Single text queries timed per precision (0 skips)."),
    seed: int = typer.Option(0, "--seed", help="Seed of weights, images and vectors."),
    threads: int = typer.Option(0, "--threads", min=0, help="torch and FAISS threads (0 = their default; 1 is often faster on a busy machine)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON result to this file."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Embedding throughput, text-query latency and search latency/recall on this machine's CPU."""
    from cxr_search.fileio import write_json_atomic
    from index.bench.speed import render_speed, speed_benchmark

    result = speed_benchmark(preset, n_images=images, n_texts=texts, batch_size=batch_size, precision=precision,
                             index_size=index_size, n_queries=queries, text_queries=text_queries, seed=seed,
                             threads=threads, progress=lambda msg: console.print(msg, highlight=False))
    if out is not None:
        write_json_atomic(out, result)
        console.print(f"wrote {out}", highlight=False)
    if json_out:
        emit_json(result)
        return
    table_console = Console()
    for table in render_speed(result):
        table_console.print(table)

