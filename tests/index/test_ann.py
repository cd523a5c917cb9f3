"""The FAISS layer (index/ann/vector_index.py, index/ann/factory.py) against brute-force numpy search."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

import index.ann.factory as ann_factory
from cxr_search.errors import SearchIndexError
from index.ann.build import build_index
from index.ann.factory import EXACT_THRESHOLD, candidate_factories, choose_factory, choose_nlist, parse_factory
from index.ann.reference import clustered_unit_vectors, exact_search, k_recall_at_k
from index.ann.vector_index import VectorIndex
from tests.helpers.numerics import assert_same_ranking

DIM = 64
N = 8000
GEN = dict(noise=0.08, n_clusters=N // 100, seed=3)  # mean nearest-neighbour cosine ~0.92 at 64-d


@pytest.fixture(scope="module")
def data():
    x = clustered_unit_vectors(N, DIM, **GEN)
    queries = clustered_unit_vectors(40, DIM, stream=1, **GEN)  # held out: same clusters, new draws
    ids = np.arange(N, dtype=np.int64) * 7 + 1000  # store keys, not row positions
    return x, ids, queries


@pytest.fixture(scope="module")
def ivf(data):
    x, ids, _ = data
    index, info = build_index(x, ids, factory="IVF64,SQ8", recall_queries=200)
    return index, info


def _filtered_exact(x, ids, queries, k, keep):
    mask = np.isin(ids, keep)
    return exact_search(x[mask], ids[mask], queries, k)


# FAISS and numpy score in float32 with different kernels. A 64-d dot product of unit vectors rounds by at
# most d * 2^-24 * sum|x_i q_i| <= 3.8e-6 (measured: 3.4e-7), so neighbours whose exact scores are closer
# than twice that may come in either order (the fixture's closest neighbours are 2e-6 apart).
TIE_TOL = 1e-5


def _same_ranking(got_ids, want_ids, x, ids, queries) -> None:
    """FAISS's ids equal the exact ones up to near-ties, judged by float64 scores."""
    row = {int(i): r for r, i in enumerate(ids)}
    x64, q64 = np.asarray(x, np.float64), np.atleast_2d(np.asarray(queries, np.float64))
    assert_same_ranking(got_ids, want_ids, lambda r, hit: x64[[row[int(i)] for i in hit]] @ q64[r], TIE_TOL)


# ------------------------------------------------------------------------------- reference helpers
def test_exact_search_matches_a_full_sort_and_pads() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    q = rng.standard_normal((5, 8)).astype(np.float32)
    ids = rng.permutation(10_000)[:300].astype(np.int64)
    s, i = exact_search(x, ids, q, 7)
    full = q @ x.T
    order = np.argsort(-full, axis=1)[:, :7]
    np.testing.assert_array_equal(i, ids[order])
    np.testing.assert_allclose(s, np.take_along_axis(full, order, 1), rtol=1e-6)
    s, i = exact_search(x[:3], ids[:3], q, 5)
    assert (i[:, 3:] == -1).all() and np.isneginf(s[:, 3:]).all() and (i[:, :3] >= 0).all()


def test_k_recall_at_k() -> None:
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert k_recall_at_k(np.array([[4, 3, 2, 1], [5, 6, 0, 0]]), exact, 4) == pytest.approx(0.75)
    assert k_recall_at_k(np.array([[1, -1]]), np.array([[1, -1]]), 2) == 1.0  # only 1 neighbour exists


def test_generator_is_seeded_unit_norm_and_clustered() -> None:
    a = clustered_unit_vectors(500, 32, seed=1)
    np.testing.assert_array_equal(a, clustered_unit_vectors(500, 32, seed=1))
    assert not np.allclose(a, clustered_unit_vectors(500, 32, seed=1, stream=1))
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert a.dtype == np.float32


