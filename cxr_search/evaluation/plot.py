"""Recall@K curves as a PNG (optional extra: ``pip install 'cxr-search[plot]'``)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np

from cxr_search.errors import ConfigError


def recall_curve(ranks: np.ndarray, max_k: int) -> np.ndarray:
    """Recall@K for K = 1..max_k: ``out[k-1]`` is the share of ranks <= k."""
    ranks = np.asarray(ranks)
    counts = np.bincount(np.minimum(ranks, max_k + 1), minlength=max_k + 2)[1 : max_k + 1]  # [max_k]
    return np.cumsum(counts) / max(len(ranks), 1)


def plot_recall_curves(ranks: Dict[str, np.ndarray], out: Path, *, title: str, max_k: int = 50) -> Path:
    """Write a PNG with one Recall@K curve per direction.

    Raises:
        ConfigError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers; must precede pyplot
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib: pip install 'cxr-search[plot]'") from exc
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ks = np.arange(1, max_k + 1)
    for name, r in ranks.items():
        ax.plot(ks, recall_curve(r, max_k), label=name.replace("_", " "))
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_ylim(0, 1)
    ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out)
    return out
