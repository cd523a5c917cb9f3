"""Content fingerprints of radiographs for overlap checks: an exact pixel digest and two thumbnails.

Images are decoded through the engine's own readers (DICOM: :func:`cxr_search.dicom.read.read_dicom`, the
full photometric chain at full resolution; PNG/JPEG: :func:`cxr_search.images.load_image`) into 8-bit
grey, then stretched to the full 0..255 range with the formula the DICOM chain ends with. The stretch is
the identity on images already at full range, and it makes a PNG and the 8-bit DICOM it was converted to
(RSNA Pneumonia's DICOMs are NIH ChestX-ray14 PNGs re-wrapped) fingerprint equal even when the DICOM
reader stretched a narrower range.

* :func:`pixel_digest`: SHA-256 of the shape and the stretched pixels: equal means identical images.
* Near duplicates: two 16x16 thumbnails (LANCZOS, aspect ignored), one of the image and one of its
  histogram-equalised copy, compared by Pearson correlation (cosine of the mean-centred thumbnails).
  A pair is a near duplicate when either correlation is at least :data:`DEFAULT_MIN_CORRELATION`. The
  plain thumbnail is unmoved by re-encoding and resizing (JPEG quality 75-95, half size: 1 - r <= 1e-4);
  the equalised one by any monotone change of contrast (gamma, a window, histogram equalisation: 1 - r
  <= 1e-4), because equalisation depends only on the order of grey values. Crops, flips and rotations
  are not detected.

Why not a 64-bit difference hash (``imagehash.dhash``, Hamming distance)? Measured with
``benchmarks/bench_overlap_hash.py`` on 1,499 synthetic radiographs (1.12M pairs of images of different
patients): every chest film looks alike at 9x8 pixels (dark lungs either side of a bright mediastinum),
so the median image had an image of another patient at Hamming distance 1, and 159,408 pairs (14 %) were
within 6 bits, while a gamma change or histogram equalisation of one image moved 11 bits. The thumbnails
keep the magnitudes: with the rule above no pair of different images came closer than 1 - r = 0.0022,
and no altered copy (crop aside) further than 6.2e-5, so the threshold 1 - r <= 0.001 sits 2x below
the closest different pair and 16x above every re-encode tested. Synthetic films share one anatomy
template, so real archives are unlikely to be closer; ``--min-correlation`` moves the threshold, and the
pairs CSV lists each pair's correlation for a look at the borderline ones.

:class:`HashCache` keeps fingerprints in SQLite keyed by resolved path, size and modification time, so
a second overlap run over the same archive decodes nothing; :func:`hash_files` streams the files through
a few worker processes with a progress bar and writes the cache as it goes.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from cxr_search.errors import ConfigError, InputFileError

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

#: Bumped when decoding or fingerprinting changes; cached fingerprints of other versions are recomputed.
HASH_VERSION = 1
#: Side of the thumbnails (16 x 16 = 256 values, 256 bytes each in the cache).
THUMB_SIDE = 16
#: Smallest thumbnail correlation counted as a near duplicate (see the module docstring).
DEFAULT_MIN_CORRELATION = 0.999

_THUMB_SIZE = THUMB_SIDE * THUMB_SIDE
_SQL_BATCH = 500  # SQLite's default limit of host parameters is 999


@dataclass(frozen=True)
class ContentHash:
    """Fingerprints of one decoded image.

    Attributes:
        pixel_sha256: Hex SHA-256 of ``"HxW:"`` and the stretched 8-bit pixels.
        thumb: 16x16 uint8 LANCZOS thumbnail of the stretched image, row-major bytes.
        thumb_eq: The same of the histogram-equalised image.
        height: Rows of the decoded image.
        width: Columns of the decoded image.
    """

    pixel_sha256: str
    thumb: bytes
    thumb_eq: bytes
    height: int
    width: int


def stretch_to_full_range(pixels: np.ndarray) -> np.ndarray:
    """Min-max stretch of uint8 pixels to 0..255, as the DICOM display chain's last step computes it.

    ``rint((v - min) * 255 / (max - min))`` in float64, through a 256-entry table; a constant image
    becomes all zeros (as in :func:`cxr_search.dicom.read.read_dicom`); an image spanning 0..255 is unchanged.
    """
    lo, hi = int(pixels.min()), int(pixels.max())
    if lo == 0 and hi == 255:
        return pixels
    if hi <= lo:
        return np.zeros(pixels.shape, dtype=np.uint8)
    table = np.rint(np.clip((np.arange(256, dtype=np.float64) - lo) * (255.0 / (hi - lo)), 0.0, 255.0))
    return table.astype(np.uint8)[pixels]


def pixel_digest(pixels: np.ndarray) -> str:
    """Hex SHA-256 of a 2-D uint8 image's shape and pixels (call on stretched pixels)."""
    h = hashlib.sha256(f"{pixels.shape[0]}x{pixels.shape[1]}:".encode("ascii"))
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()


