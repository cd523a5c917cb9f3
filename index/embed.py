"""Embedding stages: pending images and sections in the store to stored vectors, committed in batches.

reader -> mapper -> writer, as in clip-retrieval: DataLoader workers read and preprocess images
(the slow part for compressed DICOM), the model embeds batches (GPU when present, optional bf16),
and the writer stores each batch's vectors and statuses in one transaction. A kill -9 loses at most
the batch in flight: the rows stay ``pending`` and the next run embeds them. A file that cannot be
decoded becomes a failure row with its reason, unless the intake recorded another copy of its
SOPInstanceUID: then the image row is switched to that copy, embedded in a further pass, and the
damaged copy is recorded as the duplicate (:mod:`index.ingest_copies`); the run goes on. FIFOs and
devices are never opened. Per-stage wall time is reported.

The stages are shared by both executors: :func:`run_image_stages` / :func:`run_section_stages` are the
reader (pending rows from the store) and the writer (:func:`write_image_batch`,
:func:`write_section_batch`, one transaction per batch, driven by one process), and take the mapper as
an argument: :func:`local_image_batches` (DataLoader workers calling :func:`decode_item`, the model in
this process) or the Ray executor's (:mod:`index.ray_executor`: the same :func:`decode_item` in Ray
tasks, the model in a pool of actors).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from sqlalchemy import select, true, update

from cxr_search.datasets.file_walk import non_regular_reason
from cxr_search.images import preprocess_item
from cxr_search.inference import Embedder
from index.ingest_copies import not_decoded_note, switch_copy, untried_copies
from index.privacy import IndexSecret, scrub_path
from index.store import (
    DECODE,
    DUPLICATE,
    EMBEDDED,
    FAILED,
    PENDING,
    Failure,
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
    #: Images whose file did not decode, switched to another copy of their SOPInstanceUID and retried.
    replaced: int = 0
    reasons: Dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready summary, with throughput."""
        total = self.read_s + self.model_s + self.write_s
        return {
            "embedded": self.embedded, "failed": self.failed, "failure_reasons": dict(self.reasons),
            "switched_to_another_copy": self.replaced,
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
        return decode_item(image_id, path, self.preprocess)


def decode_item(image_id: int, path: str, preprocess: Any) -> Tuple[int, Optional[torch.Tensor], str]:
    """Decode and preprocess one pending image: ``(id, [3, H, W] tensor, "")`` or ``(id, None, reason)``.

    Never raises for a bad file: an undecodable file's reason (path scrubbed) is returned for the writer
    to record, and a FIFO or device (a file replaced since it was catalogued) is never opened.
    """
    try:
        why = non_regular_reason(os.stat(path).st_mode)
    except OSError:
        why = None  # missing or unreadable: the reader says so
    if why is not None:  # replaced by a FIFO or device since it was catalogued: never opened
        return image_id, None, why
    try:
        return image_id, preprocess_item(path, preprocess), ""  # [3, H, W]
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


#: The mapper of the image stages: given the (id, path) items of one pass and the run's timings (to which
#: it adds its read and model seconds), yields ``(embedded ids, [len(ids), D] vectors, [(id, reason)])``
#: per batch. Every item comes back exactly once, embedded or with its reason.
ImageBatches = Callable[[Sequence[Tuple[int, str]], "StageTimes"],
                        Iterator[Tuple[List[int], np.ndarray, List[Tuple[int, str]]]]]
#: The mapper of the section stages: (id, text) rows and timings in, ``(ids, vectors)`` per batch out.
SectionBatches = Callable[[Sequence[Tuple[int, str]], "StageTimes"], Iterator[Tuple[List[int], np.ndarray]]]


def local_image_batches(embedder: Embedder) -> ImageBatches:
    """The local mapper: DataLoader workers decode (:func:`decode_item`), the model runs in this process."""

    def batches(items: Sequence[Tuple[int, str]], times: StageTimes) -> Iterator[Tuple[List[int], np.ndarray,
                                                                                         List[Tuple[int, str]]]]:
        num_workers = embedder.num_workers if len(items) > 1 else 0
        loader = torch.utils.data.DataLoader(
            _PendingImages(items, embedder.config.preprocess), batch_size=embedder.batch_size,
            num_workers=num_workers, collate_fn=_collate, worker_init_fn=_worker_init if num_workers > 0 else None,
            persistent_workers=False, pin_memory=embedder.device.type == "cuda",
        )
        t0 = time.perf_counter()
        for ids, pixels, bad in loader:
            t1 = time.perf_counter()
            times.read_s += t1 - t0
            vectors = np.zeros((0, embedder.embed_dim), dtype=np.float32)
            if pixels is not None:
                vectors = embedder.embed_pixels(pixels)  # [B, D]
            times.model_s += time.perf_counter() - t1
            yield ids, vectors, bad
            t0 = time.perf_counter()

    return batches


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
    return run_image_stages(store, secret, local_image_batches(embedder), progress=progress, shard=shard)


def run_image_stages(store: Store, secret: IndexSecret, mapper: ImageBatches, *, progress: bool = False,
                     shard: Optional[Tuple[int, int]] = None, desc: str = "embedding images") -> StageTimes:
    """Reader, mapper, writer of the images: every pending image (of ``shard``) through ``mapper``, each batch
    it yields committed by :func:`write_image_batch` in this process (the store's single writer).

    An image whose file does not decode is switched to an untried copy of its SOPInstanceUID (if the
    intake recorded one) and goes through the mapper again in the next pass; each copy is tried once,
    so this ends.

    Returns:
        Stage timings and counts.
    """
    items = pending_images(store, secret, shard)
    times = StageTimes()
    if not items:
        return times
    copies = _Copies(store, secret)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(items), desc=desc, unit="image", disable=not progress)
    while items:
        for ids, vectors, bad in mapper(items, times):
            t0 = time.perf_counter()
            write_image_batch(store, ids, vectors, bad, times, copies=copies)
            times.write_s += time.perf_counter() - t0
            bar.update(len(ids) + len(bad))
        items, copies.retry = copies.retry, []
        bar.total += len(items)
    bar.close()
    return times


