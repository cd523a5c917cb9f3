"""``cxr-search bench ...``: the Typer sub-app of the benchmarks (mounted by ``cli.py``).

Each benchmark lives in its own module (retrieval and speed in :mod:`index.bench`, zero-shot and overlap in
:mod:`cxr_search.evaluation`); this file only checks options, calls it, and prints a table on stdout (or
JSON with ``--json``); messages go to stderr. Every option value is checked before a model is loaded or
an image decoded, so a typo fails at once with exit code 2. Every result carries a ``provenance`` object
(:mod:`cxr_search.evaluation.provenance`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import typer

from cxr_search.errors import ConfigError, DatasetError
from cxr_search.fileio import emit_json
from cxr_search.terminal import err_console, out_console, styled

bench_app = typer.Typer(help="Reproducible benchmarks: retrieval, zero-shot, overlap, speed.", no_args_is_help=True)

MODEL_HELP = "Model: released CXR-CLIP file, our model directory, or preset."
TOKENIZER_HELP = "Tokenizer directory (needed for released CXR-CLIP files)."
DEVICE_HELP = "auto (GPU when present), cpu, cuda or cuda:N."
_SPLIT_CHOICES = ("train", "validate", "test")


def load_bench_model(model: str, tokenizer: Optional[Path], device: str = "auto") -> Any:
    """Load a model for benchmarking (both towers; the tokenizer is required)."""
    from cxr_search.checkpoints import load_model

    return load_model(model, tokenizer=tokenizer, device=device,
                      require_tokenizer=True)


def check_device(device: str) -> str:
    """``device`` if torch understands it and it exists here.

    Raises:
        ConfigError: An unknown device string, or CUDA asked for without a GPU (exit code 2).
    """
    from cxr_search.inference import resolve_device

    try:
        resolve_device(device)
    except ConfigError:
        raise
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N ({exc})") from None
    return device


def check_split(split: Optional[str], option: str = "--split", *, allow_all: bool = False) -> Optional[str]:
    """``split`` if it is a manifest split (or ``all`` where allowed, or None).

    Raises:
        ConfigError: Anything else (exit code 2).
    """
    choices = _SPLIT_CHOICES + (("all",) if allow_all else ())
    if split is not None and split not in choices:
        raise ConfigError(f"unknown {option} {split!r}; use one of {', '.join(choices)}")
    return split


def _note(message: str) -> None:
    err_console.print(styled("note: ", "yellow"), message, sep="")


def _warn(message: str) -> None:
    err_console.print(styled("warning: ", "bold yellow"), message, sep="")


def _manifest_provenance(path: Path, rows: int, **extra: Any) -> Dict[str, Any]:
    from cxr_search.evaluation.provenance import file_sha256

    return {"path": str(path), "sha256": file_sha256(path), "rows": rows, **extra}


# ------------------------------------------------------------------------------------------------ retrieval
def _read_split(manifest: Path, split: str) -> Tuple[List[Any], int, List[str]]:
    """The rows of ``split`` ('all': every row), the file's row count and the splits present (one pass)."""
    from cxr_search.datasets.manifest import iter_manifest

    rows, total, present = [], 0, set()
    for row in iter_manifest(manifest):
        total += 1
        present.add(row.split)
        if split == "all" or row.split == split:
            rows.append(row)
    return rows, total, sorted(present)


