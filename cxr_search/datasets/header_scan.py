"""DICOM header reads for the adapters: failures become skip reasons, optional process pool."""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from pathlib import Path
from typing import Any, Deque, Dict, Iterable, Iterator, List, Optional, Tuple, Union

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
#: The reason of a file the scanning user may not read.
PERMISSION_DENIED = "permission denied"


def header_or_reason(path: PathLike) -> Tuple[Optional[Any], Optional[str], str]:
    """Read a DICOM header, turning every failure into a skip reason (never raises on a bad file).

    The file is checked with ``stat`` first: a FIFO, socket or device is never opened (reading a
    FIFO blocks until someone writes to it), it gets the reason ``not a regular file (FIFO)``.

    Returns:
        (header or None, short reason or None, detail message).
    """
    from cxr_search.datasets.file_walk import non_regular_reason
    from cxr_search.dicom.header import read_dicom_header
    from cxr_search.errors import DicomError, NotDicomError

    try:
        why = non_regular_reason(os.stat(path).st_mode)
    except FileNotFoundError:
        return None, "file not found", f"{path}: the file vanished after the folder was listed"
    except OSError as exc:
        return None, "unreadable file", f"{path}: {exc.strerror or exc}"
    if why is not None:
        return None, why, ""
    try:
        return read_dicom_header(path), None, ""
    except NotDicomError as exc:
        return None, "not DICOM", str(exc)
    except DicomError as exc:
        if isinstance(exc.__cause__, PermissionError):
            return None, PERMISSION_DENIED, str(exc)
        return None, "unreadable DICOM", str(exc)
    except Exception as exc:  # a bad file must never stop a scan of thousands
        logger.debug("%s: unexpected error reading the header", path, exc_info=True)
        return None, "unreadable DICOM", f"{path}: {type(exc).__name__}: {exc}"


def _header_job(path: str) -> Tuple[str, Optional[Any], Optional[str], str]:
    header, reason, detail = header_or_reason(path)
    return path, header, reason, detail


def iter_headers(
    paths: Iterable[PathLike], *, workers: int = 1, chunksize: int = 64
) -> Iterator[Tuple[str, Optional[Any], Optional[str], str]]:
    """Header reads of many files, in input order, optionally in a process pool.

    ``paths`` is consumed lazily with at most ``4 * workers`` chunks in flight (``Pool.imap`` would
    drain the whole generator into its task queue), so a walk over a huge tree stays a stream.
    Workers are forked when this process runs no other Python thread (fast, and no main-module
    re-import, so scripts without an ``if __name__ == "__main__"`` guard work); otherwise, since
    forking a process whose other threads may hold locks can deadlock the child, they are started
    with ``forkserver`` (``spawn`` where that is missing), which needs that guard in scripts.

    Args:
        paths: Files to read.
        workers: Processes; 1 reads in this process. Header reads take ~1 ms and the pool costs
            about a second to start, so it pays off on many cores or slow network storage only.
        chunksize: Paths sent to a worker at once.

    Yields:
        (path, header or None, reason or None, detail).
    """
    if workers <= 1:
        for p in paths:
            yield _header_job(str(p))
        return
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        method = "fork"
    else:
        method = "forkserver" if "forkserver" in methods else "spawn"
    context = multiprocessing.get_context(method)
    logger.debug("reading headers with %d %s workers", workers, method)
    with context.Pool(workers) as pool:
        pending: Deque[Any] = deque()
        for chunk in _chunks(paths, chunksize):
            pending.append(pool.apply_async(_header_chunk, (chunk,)))
            while len(pending) >= 4 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def _header_chunk(paths: List[str]) -> List[Tuple[str, Optional[Any], Optional[str], str]]:
    return [_header_job(p) for p in paths]


def _chunks(paths: Iterable[PathLike], size: int) -> Iterator[List[str]]:
    chunk: List[str] = []
    for p in paths:
        chunk.append(str(p))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def header_fields(header: Any) -> Dict[str, Any]:
    """Manifest fields taken from a :class:`cxr_search.dicom.header.DicomHeader` (sex, age, date, view, UIDs)."""
    return {
        "view": header.view or "UNKNOWN",
        "sex": header.sex or "",
        "age": header.age_years,
        "study_date": header.study_date.isoformat() if header.study_date is not None else "",
        "sop_instance_uid": header.sop_instance_uid or "",
        "series_instance_uid": header.series_instance_uid or "",
        "accession_number": header.accession_number or "",
    }


def readable_image_headers(paths: Iterable[PathLike], skips: Any, *, workers: int = 1) -> Dict[str, Any]:
    """Headers of the files that are DICOM images, keyed by path string; the others become skips.

    Args:
        paths: Candidate files.
        skips: A :class:`cxr_search.datasets.adapter_kit.SkipLog` that receives unreadable files
            (with their reason) and objects without pixel data.
        workers: Processes for the header reads.
    """
    headers: Dict[str, Any] = {}
    for path_str, header, reason, detail in iter_headers(paths, workers=workers):
        if header is None:
            skips.skip(reason or "unreadable DICOM", detail or path_str)
        elif not header.has_pixel_data:
            skips.skip("no pixel data", path_str)
        else:
            headers[path_str] = header
    return headers


__all__ = ["PERMISSION_DENIED", "header_fields", "header_or_reason", "iter_headers", "readable_image_headers"]
