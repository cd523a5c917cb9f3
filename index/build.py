"""``index build`` / ``index add``: catalogue an archive into the store, embed what is pending, sync FAISS.

A run resumes an interrupted run of the same command: the store records every file and its status,
so catalogued rows are not read again and embedded rows are not embedded again. A run holds the index's
writer lock from start to end (:mod:`index.lock`; shard runs hold it shared, side by side).

The embedding stages run on one of two executors that share the reader, the decode function and the
writer (:mod:`index.embed`): ``local`` (DataLoader workers and the model in this process) or ``ray``
(:mod:`index.ray_executor`: decoding tasks and a pool of model actors on a Ray cluster, results written
by this process). The catalogue and the FAISS files are the same for both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

from cxr_search.errors import ConfigError
from cxr_search.inference import Embedder
from cxr_search.model import CXRClip
from index.embed import StageTimes, embed_pending_images, embed_pending_sections
from index.index_dir import IndexDir
from index.ingest import CatalogueResult, catalogue
from index.layout import build_lock, writer_target
from index.store import Build, utcnow

__all__ = ["EXECUTORS", "BuildOptions", "build", "check_executor"]

#: The embedding executors of ``index build/add --executor``.
EXECUTORS = ("local", "ray")


@dataclass
class BuildOptions:
    """Options of ``index build`` / ``index add``."""

    reports_csv: Optional[Path] = None
    batch_size: int = 32
    num_workers: int = 0
    device: Optional[str] = None
    precision: str = "fp32"
    factory: Optional[str] = None
    bytes_per_vector: Optional[float] = None
    header_workers: int = 1
    body_part_filter: bool = True
    db_url: Optional[str] = None
    progress: bool = False
    #: Embed only the pending rows whose id modulo n is k (0-based); no catalogue, no FAISS files.
    shard: Optional[Tuple[int, int]] = None
    #: Catalogue only: store rows for every file and report, nothing embedded, no FAISS files.
    catalogue_only: bool = False
    #: Seconds to wait for the writer lock when another writer holds it (0: fail at once, exit code 7).
    lock_wait: float = 0.0
    #: Where the "waiting for the writer lock" message goes (default: a logged warning).
    say: Optional[Callable[[str], None]] = None
    #: ``local`` (this process) or ``ray`` (a Ray cluster, see :mod:`index.ray_executor`).
    executor: str = "local"
    #: Ray cluster address (``auto``: the running one; ``None``: a local cluster started for the run).
    ray_address: Optional[str] = None
    #: Ray embedding actors (each loads the model once).
    ray_workers: int = 1
    #: GPUs per Ray actor (0: CPU actors; a fraction shares a GPU).
    gpus_per_worker: float = 0.0


def build(archive: Union[str, Path], index_dir: Union[str, Path], model: CXRClip, opts: BuildOptions, *,
          command: str = "build") -> Dict[str, Any]:
    """Catalogue, embed and index an archive; resumes an interrupted run of the same command.

    The model is embedded through one :class:`Embedder` built from ``opts`` (device, precision,
    batch size, workers), which puts it in eval mode on that device. The run holds the index's writer
    lock throughout (see :mod:`index.lock`).

    Returns:
        The JSON summary: index totals after the run, what this run added, stage timings, FAISS facts.

    Raises:
        IndexLockedError: Another writer holds the index (and did not release it within ``opts.lock_wait``).
        ConfigError: Executor options that do not fit together (see :func:`check_executor`).
    """
    check_executor(opts)
    root = writer_target(index_dir, command, shard=opts.shard is not None)
    with build_lock(root, command, shard=opts.shard is not None, wait=opts.lock_wait, say=opts.say):
        return _run(archive, index_dir, model, opts, command)


def check_executor(opts: BuildOptions) -> None:
    """Refuse an unknown executor and Ray options that do not fit (before anything is loaded).

    Raises:
        ConfigError: Unknown executor; ``--shard`` with Ray (Ray splits the work itself); Ray options with
            the local executor; a worker or GPU count out of range; Ray not installed.
    """
    if opts.executor not in EXECUTORS:
        raise ConfigError(f"--executor {opts.executor!r}: use one of {', '.join(EXECUTORS)}")
    if opts.ray_workers < 1:
        raise ConfigError(f"--workers {opts.ray_workers}: the Ray executor needs at least one embedding actor")
    if not 0 <= opts.gpus_per_worker <= 64:
        raise ConfigError(f"--num-gpus-per-worker {opts.gpus_per_worker}: give 0 (CPU actors) up to 64; "
                          "a fraction such as 0.5 shares a GPU between actors")
    if opts.executor == "local":
        if opts.ray_address or opts.gpus_per_worker:
            raise ConfigError("--ray-address and --num-gpus-per-worker are options of --executor ray")
        return
    if opts.shard is not None:
        raise ConfigError("--shard K/N and --executor ray: Ray splits the work over its workers itself; "
                          "use one or the other")
    from index.ray_executor import require_ray

    require_ray()


def _run(archive: Union[str, Path], index_dir: Union[str, Path], model: CXRClip, opts: BuildOptions,
         command: str) -> Dict[str, Any]:
    idx = IndexDir.create_or_open(index_dir, model, db_url=opts.db_url)
    try:
        before = idx.store.counts()
        with idx.store.session() as s:
            run = Build(command=command, model_sha256=idx.meta["model_sha256"], preprocessing=idx.meta["preprocessing"],
                        created=utcnow())
            s.add(run)
        timings: Dict[str, Any] = {}
        cat: Optional[CatalogueResult] = None
        if opts.shard is None:  # shards share one catalogue: concurrent upserts of one study would collide
            t0 = time.perf_counter()
            cat = catalogue(idx.store, idx.secret, Path(archive), reports_csv=opts.reports_csv,
                            workers=opts.header_workers, body_part_filter=opts.body_part_filter,
                            progress=opts.progress)
            timings["catalogue_s"] = round(time.perf_counter() - t0, 3)
        images, sections = StageTimes(), StageTimes()
        if not opts.catalogue_only and opts.executor == "ray":
            from index.ray_executor import RayOptions, embed_pending_ray

            ray_opts = RayOptions(address=opts.ray_address, workers=opts.ray_workers,
                                  gpus_per_worker=opts.gpus_per_worker, batch_size=opts.batch_size,
                                  precision=opts.precision)
            images, sections = embed_pending_ray(idx.store, idx.secret, model, ray_opts, progress=opts.progress)
        elif not opts.catalogue_only:
            embedder = Embedder(model, device=opts.device, precision=opts.precision, batch_size=opts.batch_size,
                                num_workers=opts.num_workers)
            images = embed_pending_images(idx.store, idx.secret, embedder, progress=opts.progress, shard=opts.shard)
            sections = embed_pending_sections(idx.store, embedder, progress=opts.progress, shard=opts.shard)
        facts: Dict[str, Any] = {}
        if opts.shard is None and not opts.catalogue_only:  # FAISS files are written once, by a plain run
            t1 = time.perf_counter()
            facts = idx.sync(factory=opts.factory, bytes_per_vector=opts.bytes_per_vector)
            timings["faiss_s"] = round(time.perf_counter() - t1, 3)
        after = idx.store.counts()
        with idx.store.session() as s:
            row = s.get(Build, run.id)
            row.factories = {k: v.get("factory") for k, v in facts.items()}
            row.counts = after
            row.finished = utcnow()
        return {
            "index": str(Path(index_dir)),
            "totals": {k: after[k] for k in ("images", "studies", "sections", "failed")},
            "added": {k: after[k] - before[k] for k in ("images", "studies", "sections", "failed")},
            "catalogue": cat.to_dict() if cat is not None else None,
            "shard": f"{opts.shard[0] + 1}/{opts.shard[1]}" if opts.shard else None,
            "executor": opts.executor,
            "embedding": {"images": images.to_dict(), "sections": sections.to_dict()},
            "timings": timings,
            "faiss": facts,
        }
    finally:
        idx.close()
