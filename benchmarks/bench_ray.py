"""The Ray executor against the local executor on one machine, per-stage rates per core, and store write rates.

Steps (each timed): synthesize a PACS export of about ``--images`` DICOM files (``--image-size`` px, mixed
transfer syntaxes) and catalogue it once (header scan rate); copy the catalogued index for each run, so
every executor embeds the same pending rows into its own store:

- local: ``embed_pending_images`` with an Embedder of ``--batch-size`` and ``--workers`` DataLoader workers;
- ray: a local Ray session (``ray.init(num_cpus=N)``, N = this machine's cores), one embedding actor,
  decoding in Ray tasks, the driver writing (the same stage functions, :mod:`index.ray_executor`);
- ray-2node: the same on a ``ray.cluster_utils.Cluster`` of two simulated nodes on this machine.

The image-stage wall time (pending rows read, decoded, embedded, committed) is the figure compared; the
Ray session start is reported apart, the actors' start (worker processes, model load) is inside the wall
time, and the rate after the first batch arrived (start-up excluded) is reported too. The local executor
runs before and after the Ray run (the shared VM drifts); the ratio uses the mean of the two. Per-core
rates: ``decode_item`` in this process over a sample, and the model on preprocessed batches with one
torch thread. Store write rate: ``write_image_batch`` of ``--write-rows`` random
``--write-dim``-d vectors in batches of 256 into a new SQLite store and, when Debian's PostgreSQL is
installed, into a new database on a throw-away server (``tests/helpers/postgres.py``).

Example:
    .venv/bin/python benchmarks/bench_ray.py --work /tmp/bench-ray --images 2000 \\
        --out benchmarks/results/ray-cpu-2core.json
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cxr_search.checkpoints import load_model  # noqa: E402
from cxr_search.fileio import emit_json, write_json_atomic  # noqa: E402
from cxr_search.inference import Embedder  # noqa: E402
from cxr_search.synth import synthesize  # noqa: E402
from index.bench.speed import cpu_flags  # noqa: E402
from index.build import BuildOptions, build  # noqa: E402
from index.embed import (  # noqa: E402
    StageTimes,
    decode_item,
    local_image_batches,
    pending_images,
    write_image_batch,
)
from index.index_dir import IndexDir  # noqa: E402
from index.ray_executor import RayCluster, RayOptions, ray_image_batches  # noqa: E402
from index.store import Image, Patient, Store, Study  # noqa: E402

QUIET = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}




def _fresh(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


class _FirstBatch:
    """Wraps a mapper: notes when its first batch arrives and how many items it held (start-up excluded)."""

    def __init__(self, mapper) -> None:
        self.mapper = mapper
        self.at: Optional[float] = None
        self.items = 0

    def __call__(self, items, times):
        for ids, vectors, bad in self.mapper(items, times):
            if self.at is None:
                self.at, self.items = time.perf_counter(), len(ids) + len(bad)
            yield ids, vectors, bad


def _image_stage(index_dir: Path, mapper) -> Dict[str, Any]:
    from index.embed import run_image_stages

    idx = IndexDir.open(index_dir)
    first = _FirstBatch(mapper)
    try:
        n = len(pending_images(idx.store, idx.secret))
        t0 = time.perf_counter()
        times: StageTimes = run_image_stages(idx.store, idx.secret, first)
        t1 = time.perf_counter()
    finally:
        idx.close()
    done = times.embedded + times.failed
    assert done == n, f"{done} of {n} pending images accounted for"
    assert first.at is not None
    return {"images": n, "embedded": times.embedded, "failed": times.failed, "wall_s": round(t1 - t0, 2),
            "images_per_s": round(n / (t1 - t0), 1), "first_batch_s": round(first.at - t0, 2),
            "after_first_batch_images_per_s": round((n - first.items) / (t1 - first.at), 1),
            "stages": times.to_dict()}


def run_local(index_dir: Path, model, batch_size: int, workers: int) -> Dict[str, Any]:
    """What ``embed_pending_images`` runs: the local mapper in the shared reader/writer."""
    embedder = Embedder(model, device="cpu", batch_size=batch_size, num_workers=workers)
    return _image_stage(index_dir, local_image_batches(embedder))


def run_ray(index_dir: Path, model, ray_opts: RayOptions) -> Dict[str, Any]:
    """What ``--executor ray`` runs for the images: the Ray mapper in the shared reader/writer."""
    with RayCluster(ray_opts) as cluster:
        cluster.check_room()
        return _image_stage(index_dir, ray_image_batches(model, ray_opts))


def per_core_rates(archive: Path, model, index_dir: Path, sample: int, batch_size: int) -> Dict[str, Any]:
    """decode_item and the model, each on one core (torch threads 1)."""
    idx = IndexDir.open(index_dir)
    try:
        items = pending_images(idx.store, idx.secret)[:sample]
    finally:
        idx.close()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        tensors = [t for _, t, _ in (decode_item(i, p, model.config.preprocess) for i, p in items) if t is not None]
        decode_s = time.perf_counter() - t0
        embedder = Embedder(model, device="cpu", batch_size=batch_size)
        pixels = torch.stack(tensors[:batch_size])
        embedder.embed_pixels(pixels)  # warm-up
        rounds = max(1, len(tensors) // batch_size)
        t0 = time.perf_counter()
        for _ in range(rounds):
            embedder.embed_pixels(pixels)
        model_s = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return {"decode_images_per_s_per_core": round(len(items) / decode_s, 1), "decode_sample": len(items),
            "model_images_per_s_per_core": round(rounds * len(pixels) / model_s, 1)}


def store_write_rate(url: str, rows: int, dim: int, batch: int = 256) -> Dict[str, Any]:
    """write_image_batch of ``rows`` random vectors into a new store at ``url``: vectors/s."""
    store = Store(url, create=True)
    try:
        with store.session() as s:
            p = Patient(pseudo_id="bench".ljust(64, "0"))
            s.add(p)
            s.flush()
            studies = [Study(study_uid=f"9.{k}", patient_id=p.id) for k in range(max(1, rows // 2))]
            s.add_all(studies)
            s.flush()
            s.add_all([Image(sop_uid=f"9.{j}", study_id=studies[j // 2].id, path_key=f"k{j}", path_enc="e")
                       for j in range(rows)])
        with store.session() as s:
            ids = sorted(s.scalars(Image.__table__.select().with_only_columns(Image.id)).all())
        vectors = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
        times = StageTimes()
        t0 = time.perf_counter()
        for start in range(0, rows, batch):
            write_image_batch(store, ids[start : start + batch], vectors[start : start + batch], [], times)
        wall = time.perf_counter() - t0
    finally:
        store.close()
    return {"rows": rows, "dim": dim, "batch": batch, "wall_s": round(wall, 2), "vectors_per_s": round(rows / wall, 0)}


def postgres_write_rate(rows: int, dim: int) -> Optional[Dict[str, Any]]:
    try:
        from tests.helpers import postgres
    except ImportError as exc:
        return {"skipped": f"tests/helpers/postgres.py not importable: {exc}"}
    if not postgres.candidates():
        return {"skipped": "PostgreSQL not installed (Debian package postgresql)"}
    bindir = Path(postgres.candidates()[0]).parent
    server = postgres.PostgresServer(bindir).start()
    try:
        import psycopg

        with psycopg.connect(server.dsn("postgres"), autocommit=True) as con:
            con.execute("CREATE DATABASE bench")
        result = store_write_rate(server.url("bench"), rows, dim)
        result["server"] = "PostgreSQL on 127.0.0.1, fsync/synchronous_commit off (the test server's settings)"
        return result
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="Folder for the archive and the indices (reused).")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--model", default="tiny", help="Preset (random or seeded weights: only speed is measured), "
                    "e.g. tiny or cxr-clip-r50.")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers of the local executor.")
    ap.add_argument("--ray-workers", type=int, default=1, help="Embedding actors of the Ray executor.")
    ap.add_argument("--write-rows", type=int, default=20000)
    ap.add_argument("--write-dim", type=int, default=512)
    ap.add_argument("--skip-2node", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import ray

    cores = os.cpu_count() or 1
    archive = args.work / f"pacs-{args.images}-{args.image_size}"
    result: Dict[str, Any] = {
        "benchmark": "ray executor vs local executor", "command": " ".join([Path(sys.executable).name] + sys.argv),
        "machine": {"cores": cores, "cpu": platform.processor() or platform.machine(), "cpu_flags": cpu_flags(),
                    "torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version()},
        "model": ("tiny preset (seeded weights, 64 px input, 64-d embeddings)" if args.model == "tiny"
                  else f"{args.model} preset (initialised weights)"),
    }
    if not (archive / "ground_truth.csv").is_file():
        t0 = time.perf_counter()
        synthesize(archive, studies=max(1, round(args.images / 1.76)), seed=5, layout="pacs", broken=4,
                   image_size=args.image_size)
        result["synthesize_s"] = round(time.perf_counter() - t0, 1)
    model = load_model(args.model, require_tokenizer=False)
    base = args.work / "catalogued"
    if base.exists():
        shutil.rmtree(base)
    t0 = time.perf_counter()
    summary = build(archive, base, model, BuildOptions(reports_csv=archive / "reports.csv", catalogue_only=True))
    cat_s = time.perf_counter() - t0
    files = summary["catalogue"]["files_seen"]
    result["catalogue"] = {"files": files, "wall_s": round(cat_s, 2), "files_per_s": round(files / cat_s, 1),
                           "header_workers": 1}
    print(f"catalogue: {files} files in {cat_s:.1f} s", flush=True)
    result["per_core"] = per_core_rates(archive, model, base, 200, args.batch_size)
    print(f"per core: {result['per_core']}", flush=True)

    runs: Dict[str, Any] = {}
    runs["local"] = run_local(_fresh(base, args.work / "local"), model, args.batch_size, args.workers)
    print(f"local: {runs['local']['images_per_s']} images/s", flush=True)

    t0 = time.perf_counter()
    ray.init(num_cpus=cores, **QUIET)
    init_s = time.perf_counter() - t0
    opts = RayOptions(workers=args.ray_workers, batch_size=args.batch_size)
    try:
        runs["ray"] = run_ray(_fresh(base, args.work / "ray"), model, opts)
    finally:
        ray.shutdown()
    runs["ray"]["ray_init_s"] = round(init_s, 2)
    print(f"ray: {runs['ray']['images_per_s']} images/s", flush=True)
    # The local executor again: the shared VM drifts, so the ratio uses the mean of the runs before and after.
    runs["local_after"] = run_local(_fresh(base, args.work / "local2"), model, args.batch_size, args.workers)
    print(f"local again: {runs['local_after']['images_per_s']} images/s", flush=True)

    if not args.skip_2node:
        from ray.cluster_utils import Cluster

        t0 = time.perf_counter()
        half = max(1, cores // 2)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": half, "include_dashboard": False})
        try:
            cluster.add_node(num_cpus=max(1, cores - half))
            ray.init(address=cluster.address, **QUIET)
            cluster.wait_for_nodes()
            init_s = time.perf_counter() - t0
            runs["ray_2node"] = run_ray(_fresh(base, args.work / "ray2"), model, opts)
            runs["ray_2node"]["ray_init_s"] = round(init_s, 2)
            runs["ray_2node"]["nodes"] = {"head_cpus": half, "worker_cpus": max(1, cores - half),
                                          "actors": args.ray_workers}
        finally:
            ray.shutdown()
            cluster.shutdown()
        print(f"ray, 2 simulated nodes: {runs['ray_2node']['images_per_s']} images/s", flush=True)
    local_mean = (runs["local"]["images_per_s"] + runs["local_after"]["images_per_s"]) / 2
    result["runs"] = runs
    result["ratio_ray_to_local"] = round(runs["ray"]["images_per_s"] / local_mean, 2)
    if "ray_2node" in runs:
        result["ratio_ray_2node_to_local"] = round(runs["ray_2node"]["images_per_s"] / local_mean, 2)
    result["store_write"] = {
        "sqlite": store_write_rate(f"sqlite:///{args.work / 'write-bench.sqlite'}", args.write_rows, args.write_dim),
        "postgresql": postgres_write_rate(args.write_rows, args.write_dim),
    }
    (args.work / "write-bench.sqlite").unlink(missing_ok=True)
    if args.out:
        write_json_atomic(args.out, result)
    emit_json(result)


if __name__ == "__main__":
    main()
