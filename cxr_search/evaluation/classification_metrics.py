"""Classification metrics as pure functions: AUROC, accuracy, F1 (binary, positive class = 1).

AUROC is computed from ranks (the Mann-Whitney U statistic): with tied scores given their average
rank, ``AUROC = (sum of positive ranks - P(P+1)/2) / (P N)``, which equals the area under the ROC
curve with ties counted as half (scikit-learn's ``roc_auc_score``). It is undefined when one class
is absent; :func:`auroc` then returns None so that callers can report it as such and leave it out of
averages.

F1 follows scikit-learn's default: ``2 TP / (2 TP + FP + FN)``, and 0.0 when there are neither
positives nor positive predictions.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np

ArrayLike = Union[Sequence[float], Sequence[int], Sequence[bool], np.ndarray]


def _binary(values: ArrayLike, name: str) -> np.ndarray:
    """A 1-D bool array from 0/1 (or bool) values.

    Raises:
        ValueError: Not one-dimensional, or a value other than 0 and 1.
    """
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if arr.size and not np.isin(arr, (0, 1)).all():
        bad = arr[~np.isin(arr, (0, 1))][0]
        raise ValueError(f"{name} must hold 0/1 values, found {bad!r}")
    return arr.astype(bool)


def _same_length(a: np.ndarray, b: np.ndarray) -> None:
    if len(a) != len(b):
        raise ValueError(f"inputs differ in length: {len(a)} vs {len(b)}")


def average_ranks(values: ArrayLike) -> np.ndarray:
    """1-based ranks of ``values`` with ties given the average of the ranks they span.

    Args:
        values: 1-D numbers.

    Returns:
        float64 ranks, aligned with ``values`` (``[10, 20, 20, 30]`` -> ``[1, 2.5, 2.5, 4]``).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"values must be one-dimensional, got shape {x.shape}")
    n = len(x)
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Start index of each run of equal values in sorted order; a run covering sorted positions
    # [s, e) gets ranks s+1 .. e, whose mean is (s + 1 + e) / 2.
    starts = np.flatnonzero(np.concatenate(([True], sorted_x[1:] != sorted_x[:-1])))
    ends = np.append(starts[1:], n)
    run_rank = (starts + 1 + ends) / 2.0
    run_of = np.repeat(np.arange(len(starts)), ends - starts)
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = run_rank[run_of]
    return ranks


def auroc(y_true: ArrayLike, scores: ArrayLike) -> Optional[float]:
    """Area under the ROC curve, ties counted as half (Mann-Whitney U / (P N)).

    Args:
        y_true: 0/1 labels (1 = positive).
        scores: Higher = more likely positive; finite.

    Returns:
        AUROC in [0, 1], or None when ``y_true`` has only one class (undefined).

    Raises:
        ValueError: Mismatched lengths, non-binary labels or non-finite scores.
    """
    y = _binary(y_true, "y_true")
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be one-dimensional, got shape {s.shape}")
    _same_length(y, s)
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite (found NaN or infinity)")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum = float(average_ranks(s)[y].sum())
    u = rank_sum - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def confusion_counts(y_true: ArrayLike, y_pred: ArrayLike) -> Tuple[int, int, int, int]:
    """(TP, FP, FN, TN) of binary predictions.

    Raises:
        ValueError: Mismatched lengths or non-binary values.
    """
    y = _binary(y_true, "y_true")
    p = _binary(y_pred, "y_pred")
    _same_length(y, p)
    tp = int(np.count_nonzero(y & p))
    fp = int(np.count_nonzero(~y & p))
    fn = int(np.count_nonzero(y & ~p))
    tn = int(np.count_nonzero(~y & ~p))
    return tp, fp, fn, tn


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Share of predictions equal to the labels (any hashable labels, e.g. class indices).

    Raises:
        ValueError: Mismatched lengths or no samples.
    """
    y = np.asarray(y_true)
    p = np.asarray(y_pred)
    _same_length(y, p)
    if len(y) == 0:
        raise ValueError("accuracy of zero samples is undefined")
    return float(np.count_nonzero(y == p)) / len(y)


def f1_score(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Binary F1 of the positive class: ``2 TP / (2 TP + FP + FN)``; 0.0 when that is 0/0.

    Raises:
        ValueError: Mismatched lengths or non-binary values.
    """
    tp, fp, fn, _ = confusion_counts(y_true, y_pred)
    denominator = 2 * tp + fp + fn
    return 0.0 if denominator == 0 else 2.0 * tp / denominator


__all__ = ["accuracy", "auroc", "average_ranks", "confusion_counts", "f1_score"]
