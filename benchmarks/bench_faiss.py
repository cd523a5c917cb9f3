"""FAISS index benchmark on seeded clustered synthetic embeddings: build time, size, latency, recall.

Usage:
    .venv/bin/python benchmarks/bench_faiss.py [--n 1000000] [--dim 512] [--factory F]
        [--bytes-per-vector B] [--queries 1000] [--spectrum-decay 0.5] [--noise 0.027] [--offset 1.0]
        [--seed 0] [--no-store-rerank] [--out OUT.json]

Data: ``index.ann.reference.clustered_unit_vectors`` (documented there): ``n / 100`` clusters around a
shared mean direction, within-cluster noise with a ~1/i variance spectrum, L2-normalised; with the
defaults the mean nearest-neighbour cosine is ~0.9, like the "clustered proxy" of ``docs/engine-facts.md`` (the
measured value is printed). Queries are held out: new draws from the same clusters (another stream).

Index: ``build_index`` with ``--factory`` or, by default, the engine's own choice for the budget
(``choose_factory`` candidates ranked on a sample). The index is saved, and the *loaded* file is
measured: bytes per vector = file size / n; single-query latency = a loop over the held-out queries
one at a time (batch of 1), p50/p99; recall@10 against a brute-force numpy search of the same queries.
Modes: the index alone; with the top 50 candidates re-scored exactly from full vectors in a memory
map; and as the Searcher does it, re-scored from full vectors read from the engine's SQLite store
(``Store.vectors_in_order``). The full vectors live on disk, not in the index's memory.
Not a test: it takes minutes at 1M and needs ~3 GB of RAM per million 512-d vectors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from index.ann.build import build_index  # noqa: E402
from index.ann.reference import clustered_unit_vectors, exact_search, k_recall_at_k  # noqa: E402
from index.ann.vector_index import VectorIndex  # noqa: E402


def measure(index: VectorIndex, queries: np.ndarray, exact_ids: np.ndarray, **kw) -> dict:
    """Single-query latency (a loop of batch-1 searches), batched throughput and recall@10."""
    for q in queries[:20]:  # warm-up (page faults, OpenMP pool)
        index.search(q[None], 10, **kw)
    lat, got = [], np.empty((len(queries), 10), dtype=np.int64)
    for i, q in enumerate(queries):
        t = time.perf_counter()
        got[i] = index.search(q[None], 10, **kw)[1][0]
        lat.append(time.perf_counter() - t)
    lat_ms = np.asarray(lat) * 1e3
    t0 = time.perf_counter()
    index.search(queries, 10, **kw)
    qps = len(queries) / (time.perf_counter() - t0)
    return {"p50_ms": round(float(np.percentile(lat_ms, 50)), 3), "p99_ms": round(float(np.percentile(lat_ms, 99)), 3),
            "mean_ms": round(float(lat_ms.mean()), 3), "batch_qps": round(qps, 1),
            "recall_at_10": round(k_recall_at_k(got, exact_ids, 10), 4)}


def _vector_store(path: Path, full: np.ndarray, ids: np.ndarray) -> Any:
    """A store whose image_vectors table holds ``full`` under ``ids`` (bulk-loaded with sqlite3)."""
    import sqlite3

    from index.store import Store, default_url, vector_bytes

    store = Store(default_url(path.parent), create=True)
    t0 = time.perf_counter()
    con = sqlite3.connect(path)  # no foreign keys: the bench has vectors without image rows
    step = 50_000
    for s in range(0, len(ids), step):
        con.executemany("INSERT INTO image_vectors (image_id, vector) VALUES (?, ?)",
                        ((int(i), vector_bytes(v)) for i, v in zip(ids[s:s + step], full[s:s + step], strict=False)))
        con.commit()
    con.close()
    print(f"store: {len(ids)} vectors written to {path.name} in {time.perf_counter() - t0:.1f}s "
          f"({path.stat().st_size / 1e9:.2f} GB)", flush=True)
    return store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--factory", default=None, help="FAISS factory (default: the engine's choice)")
    ap.add_argument("--bytes-per-vector", type=float, default=None, help="memory budget (default: 100)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--spectrum-decay", type=float, default=0.5)
    ap.add_argument("--noise", type=float, default=0.027)
    ap.add_argument("--offset", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--rerank-k", type=int, default=50, help="candidates re-scored in the re-rank mode")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    ap.add_argument("--no-store-rerank", dest="store_rerank", action="store_false",
                    help="skip the mode that re-ranks with vectors read from a SQLite store")
    args = ap.parse_args()

    gen = dict(spectrum_decay=args.spectrum_decay, noise=args.noise, offset=args.offset, seed=args.seed,
               n_clusters=max(1, args.n // 100))
    t0 = time.perf_counter()
    x = clustered_unit_vectors(args.n, args.dim, **gen)
    queries = clustered_unit_vectors(args.queries, args.dim, stream=1, **gen)
    ids = np.arange(args.n, dtype=np.int64) * 3 + 17  # store-like keys, deliberately not row positions
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact_scores, exact_ids = exact_search(x, ids, queries, 10)
    exact_s = time.perf_counter() - t0
    print(f"data: {args.n} x {args.dim} in {gen_s:.1f}s; exact search of {args.queries} queries {exact_s:.1f}s; "
          f"mean NN cosine {exact_scores[:, 0].mean():.3f} (10th {exact_scores[:, 9].mean():.3f})", flush=True)

    t0 = time.perf_counter()
    index, info = build_index(x, ids, factory=args.factory, bytes_per_vector=args.bytes_per_vector,
                              seed=args.seed, target_recall=args.target_recall)
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.faiss"
        index.save(path)
        file_bytes = path.stat().st_size
        del index
        t0 = time.perf_counter()
        index = VectorIndex.load(path)
        load_s = time.perf_counter() - t0
        # Full vectors for the optional re-ranking stage, as a store would hold them: on disk, not in the
        # index (this file stays in the page cache here, so its reads are memory reads).
        np.save(Path(tmp) / "vectors.npy", x)
        del x
        full = np.load(Path(tmp) / "vectors.npy", mmap_mode="r")

        def fetch(want: np.ndarray) -> np.ndarray:
            return np.asarray(full[(want - 17) // 3])

        modes = {"index only": {}, f"+ exact re-rank of top {args.rerank_k}": {"rerank": fetch,
                                                                              "rerank_k": args.rerank_k}}
        if args.store_rerank:
            # What the Searcher does: the full vectors come from the engine's SQL store (SQLite file on
            # disk, warm page cache), fetched by primary key with Store.vectors_in_order.
            store = _vector_store(Path(tmp) / "store.sqlite", full, ids)
            modes[f"+ re-rank of top {args.rerank_k} from the SQLite store"] = {
                "rerank": lambda want: store.vectors_in_order("image", want, args.dim), "rerank_k": args.rerank_k}
        measured = {name: measure(index, queries, exact_ids, **kw) for name, kw in modes.items()}

    plain = measured["index only"]
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "data": {"generator": "index.ann.reference.clustered_unit_vectors", **gen, "n": args.n, "dim": args.dim,
                 "queries": args.queries, "mean_nn_cosine": round(float(exact_scores[:, 0].mean()), 4),
                 "mean_10th_nn_cosine": round(float(exact_scores[:, 9].mean()), 4)},
        "factory": info["factory"], "search_params": index.search_params,
        "build_s": round(build_s, 1), "choose_s": info.get("choose_s"), "train_s": info["train_s"],
        "add_s": info["add_s"], "tune_s": info["tune_s"], "load_s": round(load_s, 2),
        "bytes_per_vector": round(file_bytes / args.n, 2), "file_bytes": file_bytes,
        "search": measured,
        "recall_at_10_build": info["recall_at_10"], "rerank_recall_at_10_build": info.get("rerank_recall_at_10"),
        "recall_curve_build": info["recall_curve"], "candidates": info.get("candidates"),
        "targets_index_only": {"p50_ms<=5": plain["p50_ms"] <= 5, "recall>=0.95": plain["recall_at_10"] >= 0.95,
                               "bytes<=100": file_bytes / args.n <= 100},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "faiss": faiss.__version__, "omp_threads": faiss.omp_get_max_threads()},
    }
    rows = [("factory", result["factory"]), ("search params", result["search_params"]),
            ("build (choose+train+add+tune)", f"{result['build_s']} s ({info.get('choose_s')} + {info['train_s']} + "
                                              f"{info['add_s']} + {info['tune_s']})"),
            ("bytes / vector (file)", result["bytes_per_vector"]),
            ("mean NN cosine", result["data"]["mean_nn_cosine"]),
            ("recall@10 at build (db rows)", f"{info['recall_at_10']} (re-ranked: {info.get('rerank_recall_at_10')})")]
    for name, value in rows:
        print(f"{name:<32}{value}")
    print(f"{'mode':<32}{'p50 ms':>8}{'p99 ms':>8}{'queries/s':>11}{'recall@10':>11}")
    for name, m in measured.items():
        print(f"{name:<32}{m['p50_ms']:>8}{m['p99_ms']:>8}{m['batch_qps']:>11}{m['recall_at_10']:>11}")
    if result["candidates"]:
        print("candidates (recall@10 on a 50k sample, all lists probed):", result["candidates"])
    print("targets (index only):", result["targets_index_only"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