# ------------------------------------------------------------------------------- choice of factory
def test_choose_factory_thresholds() -> None:
    assert choose_factory(10, 512) == "Flat"
    assert choose_factory(EXACT_THRESHOLD, 512) == "Flat"
    assert choose_factory(EXACT_THRESHOLD + 1, 512).startswith("PCAR")
    assert choose_factory(1_000_000, 512) == "PCAR112,IVF4096,SQ6"  # the benchmark's winner
    assert candidate_factories(1_000_000, 512) == ["PCAR112,IVF4096,SQ6", "PCAR88,IVF4096,SQ8",
                                                   "PCAR176,IVF4096,SQ4"]
    assert choose_factory(1_000_000, 512, bytes_per_vector=600) == "IVF4096,SQ8"
    assert choose_factory(1_000_000, 512, bytes_per_vector=3000) == "IVF4096,Flat"
    assert choose_factory(10_000_000, 512) == "PCAR120,IVF16384,SQ6"  # centroids cost less per vector
    assert choose_nlist(1_000_000) == 4096 and choose_nlist(200_001) == 2048 and choose_nlist(1000) == 16
    with pytest.raises(SearchIndexError, match="too small"):
        choose_factory(1_000_000, 512, bytes_per_vector=12)


def test_every_candidate_fits_its_budget_when_built(data, monkeypatch) -> None:
    x, ids, queries = data
    monkeypatch.setattr(ann_factory, "EXACT_THRESHOLD", 1000)
    cands = candidate_factories(N, DIM, bytes_per_vector=30)
    assert cands == ["PCAR24,IVF128,SQ6", "PCAR16,IVF128,SQ8", "PCAR32,IVF128,SQ4"]  # SQ4 on all 64-d: 44 B
    index, info = build_index(x, ids, bytes_per_vector=30, recall_queries=200)
    assert info["factory"] in cands and [c for c, _ in info["candidates"]] == cands
    assert info["bytes_per_vector"] <= 30 * 1.05
    assert info["recall_at_10"] > 0.3


@pytest.mark.parametrize("bad", ["IVF64,PQ8,RFlat", "IVF64,Flat,Refine(SQ8)", "IDMap,Flat", "LSH", "PCAR999,IVF8,SQ8"])
def test_unsupported_factories_are_refused(bad: str) -> None:
    with pytest.raises(SearchIndexError, match="factory"):
        VectorIndex.create(DIM, bad)


# ------------------------------------------------------------------------------- search quality
def test_flat_equals_exact(data) -> None:
    x, ids, queries = data
    index = VectorIndex.create(DIM, "Flat")
    index.add(x, ids)
    s, i = index.search(queries, 10)
    es, ei = exact_search(x, ids, queries, 10)
    _same_ranking(i, ei, x, ids, queries)
    np.testing.assert_allclose(s, es, atol=TIE_TOL)
    s1, i1 = index.search(queries[0], 10)  # one query as a 1-D vector
    _same_ranking(i1, ei[:1], x, ids, queries[:1])


def test_ivf_recall_against_exact(data, ivf) -> None:
    x, ids, queries = data
    index, info = ivf
    assert info["factory"] == "IVF64,SQ8" and info["search_params"]["nprobe"] >= 1
    assert info["recall_at_10"] >= 0.9 and info["target_met"] == (info["recall_at_10"] >= 0.95)
    got = index.search(queries, 10)[1]
    assert k_recall_at_k(got, exact_search(x, ids, queries, 10)[1]) >= 0.9


