"""Seeded, patient-disjoint splits.

Every split this package makes assigns whole patients (the unit passed in is the patient), so no
patient is in two splits.

* :func:`gloria_split` reproduces GLoRIA's ``train_test_split(test_size=0.3, random_state=0)``
  followed by ``train_test_split(rest, test_size=0.5, random_state=0)`` (the first part of the
  second call is GLoRIA's *test* set, the second its *validation* set) with numpy's legacy
  ``RandomState`` exactly as scikit-learn's ``ShuffleSplit`` uses it, so no scikit-learn is needed.
  Given the same units in the same order, the assignment equals GLoRIA's.
* :func:`holdout_split` carves a seeded fraction of units out of a pool (ChestX-ray14 validation).
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Sequence, Set, Tuple

import numpy as np


def _shuffle_split(n: int, test_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's ``train_test_split(range(n), test_size=test_fraction, random_state=seed)`` indices."""
    n_test = math.ceil(test_fraction * n)
    n_train = n - n_test
    permutation = np.random.RandomState(seed).permutation(n)
    return permutation[n_test : n_test + n_train], permutation[:n_test]


def gloria_split(units: Sequence[str], *, test_fraction: float = 0.15, seed: int = 0) -> Dict[str, str]:
    """GLoRIA's 70/15/15 split of ``units`` (see the module docstring).

    Args:
        units: Distinct unit keys (patients) in the order GLoRIA's table had them.
        test_fraction: Fraction for each of validate and test.
        seed: ``random_state`` of both calls.

    Returns:
        unit -> ``"train"`` / ``"validate"`` / ``"test"``.

    Raises:
        ValueError: Duplicate units or a fraction outside (0, 0.5).
    """
    if not 0.0 < test_fraction < 0.5:
        raise ValueError(f"test_fraction must be in (0, 0.5), got {test_fraction}")
    if len(set(units)) != len(units):
        raise ValueError("units must be distinct (split patients, not images)")
    out: Dict[str, str] = {}
    if not units:
        return out
    train_idx, rest_idx = _shuffle_split(len(units), test_fraction * 2, seed)
    for i in train_idx:
        out[units[i]] = "train"
    # GLoRIA: test_df, valid_df = train_test_split(test_val_df, test_size=0.5, random_state=0)
    test_idx, valid_idx = _shuffle_split(len(rest_idx), 0.5, seed)
    for j in test_idx:
        out[units[rest_idx[j]]] = "test"
    for j in valid_idx:
        out[units[rest_idx[j]]] = "validate"
    return out


def holdout_split(units: Sequence[str], fraction: float, *, seed: int = 0) -> Set[str]:
    """A seeded random ``ceil(fraction * n)`` subset of distinct ``units`` (order-sensitive).

    Raises:
        ValueError: A fraction outside [0, 1).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    n = len(units)
    if n == 0 or fraction == 0.0:
        return set()
    permutation = np.random.RandomState(seed).permutation(n)
    return {units[i] for i in permutation[: math.ceil(fraction * n)]}


def unique_in_order(values: Iterable[str]) -> List[str]:
    """Distinct values in order of first appearance."""
    return list(dict.fromkeys(values))




__all__ = ["gloria_split", "holdout_split", "unique_in_order"]
