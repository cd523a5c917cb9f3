"""Comparisons of floating-point results that hold on any x86-64 CPU and any torch/BLAS/FAISS build.

Two kernels computing the same float32 quantity (a batch and one item at a time, channels-last and
contiguous, two processes and one, FAISS and numpy) round differently, and which kernel a machine runs
depends on its vector units (AVX2, AVX-512), its thread count and the library build. An element-wise
relative tolerance then fails on near-zero elements, whose relative rounding error is unbounded. These
helpers compare what rounding cannot move much: a whole tensor's error relative to its norm, and a
ranking up to near-ties.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


def _as_float64(x: Any) -> np.ndarray:
    """A torch tensor or array-like as a float64 numpy array (torch is imported only when given one)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def relative_error(actual: Any, expected: Any, *, floor: float = 0.0) -> float:
    """``||actual - expected|| / max(||expected||, floor)`` over the whole tensor (Frobenius norms, float64).

    Args:
        actual: Tensor or array.
        expected: Tensor or array of the same shape.
        floor: Smallest norm to divide by, for tensors whose expected value is (near) zero.

    Returns:
        The relative error; 0.0 when both are exactly zero.
    """
    a, e = _as_float64(actual), _as_float64(expected)
    if a.shape != e.shape:
        raise AssertionError(f"shapes differ: {a.shape} != {e.shape}")
    diff = float(np.linalg.norm((a - e).ravel()))
    scale = max(float(np.linalg.norm(e.ravel())), floor)
    if diff == 0.0:
        return 0.0
    return diff / scale if scale > 0 else float("inf")


def assert_relative_close(actual: Any, expected: Any, rtol: float, *, floor: float = 0.0, msg: str = "") -> None:
    """Assert ``||actual - expected|| <= rtol * max(||expected||, floor)`` (see :func:`relative_error`).

    Args:
        actual: Tensor or array.
        expected: Tensor or array of the same shape.
        rtol: Largest relative error of the whole tensor; the caller justifies it in a comment.
        floor: Smallest norm to measure against (tensors whose true value is zero hold only rounding noise).
        msg: Prefix of the failure message (e.g. a parameter name).
    """
    err = relative_error(actual, expected, floor=floor)
    assert err <= rtol, f"{msg + ': ' if msg else ''}relative error {err:.3e} > {rtol:.1e}"


def assert_same_ranking(got_ids: Any, want_ids: Any, exact_score: Callable[[int, np.ndarray], np.ndarray],
                        tie_tol: float) -> None:
    """Assert two ``[Q, k]`` id rankings agree except where neighbours are tied within ``tie_tol``.

    Two kernels may order neighbours whose exact scores differ by less than their rounding error either
    way, so a position may hold another id only when that id's exact score is within ``tie_tol`` of the
    expected id's. Padding (``-1``) must match exactly and no row may repeat an id.

    Args:
        got_ids: Ids returned by the code under test.
        want_ids: Ids of the reference, best first.
        exact_score: ``(query row, ids) -> float64 scores`` computed exactly (e.g. in float64).
        tie_tol: Score difference below which two neighbours count as tied; the caller justifies it.
    """
    got, want = np.atleast_2d(np.asarray(got_ids)), np.atleast_2d(np.asarray(want_ids))
    assert got.shape == want.shape, f"shapes differ: {got.shape} != {want.shape}"
    for r in range(len(got)):
        hits = got[r][got[r] >= 0]
        assert len(set(hits.tolist())) == len(hits), f"query {r}: repeated ids {got[r].tolist()}"
        diff = np.flatnonzero(got[r] != want[r])
        if diff.size == 0:
            continue
        assert (got[r, diff] >= 0).all() and (want[r, diff] >= 0).all(), (
            f"query {r}: {got[r].tolist()} != {want[r].tolist()} (padding differs)")
        gap = np.abs(exact_score(r, got[r, diff]) - exact_score(r, want[r, diff]))
        assert gap.max() <= tie_tol, (
            f"query {r}: ids {got[r, diff].tolist()} instead of {want[r, diff].tolist()}, exact scores "
            f"{gap.max():.2e} apart (> tie tolerance {tie_tol:.1e})")