def test_uncentred_pca_keeps_inner_product_ranking(data) -> None:
    """FAISS's own PCA centres the data, which biases inner products; ours does not (ip_pca_matrix)."""
    x, ids, queries = data
    exact = exact_search(x, ids, queries, 10)[1]
    ours, _ = build_index(x, ids, factory="PCAR32,IVF16,SQ8", recall_queries=200)
    ours.set_search_params(nprobe=16)
    theirs = faiss.index_factory(DIM, "PCAR32,IVF16,SQ8", faiss.METRIC_INNER_PRODUCT)
    theirs.train(x)
    theirs.add_with_ids(x, ids)
    faiss.extract_index_ivf(theirs).nprobe = 16
    r_ours = k_recall_at_k(ours.search(queries, 10)[1], exact)
    r_theirs = k_recall_at_k(theirs.search(queries, 10)[1], exact)
    assert r_ours >= 0.75 and r_ours > r_theirs + 0.15


# ------------------------------------------------------------------------------- filters
@pytest.mark.parametrize("factory", ["Flat", "IVF64,SQ8", "HNSW16"])
def test_filters_return_k_hits_and_only_eligible_ids(data, factory: str) -> None:
    x, ids, queries = data
    index, _ = build_index(x, ids, factory=factory, recall_queries=100)
    if index.kind == "ivf":
        index.set_search_params(nprobe=1)  # worst case for filters: one list probed
    rng = np.random.default_rng(1)
    for allowed in (rng.choice(ids, 4000, replace=False), rng.choice(ids, 12, replace=False)):
        s, i = index.search(queries, 10, allowed=allowed)
        assert (i >= 0).all() and np.isin(i, allowed).all() and np.isfinite(s).all()
        if factory == "Flat":
            _same_ranking(i, _filtered_exact(x, ids, queries, 10, allowed)[1], x, ids, queries)
    allowed = rng.choice(ids, 10, replace=False)  # exactly k eligible: all of them, for every query
    i = index.search(queries, 10, allowed=allowed)[1]
    assert all(set(row) == set(allowed) for row in i)
    excluded = rng.choice(ids, 6000, replace=False)
    s, i = index.search(queries, 10, excluded=excluded)
    assert (i >= 0).all() and not np.isin(i, excluded).any()
    both = index.search(queries, 10, allowed=allowed[:7].tolist() + [999_999_999], excluded=allowed[:2])[1]
    assert ((both >= 0).sum(1) == 5).all() and np.isin(both[both >= 0], allowed[2:7]).all()
    s, i = index.search(queries, 10, allowed=np.array([], dtype=np.int64))
    assert (i == -1).all() and np.isneginf(s).all()


def test_tiny_allowed_set_in_ivf_is_searched_exactly(data, ivf) -> None:
    x, ids, queries = data
    index, _ = ivf
    index.set_search_params(nprobe=1)
    allowed = ids[::500]  # 16 ids spread over many lists
    i = index.search(queries, 10, allowed=allowed)[1]
    exact = _filtered_exact(x, ids, queries, 10, allowed)[1]
    assert k_recall_at_k(i, exact) >= 0.95  # every list is probed, so only SQ8 rounding can reorder


def test_rerank_with_full_vectors_restores_exact_ranking(data) -> None:
    x, ids, queries = data
    index, info = build_index(x, ids, factory="PCAR16,IVF32,SQ4", recall_queries=200)
    row = {int(i): r for r, i in enumerate(ids)}
    fetched = []

    def fetch(want: np.ndarray) -> np.ndarray:
        fetched.append(len(want))
        return x[[row[int(i)] for i in want]]

    exact = exact_search(x, ids, queries, 10)
    plain = index.search(queries, 10)[1]
    s, i = index.search(queries, 10, rerank=fetch, rerank_k=100)
    assert k_recall_at_k(i, exact[1]) > k_recall_at_k(plain, exact[1]) + 0.2
    assert info["rerank_recall_at_10"] > info["recall_at_10"] + 0.2
    hit = i == exact[1]
    np.testing.assert_allclose(s[hit], exact[0][hit], atol=1e-5)  # exact scores, not codec estimates
    assert 0 < fetched[0] <= 100 * len(queries)
    allowed = ids[::400]  # 20 eligible: re-ranking keeps the filter and the k-hit guarantee
    i = index.search(queries, 10, allowed=allowed, rerank=fetch)[1]
    assert np.isin(i, allowed).all()
    _same_ranking(i, _filtered_exact(x, ids, queries, 10, allowed)[1], x, ids, queries)
    with pytest.raises(SearchIndexError, match="re-ranking"):
        index.search(queries, 10, rerank=lambda want: x[:3])


