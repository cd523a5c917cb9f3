"""``index build`` / ``index add``: catalogue an archive into the store, embed what is pending, sync FAISS.

A run resumes an interrupted run of the same command: the store records every file and its status,
so catalogued rows are not read again and embedded rows are not embedded again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from cxr_search.errors import SearchIndexError
from cxr_search.inference import Embedder
from cxr_search.model import CXRClip
from index.embed import StageTimes, embed_pending_images, embed_pending_sections
from index.index_dir import META_FILE, IndexDir
from index.ingest import CatalogueResult, catalogue
from index.store import Build, utcnow

__all__ = ["BuildOptions", "build"]


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


def build(archive: Union[str, Path], index_dir: Union[str, Path], model: CXRClip, opts: BuildOptions, *,
          command: str = "build") -> Dict[str, Any]:
    """Catalogue, embed and index an archive; resumes an interrupted run of the same command.

    The model is embedded through one :class:`Embedder` built from ``opts`` (device, precision,
    batch size, workers), which puts it in eval mode on that device.

    Returns:
        The JSON summary: index totals after the run, what this run added, stage timings, FAISS facts.
    """
    if command == "add" and not (Path(index_dir).expanduser() / META_FILE).is_file():
        raise SearchIndexError(f"{index_dir}: no index to add to; create it with cxr-search index build")
    if opts.shard is not None and not (Path(index_dir).expanduser() / META_FILE).is_file():
        raise SearchIndexError(f"{index_dir}: a shard run embeds an index that is already catalogued; run "
                               "`cxr-search index build ARCHIVE --catalogue-only` (same --out and --db) first")
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
        if not opts.catalogue_only:
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
            "embedding": {"images": images.to_dict(), "sections": sections.to_dict()},
            "timings": timings,
            "faiss": facts,
        }
    finally:
        idx.close()
