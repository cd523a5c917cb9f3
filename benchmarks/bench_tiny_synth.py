"""Train ``tiny-synth`` on a synthetic archive and score it on held-out synthetic studies.

Steps (each timed): synthesize a training archive (default 2,000 studies, seed 0) and a held-out
archive (500 studies, seed 1, other patients), prepare both as MIMIC-layout manifests, cache the
images at the model's size, train the recipe with the held-out studies as the validation split (so
``metrics.jsonl`` holds the held-out Recall@10 curve per epoch), then evaluate the final model on the
held-out studies: Recall@1/5/10 both directions and label-precision@10 (share of the top 10 whose
finding set equals the query's) with its ceiling on this pool.

Example:
    .venv/bin/python benchmarks/bench_tiny_synth.py --work /tmp/tiny-synth --out benchmarks/results/tiny-synth-cpu-2core.json
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
from pathlib import Path
from typing import Any, Dict

import torch

from cxr_search.cache import build_cache
from cxr_search.checkpoints import load_model
from cxr_search.config import parse_set_options
from cxr_search.datasets import prepare, read_manifest, write_manifest
from cxr_search.evaluation.synth_heldout import evaluate_heldout, heldout_studies
from cxr_search.fileio import emit_json, write_json_atomic
from cxr_search.inference import Embedder
from cxr_search.synth import synthesize
from train.config import get_recipe
from train.metrics_log import read_metrics
from train.state import list_step_checkpoints
from train.trainer import train

logger = logging.getLogger("bench_tiny_synth")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="Working folder (archives, caches, run).")
    ap.add_argument("--studies", type=int, default=2000)
    ap.add_argument("--heldout", type=int, default=500)
    ap.add_argument("--image-size", type=int, default=256, help="Rendered image size of the archives.")
    ap.add_argument("--recipe", default="tiny-synth")
    ap.add_argument("--run", default="run", help="Run folder name under --work (archives and caches are reused).")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="Recipe override key=value.")
    ap.add_argument("--curve-every", type=int, default=5, help="Keep a checkpoint every N epochs and score each "
                    "on the held-out studies (the learning curve).")
    ap.add_argument("--out", type=Path, help="Write the result JSON here.")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work: Path = args.work
    timings: Dict[str, float] = {}
    cfg = get_recipe(args.recipe, **parse_set_options(args.sets))
    # Checkpoints every --curve-every epochs, all kept: each is scored on the held-out studies afterwards.
    steps_per_epoch = args.studies // cfg.optim.batch_size  # approximate: studies without a report are dropped
    cfg = get_recipe(cfg, keep_last=10_000, checkpoint_every=max(1, steps_per_epoch * args.curve_every))
    from cxr_search.config import get_model_config

    crop = get_model_config(cfg.model, **cfg.model_overrides).preprocess.crop_size
    shorter = int(round(crop * 1.125))

    t = time.perf_counter()
    for name, n, seed in (("train-archive", args.studies, 0), ("heldout-archive", args.heldout, 1)):
        if not (work / name / "ground_truth.csv").is_file():  # reuse an archive of an earlier run
            synthesize(work / name, studies=n, seed=seed, layout="mimic", image_size=args.image_size)
    timings["synthesize_s"] = time.perf_counter() - t

    t = time.perf_counter()
    train_rows = build_cache(prepare("mimic-cxr", work / "train-archive").rows, work / f"cache{shorter}",
                             shorter_side=shorter, progress=False).rows
    held_rows = build_cache(prepare("mimic-cxr", work / "heldout-archive").rows, work / f"cache{shorter}",
                            shorter_side=shorter, progress=False).rows
    for r in train_rows:
        r["split"] = "train"  # the whole training archive trains
    for r in held_rows:
        r["split"] = "validate"  # the held-out archive is the validation curve
    manifest = work / "manifest.csv"
    write_manifest(list(train_rows) + list(held_rows), manifest)
    timings["prepare_and_cache_s"] = time.perf_counter() - t

    run = work / args.run
    t = time.perf_counter()
    result = train(cfg, [manifest], run, progress=False)
    timings["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    embedder = Embedder(load_model(run / "model"), batch_size=64)
    studies = heldout_studies(read_manifest(manifest, split="validate"), work / "heldout-archive" / "ground_truth.csv")
    final = evaluate_heldout(embedder, studies)
    extended = heldout_studies(read_manifest(manifest, split="validate"), work / "heldout-archive" / "ground_truth.csv",
                               findings="all")
    final_all = evaluate_heldout(embedder, extended)
    timings["evaluate_s"] = time.perf_counter() - t

    curve = []
    for ckpt in list_step_checkpoints(run):
        scores = evaluate_heldout(Embedder(load_model(ckpt / "model"), batch_size=64), studies)
        step = int(ckpt.name.split("-")[1])
        curve.append({"step": step, "epoch": round(step / max(1, result.total_steps) * cfg.optim.epochs, 2),
                      **{k: round(v, 4) for k, v in scores.items() if "R@10" in k or "precision" in k}})
    timings["curve_s"] = time.perf_counter() - t - timings["evaluate_s"]
    val_curve = [{k: r[k] for k in ("step", "epoch", "val_loss", "i2t_R@10", "t2i_R@10")}
                 for r in read_metrics(run, "val")]
    out: Dict[str, Any] = {
        "command": "benchmarks/bench_tiny_synth.py " + " ".join(f"--set {s}" for s in args.sets),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "recipe": cfg.to_dict(),
        "train_studies": args.studies, "heldout_studies": args.heldout,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "train": result.to_dict(),
        "heldout_curve": curve,
        "validation_log": val_curve,
        "heldout_final": {k: round(v, 4) for k, v in final.items()},
        "heldout_final_all_findings": {k: round(v, 4) for k, v in final_all.items()},
    }
    emit_json(out)
    if args.out:
        write_json_atomic(args.out, out)


if __name__ == "__main__":
    main()