def test_sparse_huge_ids_use_batch_selectors(data) -> None:
    x, _, queries = data
    ids = (np.arange(N, dtype=np.int64) << 40) + 5  # too sparse for a bitmap
    index = VectorIndex.create(DIM, "Flat")
    index.add(x, ids)
    allowed = ids[::3]
    i = index.search(queries, 10, allowed=allowed, excluded=ids[:30])[1]
    keep = np.setdiff1d(allowed, ids[:30])
    assert np.isin(i, keep).all()
    _same_ranking(i, _filtered_exact(x, ids, queries, 10, keep)[1], x, ids, queries)


# ------------------------------------------------------------------------------- ids
def test_ids_survive_add_remove_save_load(data, ivf, tmp_path: Path) -> None:
    x, ids, queries = data
    index, _ = build_index(x[:6000], ids[:6000], factory="PCAR32,IVF32,SQ8", recall_queries=100)
    assert index.ntotal == 6000
    index.add(x[6000:], ids[6000:])
    gone = ids[::4]
    assert index.remove(np.concatenate([gone, [123_456_789]])) == len(gone)
    assert index.remove(gone) == 0
    expect = np.setdiff1d(ids, gone)
    np.testing.assert_array_equal(index.ids(), expect)
    assert index.contains(gone).sum() == 0 and index.contains(expect).all()
    index.set_search_params(nprobe=8)
    before = index.search(queries, 10)
    assert not np.isin(before[1], gone).any()
    path = tmp_path / "idx.faiss"
    index.save(path)
    loaded = VectorIndex.load(path)
    assert (loaded.factory, loaded.dim, loaded.ntotal) == (index.factory, DIM, len(expect))
    assert loaded.search_params == index.search_params and loaded.search_params["nprobe"] == 8
    assert 1 <= loaded.search_params["rerank_nprobe"] <= 32  # tuned by build_index for search(rerank=...)
    np.testing.assert_array_equal(loaded.ids(), expect)
    after = loaded.search(queries, 10)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    # The ids are the caller's, so the hits are the exact neighbours among the survivors, by id.
    assert k_recall_at_k(after[1], _filtered_exact(x, ids, queries, 10, expect)[1]) >= 0.7


@pytest.mark.parametrize("factory", ["Flat", "IVF16,SQ8"])
def test_duplicate_ids_are_refused(data, factory: str) -> None:
    x, ids, _ = data
    index, _ = build_index(x[:2000], ids[:2000], factory=factory, recall_queries=50)
    with pytest.raises(SearchIndexError, match="already in the index"):
        index.add(x[2000:2010], np.concatenate([ids[2000:2009], ids[:1]]))
    with pytest.raises(SearchIndexError, match="repeated"):
        index.add(x[2000:2002], np.array([5, 5]))
    assert index.ntotal == 2000 and len(index.ids()) == 2000
    index.remove(ids[:1])
    index.add(x[:1], ids[:1])  # removed ids can come back
    assert index.ntotal == 2000 and index.contains(ids[:1]).all()


def test_flat_remove_and_untrained_add(data) -> None:
    x, ids, queries = data
    index = VectorIndex.create(DIM, "Flat")
    index.add(x[:1000], ids[:1000])
    top = index.search(queries[:1], 3)[1][0]
    assert index.remove(top) == 3
    assert not np.isin(index.search(queries[:1], 10)[1], top).any()
    np.testing.assert_array_equal(index.ids(), np.setdiff1d(ids[:1000], top))
    with pytest.raises(SearchIndexError, match="not trained"):
        VectorIndex.create(DIM, "IVF16,SQ8").add(x[:5], ids[:5])
    with pytest.raises(SearchIndexError, match="negative"):
        index.add(x[:1], np.array([-4]))
    with pytest.raises(SearchIndexError, match="shape"):
        index.search(np.zeros((2, DIM + 1), np.float32), 5)


