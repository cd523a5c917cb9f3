"""Embedding stages: pending images and sections in the store to stored vectors, committed in batches.

reader -> mapper -> writer, as in clip-retrieval: DataLoader workers read and preprocess images
(the slow part for compressed DICOM), the model embeds batches (GPU when present, optional bf16),
and the writer stores each batch's vectors and statuses in one transaction. A kill -9 loses at most
the batch in flight: the rows stay ``pending`` and the next run embeds them. A file that cannot be
decoded becomes a failure row with its reason; the run goes on. Per-stage wall time is reported.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from sqlalchemy import select, true, update

from cxr_search.images import preprocess_item
from cxr_search.inference import Embedder
from index.privacy import IndexSecret, scrub_path
from index.store import (
    EMBEDDED,
    FAILED,
    PENDING,
    Image,
    ImageVector,
    Section,
    SectionVector,
    Store,
    Study,
    vector_bytes,
)

logger = logging.getLogger(__name__)


@dataclass
class StageTimes:
    """Wall seconds per stage and items per outcome."""

    read_s: float = 0.0
    model_s: float = 0.0
    write_s: float = 0.0
    embedded: int = 0
    failed: int = 0
    reasons: Dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready summary, with throughput."""
        total = self.read_s + self.model_s + self.write_s
        return {
            "embedded": self.embedded, "failed": self.failed, "failure_reasons": dict(self.reasons),
            "read_s": round(self.read_s, 3), "model_s": round(self.model_s, 3), "write_s": round(self.write_s, 3),
            "items_per_s": round(self.embedded / total, 2) if total > 0 else None,
        }


class _PendingImages(torch.utils.data.Dataset):
    """(image id, path) -> (id, tensor or None, failure reason)."""

    def __init__(self, items: Sequence[Tuple[int, str]], preprocess: Any) -> None:
        self.items = items
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Tuple[int, Optional[torch.Tensor], str]:
        image_id, path = self.items[i]
        try:
            return image_id, preprocess_item(path, self.preprocess), ""  # [3, H, W]
        except Exception as exc:  # any undecodable file is recorded, never fatal
            logger.debug("%s: cannot decode", path, exc_info=True)
            return image_id, None, scrub_path(_short_reason(exc), path)


def _short_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:500]


def _collate(batch: List[Tuple[int, Optional[torch.Tensor], str]]) -> Tuple[List[int], Optional[torch.Tensor], List[Tuple[int, str]]]:
    ok = [(i, t) for i, t, _ in batch if t is not None]
    bad = [(i, why) for i, t, why in batch if t is None]
    pixels = torch.stack([t for _, t in ok]) if ok else None  # [B, 3, H, W]
    return [i for i, _ in ok], pixels, bad


def _worker_init(_worker_id: int) -> None:
    # One torch thread per decode worker: the model in the main process keeps the cores it needs.
    torch.set_num_threads(1)


def _in_shard(column: Any, shard: Optional[Tuple[int, int]]) -> Any:
    """SQL condition "row belongs to shard (k, n)": id modulo n equals k (0-based k)."""
    if shard is None:
        return true()
    k, n = shard
    return (column % n) == k


def pending_images(store: Store, secret: IndexSecret, shard: Optional[Tuple[int, int]] = None) -> List[Tuple[int, str]]:
    """(id, decrypted path) of every image still to embed (of one shard when given), by id."""
    with store.session() as s:
        rows = s.execute(select(Image.id, Image.path_enc).where(Image.status == PENDING, _in_shard(Image.id, shard))
                         .order_by(Image.id)).all()
    return [(rid, secret.decrypt_path(enc)) for rid, enc in rows]


