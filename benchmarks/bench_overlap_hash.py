"""Near-duplicate fingerprints on radiographs: same image altered vs different images.

Usage:
    .venv/bin/python benchmarks/bench_overlap_hash.py --archive DIR [--n 1500] [--json OUT.json]

``DIR`` is a folder of radiographs (DICOM/PNG/JPEG, searched recursively; e.g. a synthetic PACS archive
from ``cxr-search data synth``, whose top-level folders are patients). Every image is decoded through the
engine's reader and compared with altered copies of itself (JPEG quality 95/90/75, half size, half size +
JPEG 75, gamma 0.8 and 0.5, histogram equalisation, a 2 % border crop) and with every image of *other*
patients (images of one patient may be follow-ups of one chest).

Two fingerprints are measured:

* ``dhash64``: the 64-bit difference hash (``imagehash.dhash``), as a Hamming distance;
* ``thumbs``: what ``cxr-search bench overlap`` uses (``cxr_search.evaluation.image_hash``): 1 - the larger of the
  Pearson correlations of the plain and of the histogram-equalised 16x16 thumbnails.

A usable threshold must sit above every "same image" value and below the "different images" minimum.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from cxr_search.evaluation.image_hash import hash_pixels, read_grey, stretch_to_full_range, thumb_vectors  # noqa: E402
from cxr_search.fileio import emit_json, write_json_atomic  # noqa: E402

_SUFFIXES = {".dcm", ".png", ".jpg", ".jpeg"}


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("L")


def variants(arr: np.ndarray) -> dict:
    """Altered copies of one 8-bit image, by name."""
    img = Image.fromarray(arr, mode="L")
    w, h = img.size
    half = img.resize((w // 2, h // 2), Image.Resampling.BILINEAR)
    cw, ch = int(w * 0.02), int(h * 0.02)
    return {
        "jpeg95": _jpeg(img, 95), "jpeg90": _jpeg(img, 90), "jpeg75": _jpeg(img, 75), "half": half,
        "half_jpeg75": _jpeg(half, 75),
        "gamma0.8": Image.fromarray(np.rint(255.0 * (arr / 255.0) ** 0.8).astype(np.uint8), mode="L"),
        "gamma0.5": Image.fromarray(np.rint(255.0 * (arr / 255.0) ** 0.5).astype(np.uint8), mode="L"),
        "histeq": ImageOps.equalize(img), "crop2pct": img.crop((cw, ch, w - cw, h - ch)),
    }


def dhash64(arr: np.ndarray) -> np.ndarray:
    """64 dHash bits (imagehash.dhash): LANCZOS to 9x8, left < right."""
    small = np.asarray(Image.fromarray(arr, mode="L").resize((9, 8), Image.Resampling.LANCZOS))
    return (small[:, 1:] > small[:, :-1]).ravel()


def thumb_distance(a, b) -> float:
    """1 - max(plain r, equalised r) of two ContentHash objects."""
    r = max(float(thumb_vectors([a.thumb])[0] @ thumb_vectors([b.thumb])[0]),
            float(thumb_vectors([a.thumb_eq])[0] @ thumb_vectors([b.thumb_eq])[0]))
    return 1.0 - r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", type=Path, required=True)
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    files = sorted(p for p in args.archive.rglob("*") if p.suffix.lower() in _SUFFIXES)[: args.n]
    bits, hashes, groups = [], [], []
    same: dict = {"dhash64": {}, "thumbs": {}}
    for p in files:
        try:
            arr = stretch_to_full_range(read_grey(p))
        except Exception:  # broken files of the synthetic archive are expected
            continue
        h, b = hash_pixels(arr), dhash64(arr)
        hashes.append(h)
        bits.append(b)
        groups.append(p.relative_to(args.archive).parts[0])
        for name, img in variants(arr).items():
            v = stretch_to_full_range(np.asarray(img))
            same["dhash64"].setdefault(name, []).append(int((dhash64(v) != b).sum()))
            same["thumbs"].setdefault(name, []).append(thumb_distance(h, hash_pixels(v)))
    g = np.asarray(groups)
    iu = np.triu_indices(len(g), 1)
    other = (g[:, None] != g[None, :])[iu]
    x = np.asarray(bits, dtype=np.int16)
    dh = np.zeros((len(g), len(g)), dtype=np.int16)
    for i in range(len(g)):
        dh[i] = (x != x[i]).sum(1)
    plain = thumb_vectors([h.thumb for h in hashes])
    eq = thumb_vectors([h.thumb_eq for h in hashes])
    th = 1.0 - np.maximum(plain @ plain.T, eq @ eq.T)
    result = {"images": len(g), "pairs_of_different_patients": int(other.sum())}
    for name, d, cuts in (("dhash64", dh, (2, 4, 6, 8, 10)), ("thumbs", th, (1e-4, 1e-3, 2e-3, 3e-3))):
        diff = d[iu][other]
        masked = np.where(g[:, None] != g[None, :], d, np.inf)
        nearest = masked.min(1)
        result[name] = {
            "same_image_max": {k: round(float(max(v)), 6) for k, v in same[name].items()},
            "different_images_min": round(float(diff.min()), 6),
            "different_images_nearest_p1_p50": [round(float(np.percentile(nearest, q)), 6) for q in (1, 50)],
            "different_pairs_within": {str(c): int((diff <= c).sum()) for c in cuts},
        }
    emit_json(result)
    if args.json:
        write_json_atomic(args.json, result)


if __name__ == "__main__":
    main()