def thumbnail(pixels: np.ndarray, side: int = THUMB_SIDE, *, equalise: bool = False) -> bytes:
    """``side x side`` uint8 LANCZOS thumbnail (aspect ignored) of a 2-D uint8 image, optionally equalised first."""
    img = Image.fromarray(pixels, mode="L")
    if equalise:
        img = ImageOps.equalize(img)
    return img.resize((side, side), Image.Resampling.LANCZOS).tobytes()


def thumb_vectors(thumbs: Sequence[bytes], dtype: type = np.float32) -> np.ndarray:
    """Mean-centred, unit-norm rows of thumbnails (a constant thumbnail gives a zero row).

    The inner product of two rows is the Pearson correlation of the thumbnails.
    """
    x = np.frombuffer(b"".join(thumbs), dtype=np.uint8).reshape(len(thumbs), -1).astype(np.float64)
    x -= x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).astype(dtype)


def thumb_correlation(a: ContentHash, b: ContentHash) -> float:
    """The larger of the plain and the equalised thumbnail correlations of two images (float64)."""
    va = thumb_vectors([a.thumb, a.thumb_eq], np.float64)
    vb = thumb_vectors([b.thumb, b.thumb_eq], np.float64)
    return float(max(va[0] @ vb[0], va[1] @ vb[1]))


def read_grey(path: PathLike) -> np.ndarray:
    """Decode an image file into a 2-D uint8 grey array at full resolution, through the engine's readers.

    Raises:
        ImageReadError: Missing or undecodable PNG/JPEG file.
        DicomError: A DICOM file that cannot be turned into a radiograph.
    """
    from cxr_search.config import PreprocessConfig
    from cxr_search.dicom.read import read_dicom
    from cxr_search.errors import ImageReadError
    from cxr_search.images import is_dicom_path, load_image

    p = Path(path)
    if not p.is_file():
        raise ImageReadError(str(p), "file not found")
    if is_dicom_path(p):
        return read_dicom(p).pixels  # full resolution: the exact digest needs every pixel
    img = load_image(p, PreprocessConfig())  # PNG/JPEG come back as stored (mode L or RGB)
    if img.mode == "L":
        return np.asarray(img)
    arr = np.asarray(img)
    if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
        return np.ascontiguousarray(arr[..., 0])  # grey stored as RGB: exact
    return np.asarray(img.convert("L"))


def hash_pixels(pixels: np.ndarray) -> ContentHash:
    """:class:`ContentHash` of a decoded 2-D uint8 image."""
    if pixels.ndim != 2 or pixels.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 image, got {pixels.dtype} of shape {pixels.shape}")
    s = stretch_to_full_range(pixels)
    return ContentHash(pixel_digest(s), thumbnail(s), thumbnail(s, equalise=True), int(s.shape[0]), int(s.shape[1]))


def hash_image(path: PathLike) -> ContentHash:
    """Decode ``path`` (:func:`read_grey`) and fingerprint it (:func:`hash_pixels`)."""
    return hash_pixels(read_grey(path))