class _Copies:
    """The untried copies of images that fail to decode (duplicate rows of the intake), and the retries."""

    def __init__(self, store: Store, secret: IndexSecret) -> None:
        self.store = store
        self.secret = secret
        with store.session() as s:  # no duplicate row at all (the usual case): no look-up per failure
            self.any = s.scalar(select(Failure.id).where(Failure.stage == DUPLICATE).limit(1)) is not None
        self.retry: List[Tuple[int, str]] = []  # (image id, path of the copy switched to)

    def replace(self, s: Any, failed: List[Tuple[Image, str]]) -> List[Tuple[Image, str]]:
        """Switch each failed image with an untried copy to that copy; returns the images left failed."""
        if not self.any or not failed:
            return failed
        alternates = untried_copies(s, [image.sop_uid for image, _ in failed])
        left = []
        for image, why in failed:
            rows = alternates.get(image.sop_uid)
            if not rows:
                left.append((image, why))
                continue
            copy = rows.pop(0)
            path = self.secret.decrypt_path(copy.path_enc)
            switch_copy(s, self.store, image, copy.path_key, copy.path_enc, not_decoded_note(why), _header_facts(path))
            self.retry.append((image.id, path))
        return left


def _header_facts(path: str) -> Dict[str, Any]:
    """Size, photometric interpretation and transfer syntax of a DICOM copy (nothing for other files)."""
    from cxr_search.datasets.header_scan import header_or_reason

    header, _, _ = header_or_reason(path)
    if header is None:
        return {}
    return {"rows": header.rows, "columns": header.columns, "photometric": header.photometric_interpretation,
            "transfer_syntax": header.transfer_syntax_uid}


