"""Benchmark: DICOM decode + preprocess throughput with DataLoader-style worker processes.

Generates synthetic 12-bit radiographs (smooth anatomy-like structure plus mild noise, so that
lossless codecs compress them about as well as real chest films), writes each one uncompressed
and as JPEG 2000 lossless, then measures how many images per second a pool of worker processes
turns into model input: ``read_dicom`` (decode, modality/VOI LUT, inversion, min-max to uint8)
followed by a PIL bilinear resize of the shorter side to 512, with and without the
``reduce_to`` hint (which lets JPEG 2000 decode at a power-of-two reduced resolution).

Files are freshly written, so they are read from the page cache: the numbers are decode and
preprocessing cost, not disk throughput.

Usage:
    python benchmarks/bench_dicom.py --n 16 --size 2048x2048 --workers 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import pydicom  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid  # noqa: E402


def synthetic_radiograph(rows: int, cols: int, seed: int) -> np.ndarray:
    """A 12-bit chest-film-like image: body, lungs, ribs, spine, a little quantum noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    y, x = yy / rows, xx / cols
    jitter = rng.uniform(-0.03, 0.03, 4).astype(np.float32)
    body = np.exp(-(((x - 0.5 - jitter[0]) / 0.42) ** 4 + ((y - 0.55) / 0.55) ** 4))
    lungs = np.zeros_like(x)
    for cx in (0.31 + jitter[1], 0.69 + jitter[2]):
        lungs += np.exp(-(((x - cx) / 0.13) ** 2 + ((y - 0.45 - jitter[3]) / 0.25) ** 2))
    ribs = 0.06 * np.maximum(np.sin((y + 0.15 * np.abs(x - 0.5)) * 55.0), 0.0) ** 3 * lungs
    spine = 0.25 * np.exp(-(((x - 0.5) / 0.04) ** 2)) * body
    heart = 0.2 * np.exp(-(((x - 0.56) / 0.12) ** 2 + ((y - 0.62) / 0.12) ** 2))
    img = 0.1 + 0.65 * body - 0.4 * lungs + ribs + spine + heart
    img += rng.normal(0.0, 0.0025, img.shape).astype(np.float32)  # ~10 of 4095 levels
    return np.clip(img * 4095.0, 0, 4095).astype(np.uint16)


def write_pair(pixels: np.ndarray, directory: Path, index: int) -> tuple[Path, Path, float]:
    """Write `pixels` uncompressed and as JPEG 2000 lossless; returns paths and J2K ratio."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    # Alternate photometric interpretations so both inversion paths are exercised.
    ds.PhotometricInterpretation = "MONOCHROME1" if index % 2 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 3500
    ds.PixelData = (4095 - pixels if index % 2 else pixels).tobytes()
    raw = directory / f"raw_{index:04d}.dcm"
    ds.save_as(raw, enforce_file_format=True)
    size = len(ds.PixelData)
    ds.compress(JPEG2000Lossless)
    j2k = directory / f"j2k_{index:04d}.dcm"
    ds.save_as(j2k, enforce_file_format=True)
    return raw, j2k, size / len(ds.PixelData)


def _warm(_: int) -> int:
    from PIL import Image  # noqa: F401

    import cxr_search.dicom.read  # noqa: F401  (import cost outside the timed region)

    return os.getpid()


def load_and_preprocess(job: tuple[str, Optional[int], int]) -> tuple[int, int, int]:
    """What a DataLoader worker does per item: read_dicom + resize shorter side (bilinear)."""
    from PIL import Image

    from cxr_search.dicom.read import read_dicom

    path, reduce_to, shorter = job
    image = read_dicom(path, reduce_to=reduce_to)
    pixels = image.pixels
    rows, cols = pixels.shape
    scale = shorter / min(rows, cols)
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    out = np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR))
    return out.shape[0], out.shape[1], image.reduction


def measure(
    paths: list[Path], reduce_to: Optional[int], shorter: int, workers: int
) -> dict[str, float]:
    jobs = [(str(p), reduce_to, shorter) for p in paths]
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(workers) as pool:
        pool.map(_warm, range(workers * 2))
        start = time.perf_counter()
        results = list(pool.imap_unordered(load_and_preprocess, jobs, chunksize=1))
        elapsed = time.perf_counter() - start
    reductions = sorted({r for _, _, r in results})
    return {
        "images_per_s": len(paths) / elapsed,
        "ms_per_image_per_worker": elapsed * workers / len(paths) * 1000.0,
        "out_shape": list(results[0][:2]),
        "reduction": reductions[0] if len(reductions) == 1 else reductions,
    }


def single_process_latency(path: Path, reduce_to: Optional[int], repeats: int = 3) -> float:
    """Median ms of read_dicom alone in this process (decode + chain, no resize)."""
    from cxr_search.dicom.read import read_dicom

    read_dicom(path, reduce_to=reduce_to)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        read_dicom(path, reduce_to=reduce_to)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000.0


def parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("*", "x").split("x")
    if len(parts) == 1:
        return int(parts[0]), int(parts[0])
    return int(parts[0]), int(parts[1])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="images per syntax (default 16)")
    parser.add_argument("--size", default="2048x2048", help="ROWSxCOLS or N (default 2048x2048)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--shorter-side", type=int, default=512, help="resize target (512)")
    parser.add_argument("--dir", type=Path, default=None, help="keep the files here")
    args = parser.parse_args(argv)
    rows, cols = parse_size(args.size)

    tmp = None
    directory = args.dir
    if directory is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_dicom_")
        directory = Path(tmp.name)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        raws, j2ks, ratios = [], [], []
        for i in range(args.n):
            raw, j2k, ratio = write_pair(synthetic_radiograph(rows, cols, seed=i), directory, i)
            raws.append(raw)
            j2ks.append(j2k)
            ratios.append(ratio)
        gen_s = time.perf_counter() - start

        rows_out = []
        for name, paths in (("uncompressed", raws), ("jpeg2000-lossless", j2ks)):
            for reduce_to in (None, args.shorter_side):
                result = measure(paths, reduce_to, args.shorter_side, args.workers)
                result["read_dicom_ms_1proc"] = single_process_latency(paths[0], reduce_to)
                rows_out.append({"syntax": name, "reduce_to": reduce_to, **result})
    finally:
        if tmp is not None:
            tmp.cleanup()

    print(
        f"DICOM decode + preprocess: {args.n} images of {rows}x{cols} 12-bit per syntax, "
        f"{args.workers} worker processes, resize shorter side to {args.shorter_side} (bilinear); "
        f"J2K lossless ratio {np.mean(ratios):.2f}:1; generation took {gen_s:.1f} s"
    )
    header = (
        f"{'syntax':<18} {'reduce_to':>9} {'reduction':>9} {'images/s':>9} "
        f"{'ms/img/worker':>14} {'read_dicom ms (1 proc)':>23}"
    )
    print(header)
    print("-" * len(header))
    for r in rows_out:
        print(
            f"{r['syntax']:<18} {str(r['reduce_to']):>9} {str(r['reduction']):>9} "
            f"{r['images_per_s']:>9.1f} {r['ms_per_image_per_worker']:>14.1f} "
            f"{r['read_dicom_ms_1proc']:>23.1f}"
        )
    summary = {
        "bench": "dicom_decode_preprocess",
        "n": args.n,
        "rows": rows,
        "cols": cols,
        "workers": args.workers,
        "shorter_side": args.shorter_side,
        "j2k_ratio": round(float(np.mean(ratios)), 3),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "pydicom": pydicom.__version__,
        "results": [
            {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}
            for r in rows_out
        ],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