def _hash_task(path: str) -> Tuple[str, Optional[ContentHash], Optional[str]]:
    """Worker: ``(path, hash, None)`` or ``(path, None, reason)`` for an unreadable file."""
    try:
        return path, hash_image(path), None
    except InputFileError as exc:  # ImageReadError, DicomError and kin: a per-file problem, not a crash
        return path, None, exc.reason
    except (OSError, ValueError) as exc:
        return path, None, f"{type(exc).__name__}: {exc}"


def default_cache_file() -> Path:
    """``$XDG_CACHE_HOME/cxr-search/image-hashes.sqlite`` (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cxr-search" / "image-hashes.sqlite"


class HashCache:
    """Fingerprints in SQLite keyed by (resolved path, size, mtime_ns, :data:`HASH_VERSION`).

    A changed file (size or modification time) or another version misses and is recomputed; failures
    are not cached (a decoder installed later may read the file).
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path))
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                "version INTEGER, sha256 TEXT, thumb BLOB, thumb_eq BLOB, height INTEGER, width INTEGER)"
            )
            self._db.commit()
        except (OSError, sqlite3.Error) as exc:
            raise InputFileError(self.path, f"cannot open the hash cache ({exc}); give another --cache or "
                                            "use --no-cache") from exc

    def get_many(self, stamps: Dict[str, Tuple[int, int]]) -> Dict[str, ContentHash]:
        """Cached fingerprints of the paths whose ``(size, mtime_ns)`` still match."""
        out: Dict[str, ContentHash] = {}
        paths = list(stamps)
        for start in range(0, len(paths), _SQL_BATCH):
            chunk = paths[start:start + _SQL_BATCH]
            marks = ",".join("?" * len(chunk))
            for path, size, mtime, version, sha, thumb, thumb_eq, h, w in self._db.execute(
                "SELECT path, size, mtime_ns, version, sha256, thumb, thumb_eq, height, width FROM hashes "
                f"WHERE path IN ({marks})", chunk,
            ):
                if version == HASH_VERSION and (size, mtime) == stamps[path]:
                    out[path] = ContentHash(sha, bytes(thumb), bytes(thumb_eq), h, w)
        return out

    def put_many(self, items: Iterable[Tuple[str, Tuple[int, int], ContentHash]]) -> None:
        """Store ``(path, (size, mtime_ns), fingerprint)`` items and commit."""
        self._db.executemany(
            "INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(p, s[0], s[1], HASH_VERSION, c.pixel_sha256, c.thumb, c.thumb_eq, c.height, c.width)
             for p, s, c in items],
        )
        self._db.commit()

    def close(self) -> None:
        """Close the database."""
        self._db.close()


@dataclass
class HashRun:
    """What :func:`hash_files` did.

    Attributes:
        hashes: path -> fingerprint of every readable file.
        errors: path -> reason for every unreadable file.
        from_cache: Files whose fingerprint came from the cache.
        decoded: Files decoded by this run.
    """

    hashes: Dict[str, ContentHash]
    errors: Dict[str, str]
    from_cache: int = 0
    decoded: int = 0


def _stat(path: str) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return int(st.st_size), int(st.st_mtime_ns)


def _results(todo: List[str], workers: int) -> Iterator[Tuple[str, Optional[ContentHash], Optional[str]]]:
    if workers <= 1 or len(todo) <= 1:
        yield from map(_hash_task, todo)
        return
    # Import the readers (and torch, which cxr_search.images imports) once, before forking: else every
    # worker imports them itself, seconds each on a busy 2-core machine.
    import cxr_search.dicom.read  # noqa: F401
    import cxr_search.images  # noqa: F401

    with multiprocessing.Pool(min(workers, len(todo))) as pool:
        # Unordered: results are keyed by path, and a slow JPEG 2000 file does not hold up the others.
        yield from pool.imap_unordered(_hash_task, todo, chunksize=8)


