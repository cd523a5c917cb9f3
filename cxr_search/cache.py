"""A resized 8-bit PNG copy of a manifest's images, the form the released models were trained on.

The reference trained on images pre-resized to a shorter side of 512 and stored as 8-bit. Decoding a
3000x2500 JPEG or a JPEG 2000 DICOM for every sample of every epoch costs far more than the model step,
so training reads this cache instead. Images go through :func:`cxr_search.images.load_image` (for DICOM:
the full photometric chain and the antialiased resize), then a PIL bilinear (antialiased) resize of the
shorter side for everything else.

Layout: ``OUT/<dataset>/<2 hex>/<image id>-<16 hex>.png``, named from ``(dataset, image_id)`` (stable
when the source tree moves), with a ``cache.json`` recording the shorter side. The build is
resumable: each PNG is written under a ``.partial`` name and renamed into place, so a killed run never
leaves a half-written file under a final name, and a rerun skips what is done. One builder at a time
per cache directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np
from PIL import Image
from tqdm import tqdm

from cxr_search.config import PreprocessConfig
from cxr_search.errors import ConfigError, DatasetError, InputFileError
from cxr_search.images import load_image, resize_shorter_side

logger = logging.getLogger(__name__)

__all__ = ["CACHE_INFO_FILE", "CacheResult", "build_cache", "cache_path", "cache_one"]

CACHE_INFO_FILE = "cache.json"
_CACHE_FORMAT = "cxr-search image cache"
_CACHE_VERSION = 1
_SAFE_RE = re.compile(r"[^A-Za-z0-9._-]+")
# zlib level 6 (PIL's default): on a noisy 512x620 grey test image it wrote files 13% smaller than
# level 3 and read slightly faster, at twice the write time; the cache is written once, read every epoch.
_PNG_COMPRESS_LEVEL = 6


@dataclass
class CacheResult:
    """What :func:`build_cache` did.

    Attributes:
        rows: The input rows (copies) whose image could be cached, ``image_path`` pointing to the
            cached PNG; other columns unchanged, order kept.
        cached: Images written by this run.
        reused: Images already in the cache (skipped).
        failed: ``(source path, reason)`` of each image that could not be read; their rows are left
            out of ``rows``.
        out_dir: The cache directory.
    """

    rows: List[Dict[str, Any]]
    cached: int = 0
    reused: int = 0
    failed: List[Tuple[str, str]] = field(default_factory=list)
    out_dir: Optional[Path] = None

    def summary(self) -> str:
        """One line for logs and the CLI."""
        return (
            f"{self.cached} images written, {self.reused} reused, {len(self.failed)} failed"
            + (f" (first: {self.failed[0][0]}: {self.failed[0][1]})" if self.failed else "")
            + (f"; cache at {self.out_dir}" if self.out_dir else "")
        )


def _safe(text: str, limit: int) -> str:
    return _SAFE_RE.sub("_", text).strip("._")[:limit] or "x"


def cache_path(out_dir: Union[str, Path], dataset: str, image_id: str) -> Path:
    """Where the cached copy of image ``image_id`` of ``dataset`` lives (the file may not exist).

    The name keeps a readable prefix of the image id and adds a hash of ``(dataset, image_id)`` so
    that ids differing only in characters a file name cannot hold stay distinct.
    """
    digest = hashlib.sha256(f"{dataset}\x00{image_id}".encode("utf-8")).hexdigest()
    return Path(out_dir) / _safe(dataset, 64) / digest[:2] / f"{_safe(image_id, 80)}-{digest[:16]}.png"


def _is_done(path: Path) -> bool:
    try:
        return path.stat().st_size > 0  # an empty file is what a crash can leave after a rename
    except OSError:
        return False


def cache_one(source: str, target: Union[str, Path], shorter_side: int) -> Optional[str]:
    """Decode ``source``, resize, and write ``target`` atomically.

    Args:
        source: Image file (PNG, JPEG, DICOM ...).
        target: PNG path to create (its parent is created).
        shorter_side: Shorter side of the written image, in pixels.

    Returns:
        None on success, else the reason the source could not be read.

    Raises:
        OSError: The target cannot be written (disk full, permissions): not a per-image problem.
    """
    try:
        img = load_image(source, PreprocessConfig(dicom_shorter_side=shorter_side))
    except InputFileError as exc:  # ImageReadError, DicomError and their kin
        return exc.reason
    if img.mode == "RGB":
        arr = np.asarray(img)
        if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
            img = img.convert("L")  # exact for equal channels; a third of the disk and decode time
    # DICOM is already at the size (load_image resized it); this is then a no-op.
    img = resize_shorter_side(img, shorter_side, Image.Resampling.BILINEAR)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        img.save(partial, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
        os.replace(partial, target)
    except BaseException:
        try:
            partial.unlink()
        except OSError:
            pass
        raise
    return None


def _cache_task(task: Tuple[str, str, int]) -> Optional[str]:
    return cache_one(*task)


def _check_cache_info(out_dir: Path, shorter_side: int) -> None:
    info_path = out_dir / CACHE_INFO_FILE
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DatasetError(f"{info_path}: unreadable cache description ({exc}); delete it to rebuild") from exc
        if info.get("format") != _CACHE_FORMAT or int(info.get("shorter_side", -1)) != shorter_side:
            raise ConfigError(
                f"{out_dir}: this cache holds images with shorter side {info.get('shorter_side')}, "
                f"not {shorter_side}; use another output directory"
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    info_path.write_text(
        json.dumps({"format": _CACHE_FORMAT, "version": _CACHE_VERSION, "shorter_side": shorter_side}) + "\n",
        encoding="utf-8",
    )


def build_cache(
    rows: Iterable[Mapping[str, Any]],
    out_dir: Union[str, Path],
    *,
    shorter_side: int = 512,
    workers: int = 2,
    progress: bool = True,
) -> CacheResult:
    """Write resized 8-bit PNG copies of the rows' images and return rows that point to them.

    Images already in the cache are reused (not re-read, not rewritten), so an interrupted build
    resumes where it stopped.

    Args:
        rows: Manifest rows (need ``dataset``, ``image_id``, ``image_path``).
        out_dir: Cache directory (created).
        shorter_side: Shorter side of the cached images (512 for the released models).
        workers: Decoding processes; 1 (or 0) decodes in this process.
        progress: Show a tqdm progress bar.

    Returns:
        The rows with ``image_path`` replaced and the counts; unreadable images are listed in
        ``failed`` and their rows left out.

    Raises:
        DatasetError: A row lacks ``dataset``, ``image_id`` or ``image_path``.
        ConfigError: ``out_dir`` is a cache of another shorter side, or a bad argument.
        OSError: The cache cannot be written.
    """
    if int(shorter_side) < 1:
        raise ConfigError(f"shorter_side must be a positive number of pixels, got {shorter_side}")
    shorter_side = int(shorter_side)
    out_dir = Path(out_dir)
    _check_cache_info(out_dir, shorter_side)

    targets: List[Path] = []
    copies: List[Dict[str, Any]] = []
    sources: Dict[Path, str] = {}
    for n, row in enumerate(rows, start=1):
        values = {k: str(row.get(k) or "").strip() for k in ("dataset", "image_id", "image_path")}
        missing = [k for k, v in values.items() if not v]
        if missing:
            raise DatasetError(f"manifest row {n} has no {', '.join(missing)}; cannot cache its image")
        target = cache_path(out_dir, values["dataset"], values["image_id"])
        previous = sources.setdefault(target, values["image_path"])
        if previous != values["image_path"]:
            logger.warning(
                "image %s/%s appears twice with different files (%s, %s); caching the first",
                values["dataset"], values["image_id"], previous, values["image_path"],
            )
        targets.append(target)
        copies.append(dict(row))

    tasks: List[Tuple[str, str, int]] = []
    reused = 0
    for target, source in sources.items():
        if _is_done(target):
            reused += 1
        else:
            tasks.append((source, str(target), shorter_side))
    logger.info("image cache %s: %d to write, %d already cached", out_dir, len(tasks), reused)

    errors: Dict[Path, str] = {}
    bar = tqdm(total=len(tasks), desc="caching images", unit="img", disable=not progress or not tasks)
    try:
        if workers <= 1 or len(tasks) <= 1:
            results: Iterable[Optional[str]] = map(_cache_task, tasks)
            for task, reason in zip(tasks, results, strict=False):
                if reason is not None:
                    errors[Path(task[1])] = reason
                bar.update(1)
        else:
            with multiprocessing.Pool(min(workers, len(tasks))) as pool:
                # Ordered imap keeps results aligned with tasks; small chunks keep the bar moving.
                for task, reason in zip(tasks, pool.imap(_cache_task, tasks, chunksize=4), strict=False):
                    if reason is not None:
                        errors[Path(task[1])] = reason
                    bar.update(1)
    finally:
        bar.close()

    out_rows: List[Dict[str, Any]] = []
    for target, row in zip(targets, copies, strict=False):
        if target in errors:
            continue
        row["image_path"] = str(target)
        out_rows.append(row)
    failed = [(sources[t], reason) for t, reason in errors.items()]
    for source, reason in failed[:20]:
        logger.warning("cannot cache %s: %s", source, reason)
    if len(failed) > 20:
        logger.warning("... and %d more unreadable images", len(failed) - 20)
    result = CacheResult(
        rows=out_rows, cached=len(tasks) - len(errors), reused=reused, failed=failed, out_dir=out_dir
    )
    logger.info("image cache: %s", result.summary())
    return result
