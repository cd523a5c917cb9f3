"""Helpers of the training tests: a tiny synthetic MIMIC-layout manifest and fast recipe settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from cxr_search.datasets import prepare, write_manifest
from cxr_search.synth import synthesize


def make_manifest(root: Path, studies: int = 24, seed: int = 3) -> Path:
    """Synthesize a small MIMIC-layout archive at 64 px and write its manifest; every row is ``train``."""
    synthesize(root / "archive", studies=studies, seed=seed, layout="mimic", image_size=64)
    rows = prepare("mimic-cxr", root / "archive").rows
    for r in rows:
        r.split = "train"
    path = root / "manifest.csv"
    write_manifest(rows, path)
    return path


def fast_overrides(**extra: Any) -> Dict[str, Any]:
    """Overrides of ``tiny-synth`` that keep a run to seconds: batch 8, no workers, no dropout."""
    out: Dict[str, Any] = {
        "model_overrides": {
            "text": {"bert_config": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}},
        },
        "init": {"vocab_size": 200},
        "data": {"num_workers": 0, "val_split": "train", "max_val_studies": 8},
        "optim": {"batch_size": 8, "epochs": 2, "warmup_epochs": 0.5},
        "checkpoint_every": 2,
        "eval_every_epochs": 1,
        "log_every": 1,
    }
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out