def test_hnsw_cannot_remove(data) -> None:
    x, ids, _ = data
    index = VectorIndex.create(DIM, "HNSW8")
    index.add(x[:500], ids[:500])
    with pytest.raises(SearchIndexError, match="rebuild"):
        index.remove(ids[:1])


def test_search_params_are_checked(ivf) -> None:
    index, _ = ivf
    with pytest.raises(SearchIndexError, match="unknown search parameter"):
        index.set_search_params(k_factor=4)
    with pytest.raises(SearchIndexError, match="nprobe"):
        index.set_search_params(nprobe=10_000)


# ------------------------------------------------------------------------------- files
def test_atomic_save_and_corrupt_files(data, tmp_path: Path) -> None:
    x, ids, queries = data
    index = VectorIndex.create(DIM, "Flat")
    index.add(x[:300], ids[:300])
    path = tmp_path / "images.faiss"
    index.save(path)
    index.add(x[300:400], ids[300:400])
    index.save(path)  # replaces the old file
    assert [p.name for p in tmp_path.iterdir()] == ["images.faiss"]  # no temp file left behind
    assert VectorIndex.load(path).ntotal == 400
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside the FAISS payload
    (tmp_path / "flipped.faiss").write_bytes(bytes(raw))
    (tmp_path / "short.faiss").write_bytes(path.read_bytes()[:-100])
    (tmp_path / "junk.faiss").write_bytes(b"not an index at all")
    for name in ("flipped.faiss", "short.faiss", "junk.faiss", "missing.faiss"):
        with pytest.raises(SearchIndexError, match="rebuild") as err:
            VectorIndex.load(tmp_path / name)
        assert name in str(err.value)


def test_failed_save_keeps_the_old_file(data, tmp_path: Path, monkeypatch) -> None:
    x, ids, _ = data
    index = VectorIndex.create(DIM, "Flat")
    index.add(x[:10], ids[:10])
    path = tmp_path / "i.faiss"
    index.save(path)
    old = path.read_bytes()
    index.add(x[10:20], ids[10:20])

    def boom(*args):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(faiss, "write_index", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        index.save(path)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["i.faiss"]
    monkeypatch.undo()
    with pytest.raises(SearchIndexError, match="cannot write"):
        index.save(path / "i.faiss")  # the "folder" is a file (a missing folder is created, as for every write)


def test_empty_index_round_trip_and_gpu_noop(data, tmp_path: Path) -> None:
    x, ids, queries = data
    empty = VectorIndex.create(DIM, "Flat")
    empty.save(tmp_path / "e.faiss")
    loaded = VectorIndex.load(tmp_path / "e.faiss")
    assert loaded.ntotal == 0 and len(loaded.ids()) == 0
    s, i = loaded.search(queries, 4)
    assert (i == -1).all() and np.isneginf(s).all()
    loaded.add(x[:50], ids[:50])
    before = loaded.search(queries, 4)
    loaded.to_gpu_if_available()  # no GPU here: must change nothing
    np.testing.assert_array_equal(loaded.search(queries, 4)[1], before[1])


def test_build_index_small_is_exact(data) -> None:
    x, ids, _ = data
    index, info = build_index(x[:500], ids[:500])
    assert info["factory"] == "Flat" and info["recall_at_10"] == 1.0 and index.ntotal == 500
    assert info["bytes_per_vector"] == pytest.approx(DIM * 4 + 8, rel=0.05)
    assert parse_factory(DIM, "PCAR32,IVF16,SQ8").pca_dims == 32
