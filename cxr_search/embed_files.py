"""``embed images``' input: image files and folders, read the way ``index build`` reads an archive.

Folders are walked (hidden files and ``DICOMDIR`` skipped); a file is taken when its suffix is an image
or DICOM one, or when it has the ``DICM`` magic at byte 128 (PACS exports often have no extensions). A
file that cannot be decoded is recorded with its reason and the others are embedded: one broken file
does not stop a folder.
"""

from __future__ import annotations

import concurrent.futures
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from cxr_search.config import PreprocessConfig
from cxr_search.datasets.adapter_kit import walk_files
from cxr_search.errors import InputFileError
from cxr_search.images import is_dicom_path, preprocess_item

logger = logging.getLogger(__name__)

#: Suffixes of files taken from a folder without looking inside them.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}


def expand_image_paths(paths: Sequence[Path]) -> List[Path]:
    """Files as given; folders expanded recursively to image and DICOM files (extension-less DICOM too), sorted.

    Raises:
        InputFileError: A given path does not exist.
    """
    out: List[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(f for f in walk_files(p)
                       if f.name.upper() != "DICOMDIR" and (f.suffix.lower() in IMAGE_SUFFIXES or is_dicom_path(f)))
        elif p.is_file():
            out.append(p)
        else:
            raise InputFileError(str(p), "no such file or directory")
    return out


@dataclass
class EmbeddedFiles:
    """What :func:`embed_files` made of a list of files.

    Attributes:
        vectors: float32 ``[N, D]``, one row per file in ``paths``, L2-normalised.
        paths: The files embedded, in row order.
        failed: ``(file, reason)`` of every file that could not be read.
    """

    vectors: np.ndarray
    paths: List[Path] = field(default_factory=list)
    failed: List[Tuple[Path, str]] = field(default_factory=list)


def _decode(item: Tuple[Path, PreprocessConfig]) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """(pixels ``[3, H, W]``, None) or (None, reason): one file through the eval transform."""
    path, preprocess = item
    try:
        return preprocess_item(path, preprocess).numpy(), None
    except InputFileError as exc:
        return None, exc.reason
    except (OSError, ValueError) as exc:  # what a decoder raises on a damaged file it does not know as one
        return None, f"cannot be decoded: {exc}"


def _decoded(files: Sequence[Path], preprocess: PreprocessConfig, workers: int) -> Iterator[Tuple[Path, Any, Any]]:
    items = [(f, preprocess) for f in files]
    if workers <= 0:
        for f, item in zip(files, items, strict=True):
            yield (f, *_decode(item))
        return
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        for f, result in zip(files, pool.map(_decode, items, chunksize=8), strict=True):
            yield (f, *result)


def embed_files(embedder: Any, files: Sequence[Path], *, batch_size: int, workers: int = 0,
                progress: bool = False) -> EmbeddedFiles:
    """Embed ``files`` with ``embedder`` (a :class:`cxr_search.inference.Embedder`), skipping unreadable ones.

    The rows equal :meth:`Embedder.embed_images` of the readable files (same decoding, same transform,
    same model step).

    Args:
        embedder: The Embedder.
        files: Image or DICOM files.
        batch_size: Images per forward pass.
        workers: Decoding processes (0: decode in this process).
        progress: A progress bar on stderr.
    """
    import torch

    vectors: List[np.ndarray] = []
    done: List[Path] = []
    failed: List[Tuple[Path, str]] = []
    batch: List[np.ndarray] = []

    def flush() -> None:
        if batch:
            vectors.append(embedder.embed_pixels(torch.from_numpy(np.stack(batch))))  # [B, D]
            batch.clear()

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(files), unit="image", desc="embedding images")
    try:
        for path, pixels, reason in _decoded(files, embedder.config.preprocess, workers):
            if pixels is None:
                logger.info("%s: not embedded: %s", path, reason)
                failed.append((path, str(reason)))
            else:
                batch.append(pixels)
                done.append(path)
                if len(batch) >= batch_size:
                    flush()
            if bar is not None:
                bar.update(1)
        flush()
    finally:
        if bar is not None:
            bar.close()
    out = np.concatenate(vectors) if vectors else np.zeros((0, embedder.embed_dim), dtype=np.float32)
    return EmbeddedFiles(out.astype(np.float32, copy=False), done, failed)


__all__ = ["EmbeddedFiles", "IMAGE_SUFFIXES", "embed_files", "expand_image_paths"]
