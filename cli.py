"""``cxr-search``: the command-line interface (Typer). The only module that imports core, train and index.

User errors (:class:`cxr_search.errors.CxrSearchError`) are printed as one readable line on stderr and
mapped to the error class's exit code, without a traceback.
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import typer
from rich.console import Console
from rich.table import Table

from cxr_search.errors import CxrSearchError, InputFileError
from cxr_search.fileio import atomic_write, emit_json, write_text_atomic
from index.bench.commands import bench_app
from index.commands import index_app, search_app
from index.demo.defaults import DEFAULT_EPOCHS, DEFAULT_STUDIES
from train.commands import train_app

app = typer.Typer(
    name="cxr-search",
    help="Search engine for chest X-ray archives (CXR-CLIP dual encoders, FAISS, DICOM).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Inspect and convert model checkpoints.", no_args_is_help=True)
embed_app = typer.Typer(help="Embed images or texts into the shared space.", no_args_is_help=True)
data_app = typer.Typer(help="Prepare datasets, cache images, generate synthetic archives.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(embed_app, name="embed")
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(index_app, name="index")
app.add_typer(search_app, name="search")
app.add_typer(bench_app, name="bench")

console = Console(stderr=True)
#: Exit code of a file-system failure (OSError) that no more specific error covers.
OS_ERROR_EXIT = 9
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}


@app.callback()
def _root(verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More logging (-v info, -vv debug).")) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _writable_output(path: Path) -> None:
    """Fail before hours of work, not after, when ``path`` cannot be written (folder created here).

    Raises:
        OSError: The folder cannot be created or written to (the CLI prints it as one line).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path.parent, os.W_OK):
        raise PermissionError(errno.EACCES, "folder not writable", str(path.parent))


def _atomic_save_npy(path: Path, array: Any) -> None:
    import numpy as np

    with atomic_write(path, "wb") as fh:
        np.save(fh, array)