def hash_files(paths: Sequence[str], *, cache_file: Optional[PathLike] = None, workers: int = 2,
               progress: bool = False, commit_every: int = 256) -> HashRun:
    """Fingerprints of files, from the cache where valid, else decoded in ``workers`` processes.

    Args:
        paths: Resolved file paths (duplicates are decoded once).
        cache_file: SQLite cache (created); ``None`` keeps nothing between runs.
        workers: Decoding processes; 1 decodes in this process.
        progress: Show a tqdm progress bar on stderr.
        commit_every: Write new fingerprints to the cache every this many files, so an interrupted run
            keeps its work.

    Returns:
        The fingerprints and the unreadable files with reasons.

    Raises:
        InputFileError: The cache cannot be opened.
    """
    unique = sorted(set(paths))
    stamps: Dict[str, Tuple[int, int]] = {}
    errors: Dict[str, str] = {}
    for p in unique:
        st = _stat(p)
        if st is None:
            errors[p] = "file not found"
        else:
            stamps[p] = st
    cache = HashCache(cache_file) if cache_file is not None else None
    try:
        hashes = cache.get_many(stamps) if cache is not None else {}
        from_cache = len(hashes)
        todo = [p for p in stamps if p not in hashes]
        logger.info("fingerprints: %d cached, %d to decode, %d missing files", from_cache, len(todo), len(errors))
        pending: List[Tuple[str, Tuple[int, int], ContentHash]] = []
        with tqdm(total=len(todo), desc="hashing images", unit="img", disable=not progress or not todo) as bar:
            for path, content, reason in _results(todo, workers):
                if content is None:
                    errors[path] = reason or "unreadable"
                else:
                    hashes[path] = content
                    pending.append((path, stamps[path], content))
                if cache is not None and len(pending) >= commit_every:
                    cache.put_many(pending)
                    pending = []
                bar.update(1)
        if cache is not None and pending:
            cache.put_many(pending)
    finally:
        if cache is not None:
            cache.close()
    return HashRun(hashes=hashes, errors=errors, from_cache=from_cache, decoded=len(todo))


def near_duplicate_pairs(test: Sequence[ContentHash], train: Sequence[ContentHash],
                         min_correlation: float = DEFAULT_MIN_CORRELATION, *, chunk: int = 4096
                         ) -> List[Tuple[int, int, float]]:
    """All ``(test index, train index, r)`` with :func:`thumb_correlation` ``r >= min_correlation``.

    Candidates come from an exhaustive (exact) float32 inner-product range search with FAISS, a margin
    below the threshold and queried in chunks so the result lists stay small; each candidate is then
    scored again in float64 (:func:`thumb_correlation`), so the decision and the reported ``r`` do not
    depend on BLAS blocking or thread count.

    Returns:
        Pairs sorted by test index, then train index.

    Raises:
        ConfigError: ``min_correlation`` not in (0, 1].
    """
    if not 0.0 < float(min_correlation) <= 1.0:
        raise ConfigError(f"the near-duplicate correlation must be in (0, 1], got {min_correlation}")
    if not len(test) or not len(train):
        return []
    import faiss

    candidates = set()
    # float32 dot products of 256 unit-vector entries are off by ~1e-7; 1e-4 of margin is ample.
    radius = float(min_correlation) - 1e-4
    for attr in ("thumb", "thumb_eq"):
        index = faiss.IndexFlatIP(_THUMB_SIZE)
        index.add(thumb_vectors([getattr(h, attr) for h in train]))
        for start in range(0, len(test), chunk):
            q = thumb_vectors([getattr(h, attr) for h in test[start:start + chunk]])
            lims, _, labels = index.range_search(q, radius)
            for r in range(len(q)):
                candidates.update((start + r, j) for j in labels[lims[r]:lims[r + 1]].tolist())
    out = []
    for i, j in sorted(candidates):
        r = thumb_correlation(test[i], train[j])
        if r >= min_correlation:
            out.append((i, j, min(r, 1.0)))
    return out


__all__ = [
    "DEFAULT_MIN_CORRELATION", "HASH_VERSION", "THUMB_SIDE", "ContentHash", "HashCache", "HashRun",
    "default_cache_file", "hash_files", "hash_image", "hash_pixels", "near_duplicate_pairs", "pixel_digest",
    "read_grey", "stretch_to_full_range", "thumb_correlation", "thumb_vectors", "thumbnail",
]
