"""Retrieval quality on held-out synthetic studies, scored against the generator's ground truth.

One image and one text per study: the first frontal image of the study (manifest order) and its
report text by the reference "longest" rule (the longer of findings and impression). Metrics:

* Recall@1/5/10 image->text and text->image (a study's own text / image is its positive);
* label-precision@10 in both directions: the share of the top 10 whose finding set equals the
  query's. Finding sets are the synthetic archive's ground truth, over the eight findings the
  generator draws as primary findings (:data:`cxr_search.synth.findings.FINDINGS`) by default, or
  over those plus the incidental extras (``findings="all"``).

Because a pool of N studies holds few studies with a rare combination of findings, even a perfect
model scores below 1; :func:`evaluate_heldout` reports that ceiling (``label_precision_oracle``).
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Union

import numpy as np

from cxr_search.datasets.manifest import ManifestRow
from cxr_search.errors import DatasetError
from cxr_search.evaluation.retrieval_metrics import label_precision_at_k, positive_ranks, recall_at_k
from cxr_search.reports import choose_report_text
from cxr_search.synth.findings import EXTRAS, FINDINGS

logger = logging.getLogger(__name__)

__all__ = ["HeldoutStudy", "evaluate_heldout", "heldout_studies", "oracle_label_precision"]

_FRONTAL = ("PA", "AP")


@dataclass(frozen=True)
class HeldoutStudy:
    """One evaluation item: a study's image, text and ground-truth finding set."""

    study_id: str
    image_path: str
    text: str
    findings: FrozenSet[str]


def _finding_sets(ground_truth: Union[str, Path], columns: Sequence[str]) -> Dict[str, FrozenSet[str]]:
    path = Path(ground_truth)
    try:
        with path.open("r", encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the ground truth ({exc})") from exc
    if rows and not all(c in rows[0] for c in columns):
        raise DatasetError(f"{path}: not a synthetic ground_truth.csv (finding columns missing)")
    out: Dict[str, FrozenSet[str]] = {}
    for r in rows:
        out[r["study_id"]] = frozenset(c for c in columns if r.get(c) == "1")
    return out


def heldout_studies(
    rows: Sequence[ManifestRow], ground_truth: Union[str, Path], *, findings: str = "primary",
    split: Optional[str] = None,
) -> List[HeldoutStudy]:
    """One :class:`HeldoutStudy` per study of the manifest rows that has a frontal image and a report.

    Args:
        rows: Manifest rows of a synthetic archive (any layout; ``data cache`` output works).
        ground_truth: The archive's ``ground_truth.csv``.
        findings: ``"primary"`` (the eight primary findings) or ``"all"`` (with the extras).
        split: Keep only this manifest split (None = all rows).

    Raises:
        DatasetError: Unknown ``findings`` mode, unreadable ground truth, or no usable study.
    """
    if findings not in ("primary", "all"):
        raise DatasetError(f"findings must be 'primary' or 'all', got {findings!r}")
    columns = list(FINDINGS) + (list(EXTRAS) if findings == "all" else [])
    truth = _finding_sets(ground_truth, columns)
    by_study: Dict[str, List[ManifestRow]] = {}
    for r in rows:
        if split is None or r.split == split:
            by_study.setdefault(r.study_id, []).append(r)
    out: List[HeldoutStudy] = []
    for sid, group in by_study.items():
        frontal = [r for r in group if r.view in _FRONTAL]
        text = choose_report_text(group[0].get("findings") or None, group[0].get("impression") or None)
        if not frontal or not text or sid not in truth:
            continue
        out.append(HeldoutStudy(sid, frontal[0].image_path, text, truth[sid]))
    if not out:
        raise DatasetError("no held-out study with a frontal image, a report and ground truth")
    return out


def oracle_label_precision(sets: Sequence[FrozenSet[str]], k: int = 10) -> float:
    """Label-precision@k of a perfect model on this pool (the query's own study counts as a hit)."""
    counts = Counter(sets)
    return float(np.mean([min(counts[s], k) / k for s in sets]))


def evaluate_heldout(
    embedder: Any, studies: Sequence[HeldoutStudy], *, k: int = 10, progress: bool = False,
) -> Dict[str, float]:
    """Recall@1/5/10 and label-precision@k in both directions for a model on held-out studies.

    Args:
        embedder: A :class:`cxr_search.inference.Embedder` whose model has a tokenizer (its batch sizes,
            workers, device and precision are the embedding's), or anything with its ``embed_images`` /
            ``embed_texts``.
        studies: From :func:`heldout_studies`.
        k: Cut-off of label precision.
        progress: Show a progress bar while embedding images.

    Returns:
        ``i2t_R@1/5/10``, ``t2i_R@1/5/10``, ``i2t_label_precision@k``, ``t2i_label_precision@k``,
        ``label_precision_oracle@k``, ``studies``.
    """
    images = embedder.embed_images([s.image_path for s in studies], progress=progress)
    texts = embedder.embed_texts([s.text for s in studies])
    img = np.asarray(images, dtype=np.float32)  # [N, D]
    txt = np.asarray(texts, dtype=np.float32)  # [N, D]
    labels = [s.findings for s in studies]
    own = [[i] for i in range(len(studies))]
    out: Dict[str, float] = {}
    for name, (q, c) in {"i2t": (img, txt), "t2i": (txt, img)}.items():
        for key, v in recall_at_k(positive_ranks(q, c, own)).items():
            out[f"{name}_{key}"] = v
        out[f"{name}_label_precision@{k}"] = label_precision_at_k(q, c, labels, labels, k)
    out[f"label_precision_oracle@{k}"] = oracle_label_precision(labels, k)
    out["studies"] = float(len(studies))
    return out