@bench_app.command("retrieval")
def retrieval(
    manifest: Path = typer.Argument(..., help="Manifest CSV (cxr-search data prepare)."),
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP),
    protocol: str = typer.Option("cxr-clip", "--protocol",
                                 help="cxr-clip: the reference (one frontal query image per study, image->text); "
                                      "full: every image, both directions, image and study level, CIs."),
    split: str = typer.Option("test", "--split", help="Manifest split to evaluate: train, validate, test, or all."),
    ids: Optional[Path] = typer.Option(None, "--ids", help="evaluated_ids.csv of an earlier run: evaluate exactly "
                                                           "those images."),
    text_rule: str = typer.Option("longer", "--text-rule",
                                  help="A study's text: longer (the longer of findings and impression, the authors' "
                                       "stated rule), reference-max (Python max() of the two strings, what the "
                                       "reference code computes), findings, impression or both."),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=0, help="Bootstrap resamples for 95% intervals (full)."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed (full)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images and texts per forward pass."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for retrieval-PROTOCOL.json and "
                                                           "evaluated_ids.csv."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write Recall@K curves to this PNG (needs the plot "
                                                             "extra: matplotlib)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Recall@K of image->text (and text->image) retrieval on a manifest split, through the index engine.

    The JSON also records the query images and what was left out, ties at the positive's score, and provenance.

    Example: cxr-search bench retrieval openi.csv -m r50_mcc.tar --tokenizer Bio_ClinicalBERT --protocol cxr-clip --text-rule reference-max --json
    """
    from cxr_search.evaluation.provenance import bench_provenance, file_sha256, model_provenance
    from cxr_search.evaluation.retrieval_protocol import (
        check_protocol,
        check_text_rule,
        plan_retrieval,
        read_ids,
        restrict_rows,
        write_ids,
    )
    from cxr_search.fileio import write_json_atomic
    from cxr_search.inference import Embedder
    from index.bench.retrieval import evaluate, protocol_options

    # Every option first: nothing heavy has happened when a typo is reported.
    protocol = check_protocol(protocol)
    text_rule = check_text_rule(text_rule)
    check_split(split, allow_all=True)
    check_device(device)
    if plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError("--plot needs matplotlib: pip install 'cxr-search[plot]'") from None
    rows, total_rows, present = _read_split(manifest, split)
    if not rows:
        raise DatasetError(f"{manifest}: no rows in split {split!r}; splits present: {', '.join(present) or 'none'}")
    ids_file = None
    if ids is not None:
        rows = restrict_rows(rows, read_ids(ids))
        ids_file = {"path": str(ids), "sha256": file_sha256(ids)}
    plan = plan_retrieval(rows, protocol=protocol, text_rule=text_rule)
    for message in plan.warnings:
        _warn(message)
    manifest_info = _manifest_provenance(manifest, total_rows, split_rows=len(rows))

    m = load_bench_model(model, tokenizer, device)
    embedder = Embedder(m, device=device, batch_size=batch_size, text_batch_size=batch_size)
    result, ranks = evaluate(plan.studies, embedder, protocol=protocol, bootstrap=bootstrap, seed=seed,
                             progress=not json_out)
    result["skipped"] = plan.skipped
    result["split"] = split
    result["model"] = model_provenance(m, model)
    result["provenance"] = bench_provenance(
        model=result["model"], manifest=manifest_info, split=split,
        options=protocol_options(plan, bootstrap=bootstrap, seed=seed, ids_file=ids_file),
        evaluated_ids=result["evaluated_ids"])
    if out is not None:
        write_json_atomic(out / f"retrieval-{protocol}.json", result)
        write_ids(out / "evaluated_ids.csv", plan.ids())
        err_console.print(f"wrote {out / f'retrieval-{protocol}.json'} and {out / 'evaluated_ids.csv'}")
    if plot is not None:
        from cxr_search.evaluation.plot import plot_recall_curves

        plot_recall_curves(ranks, plot, title=f"{manifest.name} ({split}), {protocol} protocol")
    if json_out:
        emit_json(result)
        return
    _print_retrieval(result)


def _print_retrieval(result: Any) -> None:
    from rich import box
    from rich.table import Table

    # No vertical rules, short headers and folding cells: the table fits 80 columns without cutting a number.
    full = result["protocol"] == "full"
    table = Table(title=f"retrieval, {result['protocol']} protocol: {result['studies']} studies, "
                        f"{result['images']} images, {result['unique_texts']} distinct texts",
                  box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0),
                  caption="n = queries, pool = candidates, tied = queries tied with another candidate at the "
                          "positive's score (counted against the model)" + (
                              "; study = a study's images fused into one vector; texts all = not de-duplicated"
                              if full else ""))
    columns = ["level", "dir", "texts", "R@1", "R@5", "R@10", "R@10 95% CI", "mean rank", "n", "pool", "tied"]
    if not full:
        columns.remove("R@10 95% CI")
    for col in columns:
        table.add_column(col, justify="left" if col in ("level", "dir", "texts") else "right", overflow="fold",
                         no_wrap=col in ("R@10 95% CI", "R@1", "R@5", "R@10", "texts"))

    def add(level: str, texts: str, direction: str, m: Any) -> None:
        ci = m.get("ci95", {}).get("R@10")
        table.add_row(level, "i->t" if direction == "image_to_text" else "t->i", texts,
                      *(f"{m[k]:.3f}" for k in ("R@1", "R@5", "R@10")),
                      *((f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "",) if full else ()), f"{m['mean_rank']:.2f}",
                      str(m["n_queries"]), str(m["n_candidates"]), str(m["ties"]["queries_with_tie"]))

    if not full:
        add("query", "dedup", "image_to_text", result["image_to_text"])
    else:
        for level in ("image_level", "study_level"):
            for dedup in ("dedup", "no_dedup"):
                for direction, m in result[level][dedup].items():
                    add(level.split("_")[0], "dedup" if dedup == "dedup" else "all", direction, m)
    out_console.print(table)
    skipped = result.get("skipped", {})
    if skipped.get("studies_without_text"):
        _note(f"left out: {skipped['studies_without_text']} studies without a report text")
    if skipped.get("studies_without_frontal"):
        unknown = result["query_images"]["studies_without_frontal_views_unknown"]
        _note(f"left out: {skipped['studies_without_frontal']} studies without a frontal (PA/AP) image"
              + (f", {unknown} of them with no known view" if unknown else ""))
    tied = result.get("image_to_text", result.get("image_level", {}).get("dedup", {}).get("image_to_text", {}))
    if tied.get("ties", {}).get("queries_with_tie"):
        opt = tied["ties"]["optimistic"]
        _note(f"{tied['ties']['queries_with_tie']} image->text queries tie with another text at the positive's "
              f"score and count against the model; with ties in its favour R@1/5/10 would be "
              f"{opt['R@1']:.3f}/{opt['R@5']:.3f}/{opt['R@10']:.3f}, mean rank {opt['mean_rank']:.2f}")


# ------------------------------------------------------------------------------------------------ zeroshot
@bench_app.command("zeroshot")
def bench_zeroshot(
    manifest: Path = typer.Argument(..., help="Manifest CSV (from `cxr-search data prepare`)."),
    task: str = typer.Option(..., "--task", help="vindr, rsna, siim or chexpert5x200."),
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP),
    split: str = typer.Option("test", "--split", help="Manifest split to evaluate (one image per row)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per forward pass."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write zeroshot-TASK.json and evaluated_ids.csv here."),
) -> None:
    """Zero-shot classification with the reference CXR-CLIP prompts, plus separately reported prompt variants.

    Example: cxr-search bench zeroshot vindr.csv --task vindr -m r50_mcc.tar --tokenizer Bio_ClinicalBERT --json
    """
    from cxr_search.datasets.manifest import read_manifest
    from cxr_search.evaluation.provenance import bench_provenance, model_provenance
    from cxr_search.evaluation.retrieval_protocol import ids_sha256
    from cxr_search.evaluation.zeroshot import render_tables, run_zeroshot, select_rows, write_outputs
    from cxr_search.evaluation.zeroshot_prompts import check_task
    from cxr_search.inference import Embedder

    check_task(task)  # before loading anything, so a typo fails fast
    check_split(split)
    check_device(device)
    all_rows = read_manifest(manifest)
    rows = select_rows(all_rows, task, split)
    clip = load_bench_model(model, tokenizer, device)
    embedder = Embedder(clip, device=device, batch_size=batch_size)
    result = {"model": model, "model_fingerprint": getattr(clip, "provenance", {}).get("fingerprint"),
              "split": split, **run_zeroshot(rows, embedder, task, progress=not json_out)}  # fmt: skip
    ids = [{"dataset": r.dataset, "study_id": r.study_id, "image_id": r.image_id} for r in rows]
    result["provenance"] = bench_provenance(
        model=model_provenance(clip, model), manifest=_manifest_provenance(manifest, len(all_rows)), split=split,
        options={"task": task}, evaluated_ids={"count": len(ids), "sha256": ids_sha256(ids)})
    if out is not None:
        json_path, ids_path = write_outputs(result, rows, out)
        err_console.print(f"wrote {json_path} and {ids_path}")
    if json_out:
        emit_json(result)
        return
    for table in render_tables(result):
        out_console.print(table)
    for note in result["notes"]:
        _note(note)


# ------------------------------------------------------------------------------------------------ overlap
@bench_app.command("overlap")
def bench_overlap(
    train_manifest: Path = typer.Argument(..., help="Training-set manifest CSV."),
    test_manifest: Path = typer.Argument(..., help="Evaluation-set manifest CSV (may be the same file, see --test-split)."),
    by: str = typer.Option("all", "--by", help="ids (patients, image ids, UIDs, paths), pixels (decoded content) or all."),
    train_split: Optional[str] = typer.Option(None, "--train-split", help="Use only these training rows (train, validate, test)."),
    test_split: Optional[str] = typer.Option(None, "--test-split", help="Use only these test rows (train, validate, test)."),
    min_correlation: float = typer.Option(0.999, "--min-correlation", help="Near-duplicate threshold on thumbnail correlation, in (0, 1]."),
    workers: int = typer.Option(2, "--workers", min=1, help="Decoding processes for the content fingerprints."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Fingerprint cache (SQLite); default ~/.cache/cxr-search/image-hashes.sqlite."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the fingerprint cache."),
    examples: int = typer.Option(5, "--examples", min=0, help="Example pairs per criterion in the report."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for overlap_summary.json and the CSVs of every pair."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Patients and images of an evaluation set that also occur in a training set (ids and pixels).

    Example: cxr-search bench overlap nih.csv rsna.csv --by all --out overlap/ --json
    """
    from cxr_search.evaluation.image_hash import default_cache_file
    from cxr_search.evaluation.overlap import BY_CHOICES, overlap_manifests, render_overlap
    from cxr_search.evaluation.provenance import bench_provenance, file_sha256

    if by not in BY_CHOICES:
        raise ConfigError(f"unknown --by {by!r}; choose one of {', '.join(BY_CHOICES)}")
    if not 0.0 < min_correlation <= 1.0:
        raise ConfigError(f"--min-correlation must be in (0, 1], got {min_correlation}")
    check_split(train_split, "--train-split")
    check_split(test_split, "--test-split")
    result = overlap_manifests(train_manifest, test_manifest, train_split=train_split, test_split=test_split, by=by,
                               min_correlation=min_correlation, workers=workers, examples=examples,
                               cache_file=None if no_cache else (cache or default_cache_file()), progress=True)
    result.summary["provenance"] = bench_provenance(
        manifest={"train": {"path": str(train_manifest), "sha256": file_sha256(train_manifest),
                            "rows_used": len(result.train_rows)},
                  "test": {"path": str(test_manifest), "sha256": file_sha256(test_manifest),
                           "rows_used": len(result.test_rows)}},
        options={"by": by, "min_correlation": min_correlation, "train_split": train_split, "test_split": test_split})
    if out is not None:
        written = result.write(out)
        err_console.print(f"wrote {', '.join(str(p) for p in written)}")
    if json_out:
        emit_json(result.to_dict())
        return
    out_console.print(render_overlap(result.to_dict()))


# ------------------------------------------------------------------------------------------------ speed
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
    """Embedding throughput, text-query latency and search latency/recall on this machine's CPU.

    Example: cxr-search bench speed --preset tiny --preset cxr-clip-r50 --threads 1 --json
    """
    from cxr_search.config import get_model_config
    from cxr_search.evaluation.provenance import bench_provenance
    from cxr_search.fileio import write_json_atomic
    from index.bench.speed import render_speed, speed_benchmark

    if precision not in ("fp32", "bf16", "auto"):
        raise ConfigError(f"unknown --precision {precision!r}; choose fp32, bf16 or auto")
    for name in preset:
        get_model_config(name)  # an unknown preset fails here, not after the first one was measured
    result = speed_benchmark(preset, n_images=images, n_texts=texts, batch_size=batch_size, precision=precision,
                             index_size=index_size, n_queries=queries, text_queries=text_queries, seed=seed,
                             threads=threads, progress=lambda msg: err_console.print(msg))
    result["provenance"] = bench_provenance(options={"presets": list(preset), "precision": precision, "seed": seed})
    if out is not None:
        write_json_atomic(out, result)
        err_console.print(f"wrote {out}")
    if json_out:
        emit_json(result)
        return
    for table in render_speed(result):
        out_console.print(table)
