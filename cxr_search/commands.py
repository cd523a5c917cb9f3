"""Command groups of the core: ``model`` (inspect, convert), ``embed`` (images, texts), ``data`` (prepare, synth,
cache) and ``presets``. ``cli.py`` mounts them on the ``cxr-search`` app.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import typer
from rich.table import Table

from cxr_search.cli_options import (
    DEVICE_HELP,
    JSON_HELP,
    MODEL_HELP,
    TOKENIZER_HELP,
    check_device,
    check_precision,
)
from cxr_search.errors import ConfigError, InputFileError
from cxr_search.fileio import atomic_write, emit_json, write_text_atomic
from cxr_search.terminal import err_console as console
from cxr_search.terminal import out_console, styled

model_app = typer.Typer(help="Inspect and convert model checkpoints.", no_args_is_help=True)
embed_app = typer.Typer(help="Embed images or texts into the shared space.", no_args_is_help=True)
data_app = typer.Typer(help="Prepare datasets, cache images, generate synthetic archives.", no_args_is_help=True)



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
def _one(positional: Optional[Any], option: Optional[Any], what: str) -> Any:
    """The value given either as the positional argument or as its option (``--model``/``--out``), not both.

    Raises:
        ConfigError: Neither or both given.
    """
    if positional is not None and option is not None and str(positional) != str(option):
        raise ConfigError(f"{what} given twice ({positional} and {option}); give it once")
    value = positional if positional is not None else option
    if value is None:
        raise ConfigError(f"give the {what}")
    return value


@model_app.command("convert")
def model_convert(
    src: Optional[Path] = typer.Argument(None, help="Released CXR-CLIP file (e.g. r50_mcc.tar) or a model folder "
                                                    "(or --model)."),
    out_dir: Optional[Path] = typer.Argument(None, help="Output folder: config.json, model.safetensors, tokenizer "
                                                        "(or --out)."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="The model to convert (instead of SRC)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (instead of OUT_DIR)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Convert a released checkpoint to our pickle-free format (do it once, then drop the pickle).

    Example: cxr-search model convert r50_mcc.tar models/r50_mcc --tokenizer /models/Bio_ClinicalBERT
    """
    from cxr_search.checkpoints import load_model, save_model

    source = _one(src, model, "model to convert (SRC or --model)")
    target = _one(out_dir, out, "output folder (OUT_DIR or --out)")
    t0 = time.perf_counter()
    loaded = load_model(source, tokenizer=tokenizer)
    written = save_model(loaded, target)
    summary = {"source": str(source), "out": str(written), "fingerprint": loaded.provenance.get("fingerprint"),
               "seconds": round(time.perf_counter() - t0, 2)}
    if json_out:
        emit_json(summary)
    else:
        console.print(styled("converted ", "green"), f"{source} -> {written} (fingerprint {summary['fingerprint'][:12]})",
                      sep="")


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
    src: Optional[str] = typer.Argument(None, help="Released file, model folder or preset name (or --model)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP + " Instead of SRC."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Architecture, parameter counts, embedding size, preprocessing, source hash and licence.

    Example: cxr-search model info models/r50_mcc --json
    """
    from cxr_search.checkpoints import load_model

    source = _one(src, model, "model (SRC or --model)")
    info = model_summary(load_model(source, tokenizer=tokenizer, require_tokenizer=False))
    if json_out:
        emit_json(info)
        return
    table = Table(title=f"model {source}", show_header=False)
    table.add_column("", no_wrap=True)
    table.add_column("", overflow="fold")
    for key in ("name", "embed_dim"):
        table.add_row(key, str(info[key]))
    table.add_row("image tower", json.dumps(info["image_tower"]))
    table.add_row("text tower", json.dumps(info["text_tower"]))
    table.add_row("parameters", ", ".join(f"{k} {v:,}" for k, v in info["parameters"].items()))
    table.add_row("preprocess", json.dumps(info["preprocess"]))
    table.add_row("tokenizer", json.dumps(info["tokenizer"]))
    for key, value in info["provenance"].items():
        table.add_row(key, str(value))
    out_console.print(table)


def presets(json_out: bool = typer.Option(False, "--json", help="Print a JSON list on stdout.")) -> None:
    """List the registered model presets (a preset name works wherever a model is asked for).

    Example: cxr-search presets
    """
    from cxr_search.config import list_models

    names = list(list_models())
    if json_out:
        emit_json({"presets": names})
        return
    for name in names:
        out_console.print(name)


# ------------------------------------------------------------------------------------- embed
@embed_app.command("images")
def embed_images(
    paths: List[Path] = typer.Argument(..., help="Image files (.png/.jpg/DICOM) or folders (DICOM without "
                                                 "extension included)."),
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Output .npy (float32 [N, D]); row order in OUT.paths.txt."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer folder (not needed for images)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per forward pass."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 (CPU/GPU), fp16 (GPU) or auto (fastest "
                                                              "accurate for the device)."),
    workers: int = typer.Option(0, "--workers", min=0, help="Decoding worker processes."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Embed images; writes L2-normalised float32 embeddings.

    A file that cannot be read is reported (stderr, and "failed" in --json) and the others are embedded;
    the exit code is 5 only when no file could be embedded.

    Example: cxr-search embed images /pacs/export -m models/r50_mcc -o emb.npy --workers 2
    """
    from cxr_search.checkpoints import load_model
    from cxr_search.embed_files import embed_files, expand_image_paths
    from cxr_search.inference import Embedder

    check_device(device)
    check_precision(precision)
    files = expand_image_paths(paths)
    if not files:
        raise InputFileError(None, "no image files found in the given paths (.png, .jpg, .jpeg, DICOM)")
    _writable_output(out)
    embedder = Embedder(load_model(model, tokenizer=tokenizer, require_tokenizer=False), device=device,
                        precision=precision, batch_size=batch_size, num_workers=workers)
    t0 = time.perf_counter()
    result = embed_files(embedder, files, batch_size=batch_size, workers=workers, progress=not json_out)
    secs = time.perf_counter() - t0
    failed = [{"path": str(p), "reason": r} for p, r in result.failed]
    if not result.paths:
        first = result.failed[0]
        more = f" (and {len(failed) - 1} more unreadable files)" if len(failed) > 1 else ""
        raise InputFileError(str(first[0]), f"{first[1]}{more}; nothing was embedded")
    emb = result.vectors
    _atomic_save_npy(out, emb)
    write_text_atomic(out.with_name(out.name + ".paths.txt"), "\n".join(map(str, result.paths)) + "\n")
    summary = {"count": len(result.paths), "dim": int(emb.shape[1]), "out": str(out), "seconds": round(secs, 3),
               "items_per_s": round(len(result.paths) / secs, 2) if secs > 0 else None, "precision": precision,
               "failed": failed}
    if json_out:
        emit_json(summary)
        return
    for f in failed:
        console.print(styled("not embedded: ", "yellow"), f"{f['path']}: {f['reason']}", sep="")
    console.print(f"embedded {len(result.paths)} images -> {out} ({emb.shape[0]}x{emb.shape[1]}) in {secs:.1f}s"
                  + (f"; {len(failed)} files could not be read" if failed else ""))


@embed_app.command("texts")
def embed_texts(
    texts: Optional[List[str]] = typer.Argument(None, help="Texts to embed (or --file)."),
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Output .npy (float32 [N, D])."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Read texts from this file, one per line."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Texts per forward pass."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16, fp16, auto, or int8 (CPU)."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Embed texts; writes L2-normalised float32 embeddings in input order.

    Example: cxr-search embed texts "right pleural effusion" "no acute process" -m models/r50_mcc -o t.npy
    """
    from cxr_search.checkpoints import load_model
    from cxr_search.inference import Embedder

    check_device(device)
    check_precision(precision, text=True)
    items = list(texts or [])
    if file is not None:
        if not file.is_file():
            raise InputFileError(str(file), "no such file")
        items += [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not items:
        raise ConfigError("no texts given: pass texts as arguments or --file FILE (one text per line)")
    if not all(t.strip() for t in items):
        raise ConfigError("an empty text was given; every text must contain words")
    _writable_output(out)
    embedder = Embedder(load_model(model, tokenizer=tokenizer), device=device, text_batch_size=batch_size,
                        text_precision=precision)
    t0 = time.perf_counter()
    emb = embedder.embed_texts(items, progress=not json_out)
    secs = time.perf_counter() - t0
    _atomic_save_npy(out, emb)
    summary = {"count": len(items), "dim": int(emb.shape[1]), "out": str(out), "seconds": round(secs, 3)}
    if json_out:
        emit_json(summary)
    else:
        console.print(f"embedded {len(items)} texts -> {out} ({emb.shape[0]}x{emb.shape[1]}) in {secs:.1f}s")


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
    """Turn a dataset (or a PACS export) into a manifest; prints studies, images, reports and skips.

    Example: cxr-search data prepare pacs /pacs/export -o pacs.csv -O reports-csv=/pacs/reports.csv
    """
    from cxr_search.datasets import prepare, write_manifest

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
    table.add_column("", overflow="fold")
    table.add_column("", overflow="fold")
    for key in ("studies", "images", "patients", "reports", "labelled_images", "skipped"):
        table.add_row(key, str(summary.get(key)))
    for split, counts in summary.get("splits", {}).items():
        table.add_row(f"split {split}", f"{counts['studies']} studies, {counts['images']} images")
    views = summary.get("views")
    if views:  # the query-image rule of the retrieval benchmark needs them (frontal first)
        table.add_row("views", ", ".join(f"{view or 'unknown'} {count}" for view, count in views.items()))
    for reason, count in summary.get("skipped_reasons", {}).items():
        table.add_row(f"skipped: {reason}", str(count))
    out_console.print(table)
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
    """Generate a synthetic chest X-ray archive with reports and ground-truth labels.

    Example: cxr-search data synth synth-archive --studies 50 --broken 3
    """
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
    shorter_side: int = typer.Option(512, "--shorter-side", min=32, help="Shorter side of the cached copies, in pixels."),
    workers: int = typer.Option(2, "--workers", min=1, help="Decoding worker processes."),
    manifest_out: Optional[Path] = typer.Option(None, "--manifest-out", help="Manifest pointing at the cached "
                                                                           "copies (default OUT/manifest.csv)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Write resized 8-bit copies of a manifest's images so training does not decode DICOMs every epoch.

    Example: cxr-search data cache mimic.csv -o /cache/mimic-512 --workers 8
    """
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
