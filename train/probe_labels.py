"""Linear-probe targets: label matrix with a known-label mask, seeded label subsets, masked BCE.

Pure functions of manifest rows and tensors, used by :mod:`train.probe`; AUROC comes from
:mod:`cxr_search.evaluation.classification_metrics`.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from cxr_search.datasets.manifest import ManifestRow
from cxr_search.errors import ConfigError, DatasetError

__all__ = ["UNCERTAIN_POLICIES", "label_matrix", "masked_bce", "subsample"]

#: How an uncertain (-1) label counts: left out of the loss, a known 0, or a known 1.
UNCERTAIN_POLICIES = ("mask", "zero", "one")


def label_matrix(
    rows: Sequence[ManifestRow], classes: Optional[Sequence[str]] = None, *, uncertain: str = "mask"
) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """Targets and known-label mask of manifest rows.

    Args:
        rows: Manifest rows; ``row.labels`` maps label -> 1.0 / 0.0 / -1.0, absent = not mentioned.
        classes: Columns to build; default: every label name found in ``rows``, in order of first
            appearance (rows keep their vocabulary's order, so this is the vocabulary order).
        uncertain: ``mask`` (default) drops -1 from the loss, ``zero`` / ``one`` turn it into a
            known 0 / 1 (``zero`` is what the reference code does).

    Returns:
        ``(classes, targets, mask)``: targets float32 ``[N, C]`` in {0, 1}; mask float32 ``[N, C]``,
        1 where the label is known.

    Raises:
        DatasetError: No classes (none given, none found in the rows).
        ConfigError: Unknown ``uncertain`` policy.
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise ConfigError(f"unknown uncertain-label policy {uncertain!r}; valid: {', '.join(UNCERTAIN_POLICIES)}")
    if classes is None:
        seen: Dict[str, None] = {}
        for row in rows:
            for name in row.labels:
                seen.setdefault(name, None)
        classes = list(seen)
    classes = list(classes)
    if not classes:
        raise DatasetError(
            f"no label classes among {len(rows)} manifest rows: the probe needs rows with a 'labels' column "
            "(label -> 1/0/-1); prepare a labelled dataset (e.g. rsna-pneumonia, siim-acr, vindr-cxr)"
        )
    index = {name: j for j, name in enumerate(classes)}
    targets = np.zeros((len(rows), len(classes)), dtype=np.float32)  # [N, C]
    mask = np.zeros((len(rows), len(classes)), dtype=np.float32)  # [N, C]
    for i, row in enumerate(rows):
        for name, value in row.labels.items():
            j = index.get(name)
            if j is None or value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            if value == -1.0:
                if uncertain == "mask":
                    continue
                value = 0.0 if uncertain == "zero" else 1.0
            targets[i, j] = 1.0 if value == 1.0 else 0.0
            mask[i, j] = 1.0
    return classes, targets, mask


def subsample(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random ``fraction`` of ``range(n)``.

    The size is ``round(fraction * n)`` (pandas ``sample(frac=...)``, which the reference uses), at
    least 1 when ``n > 0``.

    Raises:
        ConfigError: ``fraction`` outside (0, 1].
    """
    if not (0.0 < fraction <= 1.0):
        raise ConfigError(f"label fraction must be in (0, 1], got {fraction}; the reference protocol uses 0.1 and 1.0")
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    if fraction >= 1.0:
        return np.arange(n, dtype=np.int64)
    k = min(n, max(1, int(round(fraction * n))))
    picked = np.random.default_rng(seed).permutation(n)[:k]
    return np.sort(picked).astype(np.int64)


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over the known entries only.

    Args:
        logits: ``[B, C]``.
        targets: ``[B, C]`` in {0, 1}.
        mask: ``[B, C]``, 1 where the label is known.

    Returns:
        Scalar; 0 (with a gradient path) when nothing is known.
    """
    # softplus(x) - t*x is BCE-with-logits (stable for both signs). F.binary_cross_entropy_with_logits
    # goes through log_sigmoid, whose CPU kernel opens a thread pool even for a few hundred entries:
    # measured 6 ms vs 3 us per call on a busy 2-core machine, i.e. most of a 300-epoch probe.
    per_entry = F.softplus(logits) - targets * logits  # [B, C]
    known = mask.sum()
    return (per_entry * mask).sum() / known.clamp_min(1.0)