# ------------------------------------------------------------------------------------- model
@model_app.command("convert")
def model_convert(
    src: Path = typer.Argument(..., help="Released CXR-CLIP file (e.g. r50_mcc.tar) or a model directory."),
    out_dir: Path = typer.Argument(..., help="Output directory (config.json + model.safetensors + tokenizer)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer directory (Bio_ClinicalBERT)."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Convert a released checkpoint to our pickle-free format (do it once, then drop the pickle)."""
    from cxr_search.checkpoints import load_model, save_model

    t0 = time.perf_counter()
    model = load_model(src, tokenizer=tokenizer)
    out = save_model(model, out_dir)
    summary = {"source": str(src), "out": str(out), "fingerprint": model.provenance.get("fingerprint"),
               "seconds": round(time.perf_counter() - t0, 2)}
    if json_out:
        emit_json(summary)
    else:
        console.print(f"[green]converted[/green] {src} -> {out} (fingerprint {summary['fingerprint'][:12]})")


def model_summary(model: Any) -> Dict[str, Any]:
    """What ``model info`` reports, as a dict."""
    cfg = model.config
    return {
        "name": cfg.name,
        "image_tower": {"backend": cfg.image.backend, "name": cfg.image.name, "pooling": cfg.image.pooling,
                        "feature_dim": model.image_tower.feature_dim},
        "text_tower": {"layers": model.text_tower.transformer.config.num_hidden_layers,
                       "hidden": model.text_tower.feature_dim, "vocab_size": model.text_tower.vocab_size,
                       "pooling": cfg.text.pooling},
        "embed_dim": cfg.embed_dim,
        "parameters": model.num_parameters(),
        "preprocess": cfg.to_dict()["preprocess"],
        "tokenizer": None if model.tokenizer is None else {
            "vocab_size": model.tokenizer.vocab_size, "lowercase": model.tokenizer.lowercase,
            "max_length": model.tokenizer.max_length},
        "provenance": model.provenance,
    }


@model_app.command("info")
def model_info(
    src: str = typer.Argument(..., help="Released file, model directory, or preset name."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer directory."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """Architecture, parameter counts, embedding size, preprocessing, source hash and licence."""
    from cxr_search.checkpoints import load_model

    info = model_summary(load_model(src, tokenizer=tokenizer, require_tokenizer=False))
    if json_out:
        emit_json(info)
        return
    table = Table(title=f"model {src}", show_header=False)
    for key in ("name", "embed_dim"):
        table.add_row(key, str(info[key]))
    table.add_row("image tower", json.dumps(info["image_tower"]))
    table.add_row("text tower", json.dumps(info["text_tower"]))
    table.add_row("parameters", ", ".join(f"{k} {v:,}" for k, v in info["parameters"].items()))
    table.add_row("preprocess", json.dumps(info["preprocess"]))
    table.add_row("tokenizer", json.dumps(info["tokenizer"]))
    for key, value in info["provenance"].items():
        table.add_row(key, str(value))
    Console().print(table)


@app.command("presets")
def presets() -> None:
    """List the registered model presets."""
    from cxr_search.config import list_models

    for name in list_models():
        sys.stdout.write(name + "\n")


# ------------------------------------------------------------------------------------- embed
def expand_image_paths(paths: List[Path]) -> List[Path]:
    """Files as given; directories expanded recursively to image/DICOM files, sorted."""
    out: List[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            out.append(p)
        else:
            raise InputFileError(str(p), "no such file or directory")
    return out


@embed_app.command("images")
def embed_images(
    paths: List[Path] = typer.Argument(..., help="Image files (.png/.jpg/.dcm) or directories."),
    model: str = typer.Option(..., "--model", "-m", help="Released file, model directory, or preset."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .npy (float32 [N, D]); row order in OUT.paths.txt."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer directory (not needed for images)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 (CPU/GPU), fp16 (GPU) or auto (fastest accurate for the device)."),
    workers: int = typer.Option(0, "--workers", min=0, help="Decoding worker processes."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Embed images; writes L2-normalised float32 embeddings."""
    from cxr_search.checkpoints import load_model

    files = expand_image_paths(paths)
    if not files:
        raise InputFileError(None, "no image files found in the given paths (.png, .jpg, .jpeg, .dcm)")
    _writable_output(out)
    m = load_model(model, tokenizer=tokenizer, require_tokenizer=False)
    t0 = time.perf_counter()
    emb = m.embed_images(files, batch_size=batch_size, device=device, precision=precision,
                         num_workers=workers, progress=not json_out)
    secs = time.perf_counter() - t0
    _atomic_save_npy(out, emb)
    write_text_atomic(out.with_name(out.name + ".paths.txt"), "\n".join(map(str, files)) + "\n")
    summary = {"count": len(files), "dim": int(emb.shape[1]), "out": str(out), "seconds": round(secs, 3),
               "items_per_s": round(len(files) / secs, 2) if secs > 0 else None, "precision": precision}
    if json_out:
        emit_json(summary)
    else:
        console.print(f"embedded {len(files)} images -> {out} [{emb.shape[0]}x{emb.shape[1]}] in {secs:.1f}s")


@embed_app.command("texts")
def embed_texts(
    texts: Optional[List[str]] = typer.Argument(None, help="Texts to embed."),
    model: str = typer.Option(..., "--model", "-m", help="Released file, model directory, or preset."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .npy (float32 [N, D])."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Read texts from this file, one per line."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer directory."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    device: str = typer.Option("auto", "--device"),
    precision: str = typer.Option("fp32", "--precision"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Embed texts; writes L2-normalised float32 embeddings in input order."""
    from cxr_search.checkpoints import load_model

    items = list(texts or [])
    if file is not None:
        if not file.is_file():
            raise InputFileError(str(file), "no such file")
        items += [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not items or not all(t.strip() for t in items):
        raise InputFileError(None, "no texts given (pass texts as arguments or --file) or an empty text")
    _writable_output(out)
    m = load_model(model, tokenizer=tokenizer)
    t0 = time.perf_counter()
    emb = m.embed_texts(items, batch_size=batch_size, device=device, precision=precision, progress=not json_out)
    secs = time.perf_counter() - t0
    _atomic_save_npy(out, emb)
    summary = {"count": len(items), "dim": int(emb.shape[1]), "out": str(out), "seconds": round(secs, 3)}
    if json_out:
        emit_json(summary)
    else:
        console.print(f"embedded {len(items)} texts -> {out} [{emb.shape[0]}x{emb.shape[1]}] in {secs:.1f}s")


# -------------------------------------------------------------------------------------- data
@data_app.command("prepare")
def data_prepare(
    dataset: str = typer.Argument(..., help="mimic-cxr, chexpert, chestxray14, openi, vindr-cxr, rsna-pneumonia, "
                                            "siim-acr, chexpert5x200 or pacs."),
    root: Path = typer.Argument(..., help="The dataset folder, as downloaded (never modified)."),
    out: Path = typer.Option(..., "--out", "-o", help="Manifest CSV to write."),
    option: List[str] = typer.Option([], "--option", "-O", help="Adapter option key=value, e.g. reports-csv=ris.csv "
                                                               "(repeatable; see the adapter's docs)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Turn a dataset (or a PACS export) into a manifest; prints studies, images, reports and skips."""
    from cxr_search.datasets import prepare, write_manifest
    from cxr_search.errors import ConfigError

    options: Dict[str, Any] = {}
    for item in option:
        if "=" not in item:
            raise ConfigError(f"--option expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        options[key.strip()] = value
    result = prepare(dataset, root, **options)
    write_manifest(result.rows, out)
    summary = {**result.summary, "manifest": str(out)}
    if json_out:
        emit_json(summary)
        return
    table = Table(title=f"{dataset}: {root} -> {out}", show_header=False)
    for key in ("studies", "images", "patients", "reports", "labelled_images", "skipped"):
        table.add_row(key, str(summary.get(key)))
    for split, counts in summary.get("splits", {}).items():
        table.add_row(f"split {split}", f"{counts['studies']} studies, {counts['images']} images")
    for reason, count in summary.get("skipped_reasons", {}).items():
        table.add_row(f"skipped: {reason}", str(count))
    Console().print(table)
    for note in summary.get("notes", []):
        console.print(f"note: {note}")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Argument(..., help="Empty or new output folder."),
    studies: int = typer.Option(200, "--studies", min=1, help="Number of studies."),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed writes the same bytes."),
    layout: str = typer.Option("pacs", "--layout", help="pacs (DICOM + RIS CSV), mimic or openi."),
    broken: int = typer.Option(0, "--broken", min=0, help="Broken files to mix in (pacs)."),
    image_size: int = typer.Option(512, "--image-size", min=64, help="Shorter image side in pixels."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Generate a synthetic chest X-ray archive with reports and ground-truth labels."""
    import dataclasses

    from cxr_search.synth import synthesize

    summary = dataclasses.asdict(synthesize(out, studies=studies, seed=seed, layout=layout, broken=broken,
                                            image_size=image_size))
    if json_out:
        emit_json(summary)
        return
    console.print(
        f"wrote {summary['studies']} studies, {summary['images']} images, {summary['reports']} reports "
        f"({summary['layout']} layout, {summary['broken']} broken files) to {out} in {summary['seconds']:.1f}s"
    )
    console.print("findings: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["finding_counts"].items())))


@data_app.command("cache")
def data_cache(
    manifest: Path = typer.Argument(..., help="Manifest CSV from `data prepare`."),
    out: Path = typer.Option(..., "--out", "-o", help="Cache folder (resumable: rerun to continue)."),
    shorter_side: int = typer.Option(512, "--shorter-side", min=32),
    workers: int = typer.Option(2, "--workers", min=1),
    manifest_out: Optional[Path] = typer.Option(None, "--manifest-out", help="Manifest pointing at the cached "
                                                                           "copies (default OUT/manifest.csv)."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Write resized 8-bit copies of a manifest's images so training does not decode DICOMs every epoch."""
    from cxr_search.cache import build_cache
    from cxr_search.datasets import read_manifest, write_manifest

    rows = read_manifest(manifest)
    result = build_cache(rows, out, shorter_side=shorter_side, workers=workers, progress=not json_out)
    target = manifest_out or out / "manifest.csv"
    write_manifest(result.rows, target)
    if json_out:
        emit_json({"cached": result.cached, "reused": result.reused, "images": len(result.rows),
                    "failed": [{"path": str(p), "reason": r} for p, r in result.failed], "out": str(out),
                    "manifest": str(target)})
    else:
        console.print(f"{result.summary()}; manifest {target}")


# -------------------------------------------------------------------------------------- demo
def _demo_train(request: Any) -> Dict[str, Any]:
    """The demo's training step (index/ must not import train/, so the CLI injects it): resumes a killed run."""
    from cxr_search.config import nest_overrides
    from train.config import get_recipe
    from train.trainer import train

    cfg = get_recipe(request.recipe, **nest_overrides(request.overrides))
    return train(cfg, [request.manifest], request.run_dir, resume=True, progress=request.progress).to_dict()


def _demo_tables(result: Any) -> None:
    from rich.markup import escape

    con = Console()
    r = result.to_dict()
    t = Table(title=f"cxr-search demo -> {r['out_dir']}")
    for col in ("stage", "seconds", ""):
        t.add_column(col, justify="right" if col == "seconds" else "left")
    for stage, secs in r["timings_s"].items():
        t.add_row(stage, f"{secs:.1f}", "reused" if r["reused"].get(stage) else "")
    con.print(t)
    split = r["split"]["splits"]
    t = Table(title="archive, hold-out and index", show_header=False)
    t.add_row("archive", f"{r['archive']['studies']} studies, {r['archive']['images']} images, "
                         f"{r['archive']['patients']} patients, {len(r['archive']['broken_files'])} broken files")
    for name, c in split.items():
        t.add_row(f"split {name}", f"{c['patients']} patients, {c['studies']} studies, {c['images']} images")
    totals = r["index"]["totals"]
    t.add_row("index", f"{totals['images']} images, {totals['studies']} studies, {totals['sections']} report sections, "
                       f"{totals['failed']} failures")
    t.add_row("training", f"{r['training'].get('steps')} steps, {r['training'].get('epochs')} epochs, "
                          f"{r['training'].get('seconds')} s")
    t.add_row("model", f"{r['model_dir']} ({r['model_fingerprint'][:12]})")
    con.print(t)
    b = r["broken_files"]
    t = Table(title=f"not indexed: {b['recorded']} of the {b['mixed_in']} broken files mixed in recorded as failures"
                    + (f", {len(b['report_objects'])} pixel-less SR used as report source"
                       if b["report_objects"] else "")
                    + (f"; NOT recorded: {', '.join(b['not_recorded'])}" if b["not_recorded"] else ""))
    for col in ("file", "stage", "reason"):
        t.add_column(col, overflow="fold")
    for f in r["failures"]:
        reason = f["reason"] if len(f["reason"]) <= 110 else f["reason"][:109] + "…"
        t.add_row(escape(f["path"]), f["stage"], escape(reason))
    con.print(t)
    for q in r["queries"]:
        score = f" ({q['relevant']}/{len(q['hits'])} relevant)" if q["relevant"] is not None else ""
        query = f"held-out DICOM …/{Path(q['query']).name}" if q["query_image"] else repr(q["query"])
        filt = f" [{' '.join(q['filters'])}]" if q["filters"] else ""
        t = Table(title=escape(f"{q['kind']}{filt}: {query}{score}"))
        if q["query_image"]:
            t.caption = escape(f"query study's truth: {q['query_truth']}; its own patient is excluded")
        for col in ("#", "score", "view", "truth", "report"):
            t.add_column(col, overflow="fold")
        for h in q["hits"]:
            mark = {True: "[green]", False: "[red]"}.get(h["relevant"], "")
            text = (f"[{h['section']}] " if h["section"] else "") + str(h["text"] or "")
            t.add_row(str(h["rank"]), f"{h['score']:.3f}", h["view"] or "", f"{mark}{escape(h['truth'] or '')}",
                      escape(text[:140]))
        con.print(t)
    ret = r["retrieval"]
    t = Table(title=f"retrieval benchmark on the held-out split ({ret['protocol']} protocol: {ret['studies']} studies, "
                    f"{ret['images']} images, {ret['unique_texts']} distinct texts)")
    for col in ("level", "direction", "R@1", "R@5", "R@10", "R@10 95% CI", "mean rank"):
        t.add_column(col, justify="left" if col in ("level", "direction") else "right")
    for level, key in (("image", "image_level"), ("study", "study_level")):
        for direction, m in (ret.get(key) or {}).get("dedup", {}).items():
            ci = m.get("ci95", {}).get("R@10")
            t.add_row(level, direction.replace("_to_", " → "), *(f"{m[k]:.3f}" for k in ("R@1", "R@5", "R@10")),
                      f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "", f"{m['mean_rank']:.1f}")
    con.print(t)
    con.print(f"gallery: {r['gallery']}   (summary: {Path(r['out_dir']) / 'summary.json'})")


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Demo folder; a rerun reuses what it holds."),
    studies: int = typer.Option(DEFAULT_STUDIES, "--studies", min=20, help="Studies in the synthetic archive."),
    seed: int = typer.Option(0, "--seed", help="Seed of the archive and the patient hold-out."),
    epochs: int = typer.Option(DEFAULT_EPOCHS, "--epochs", min=1, help="Training epochs of tiny-synth."),
    set_: List[str] = typer.Option([], "--set", "-s", help="Extra training override key=value (as `train --set`)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
) -> None:
    """Synthetic PACS archive -> train tiny-synth -> index -> example queries + HTML gallery -> Recall@K."""
    from cxr_search.config import parse_set_pairs
    from index.demo.run import DemoOptions, run_demo

    # Flat dotted keys: the demo merges them over its own training overrides and fingerprints them.
    opts = DemoOptions(studies=studies, seed=seed, epochs=epochs, train_overrides=parse_set_pairs(set_),
                       progress=progress)
    result = run_demo(out, train_fn=_demo_train, options=opts,
                      say=lambda msg: console.print(f"[bold]demo[/bold] {msg}"))
    if json_out:
        emit_json(result.to_dict())
    else:
        _demo_tables(result)


# -------------------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> int:
    """Console-script entry point: run the app, turning user errors into one line and an exit code."""
    try:
        # Without standalone mode click returns the code of typer.Exit (e.g. `index verify` finding problems).
        rc = app(args=argv, standalone_mode=False)
    except CxrSearchError as exc:
        console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        return 130
    except OSError as exc:  # the file system refused: an output folder that cannot exist, a full disk, permissions
        logging.getLogger("cxr_search.cli").debug("file system error", exc_info=True)  # traceback with -vv
        where = f"{exc.filename}: " if exc.filename else ""
        console.print(f"[bold red]error:[/bold red] {where}{exc.strerror or exc}; check the path, its permissions "
                      "and the free disk space", highlight=False, soft_wrap=True)
        return OS_ERROR_EXIT
    except Exception as exc:  # usage errors: a missing option, an unknown one, a bad value
        usage_errors, aborts = _click_exception_types()
        if isinstance(exc, usage_errors):
            exc.show()  # "Usage: ...", "Try ... --help" and the error, as click prints it
            return exc.exit_code
        if isinstance(exc, aborts):
            return 1
        raise
    return rc if isinstance(rc, int) else 0


def _click_exception_types() -> Tuple[Tuple[type, ...], Tuple[type, ...]]:
    """``(ClickException classes, Abort classes)`` of the click that typer runs on.

    typer >= 0.24 carries its own copy of click (``typer._click``) whose exceptions are not the installed
    click's; older typer uses click itself. Both are collected, so a usage error never ends in a traceback.
    """
    usage: List[type] = []
    aborts: List[type] = []
    for name in ("typer._click.exceptions", "click.exceptions", "typer.exceptions"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        usage += [getattr(module, "ClickException")] if hasattr(module, "ClickException") else []
        aborts += [getattr(module, "Abort")] if hasattr(module, "Abort") else []
    return tuple(usage), tuple(aborts)


if __name__ == "__main__":
    sys.exit(main())