def write_image_batch(store: Store, ids: List[int], vectors: np.ndarray, bad: List[Tuple[int, str]],
                      times: StageTimes, *, copies: Optional[_Copies] = None) -> None:
    """Store a batch's vectors and statuses in one transaction; an undecodable image with an untried copy
    is switched to that copy (left pending, retried by the caller), the others become decode failures.

    Args:
        store: The store.
        ids: Image ids embedded, in the order of ``vectors``.
        vectors: ``[len(ids), D]`` float32.
        bad: ``(image id, reason)`` of the images that did not decode.
        times: Counts are added here (embedded, failed, reasons, switched copies).
        copies: The run's copy tracker (``None``: no copy switching, every bad image is a failure).
    """
    with store.session() as s:
        if ids:
            s.add_all([ImageVector(image_id=i, vector=vector_bytes(v)) for i, v in zip(ids, vectors, strict=False)])
            s.execute(update(Image).where(Image.id.in_(ids)).values(status=EMBEDDED))
            touched = select(Image.study_id).where(Image.id.in_(ids))
            s.execute(update(Study).where(Study.id.in_(touched)).values(vector_dirty=True))
        failed = [(image, why) for image, why in ((s.get(Image, i), why) for i, why in bad) if image is not None]
        n_failed = len(failed)
        if copies is not None:
            failed = copies.replace(s, failed)
            times.replaced += n_failed - len(failed)
        for image, why in failed:
            image.status = FAILED
            store.add_failure(s, image.path_key, image.path_enc, DECODE, why)
            key = why.split(":", 1)[0]
            times.reasons[key] = times.reasons.get(key, 0) + 1
        times.failed += len(failed)
    times.embedded += len(ids)


def pending_sections(store: Store, shard: Optional[Tuple[int, int]] = None) -> List[Tuple[int, str]]:
    """(id, text) of every report section still to embed (of one shard when given), by id."""
    with store.session() as s:
        rows = s.execute(select(Section.id, Section.text).where(Section.status == PENDING, _in_shard(Section.id, shard))
                         .order_by(Section.id)).all()
    return [(int(i), t) for i, t in rows]


def write_section_batch(store: Store, ids: List[int], vectors: np.ndarray, times: StageTimes) -> None:
    """Store a batch of section vectors and mark the sections embedded, in one transaction."""
    with store.session() as s:
        s.add_all([SectionVector(section_id=i, vector=vector_bytes(v)) for i, v in zip(ids, vectors, strict=True)])
        s.execute(update(Section).where(Section.id.in_(ids)).values(status=EMBEDDED))
    times.embedded += len(ids)


def local_section_batches(embedder: Embedder, commit_every: int = 512) -> SectionBatches:
    """The local mapper of the sections: ``commit_every`` sections per write, the text tower in this process."""

    def batches(rows: Sequence[Tuple[int, str]], times: StageTimes) -> Iterator[Tuple[List[int], np.ndarray]]:
        for start in range(0, len(rows), commit_every):
            part = rows[start : start + commit_every]
            t1 = time.perf_counter()
            vectors = embedder.embed_texts([t for _, t in part])
            times.model_s += time.perf_counter() - t1
            yield [i for i, _ in part], vectors

    return batches


def embed_pending_sections(
    store: Store, embedder: Embedder, *, commit_every: int = 512, progress: bool = False,
    shard: Optional[Tuple[int, int]] = None,
) -> StageTimes:
    """Embed every pending report section (of one shard, see :func:`embed_pending_images`), committing every
    ``commit_every`` sections; batches of the Embedder's ``text_batch_size``, in its text precision."""
    return run_section_stages(store, local_section_batches(embedder, commit_every), progress=progress, shard=shard)


def run_section_stages(store: Store, mapper: SectionBatches, *, progress: bool = False,
                       shard: Optional[Tuple[int, int]] = None,
                       desc: str = "embedding report sections") -> StageTimes:
    """Reader, mapper, writer of the report sections (see :func:`run_image_stages`)."""
    rows = pending_sections(store, shard)
    times = StageTimes()
    if not rows:
        return times
    from tqdm.auto import tqdm

    bar = tqdm(total=len(rows), desc=desc, unit="section", disable=not progress)
    for ids, vectors in mapper(rows, times):
        t0 = time.perf_counter()
        write_section_batch(store, ids, vectors, times)
        times.write_s += time.perf_counter() - t0
        bar.update(len(ids))
    bar.close()
    return times