def embed_pending_images(
    store: Store, secret: IndexSecret, embedder: Embedder, *, progress: bool = False,
    shard: Optional[Tuple[int, int]] = None,
) -> StageTimes:
    """Embed every pending image; each batch's vectors and statuses are committed together.

    Batches of the Embedder's ``batch_size`` are decoded by its ``num_workers`` DataLoader workers and
    embedded on its device, in its precision. ``shard=(k, n)`` embeds only the images whose id modulo
    ``n`` is ``k``: ``n`` processes (on one machine or many, sharing the store) split the work without
    overlapping.

    Returns:
        Stage timings and counts.
    """
    items = pending_images(store, secret, shard)
    times = StageTimes()
    if not items:
        return times
    num_workers = embedder.num_workers
    loader = torch.utils.data.DataLoader(
        _PendingImages(items, embedder.config.preprocess), batch_size=embedder.batch_size, num_workers=num_workers,
        collate_fn=_collate, worker_init_fn=_worker_init if num_workers > 0 else None,
        persistent_workers=False, pin_memory=embedder.device.type == "cuda",
    )
    from tqdm.auto import tqdm

    bar = tqdm(total=len(items), desc="embedding images", unit="image", disable=not progress)
    t0 = time.perf_counter()
    for ids, pixels, bad in loader:
        t1 = time.perf_counter()
        times.read_s += t1 - t0
        vectors = np.zeros((0, embedder.embed_dim), dtype=np.float32)
        if pixels is not None:
            vectors = embedder.embed_pixels(pixels)  # [B, D]
        t2 = time.perf_counter()
        times.model_s += t2 - t1
        _write_image_batch(store, ids, vectors, bad, times)
        t0 = time.perf_counter()
        times.write_s += t0 - t2
        bar.update(len(ids) + len(bad))
    bar.close()
    return times


def _write_image_batch(store: Store, ids: List[int], vectors: np.ndarray, bad: List[Tuple[int, str]],
                       times: StageTimes) -> None:
    with store.session() as s:
        if ids:
            s.add_all([ImageVector(image_id=i, vector=vector_bytes(v)) for i, v in zip(ids, vectors, strict=False)])
            s.execute(update(Image).where(Image.id.in_(ids)).values(status=EMBEDDED))
            touched = select(Image.study_id).where(Image.id.in_(ids))
            s.execute(update(Study).where(Study.id.in_(touched)).values(vector_dirty=True))
        for image_id, why in bad:
            image = s.get(Image, image_id)
            if image is None:
                continue
            image.status = FAILED
            store.add_failure(s, image.path_key, image.path_enc, "decode", why)
            key = why.split(":", 1)[0]
            times.reasons[key] = times.reasons.get(key, 0) + 1
    times.embedded += len(ids)
    times.failed += len(bad)


def embed_pending_sections(
    store: Store, embedder: Embedder, *, commit_every: int = 512, progress: bool = False,
    shard: Optional[Tuple[int, int]] = None,
) -> StageTimes:
    """Embed every pending report section (of one shard, see :func:`embed_pending_images`), committing every
    ``commit_every`` sections; batches of the Embedder's ``text_batch_size``, in its text precision."""
    with store.session() as s:
        rows = s.execute(select(Section.id, Section.text).where(Section.status == PENDING, _in_shard(Section.id, shard))
                         .order_by(Section.id)).all()
    times = StageTimes()
    if not rows:
        return times
    from tqdm.auto import tqdm

    bar = tqdm(total=len(rows), desc="embedding report sections", unit="section", disable=not progress)
    for start in range(0, len(rows), commit_every):
        part = rows[start : start + commit_every]
        t1 = time.perf_counter()
        vectors = embedder.embed_texts([t for _, t in part])
        t2 = time.perf_counter()
        ids = [i for i, _ in part]
        with store.session() as s:
            s.add_all([SectionVector(section_id=i, vector=vector_bytes(v)) for i, v in zip(ids, vectors, strict=False)])
            s.execute(update(Section).where(Section.id.in_(ids)).values(status=EMBEDDED))
        times.model_s += t2 - t1
        times.write_s += time.perf_counter() - t2
        times.embedded += len(ids)
        bar.update(len(ids))
    bar.close()
    return times
