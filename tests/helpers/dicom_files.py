"""Writing DICOM files for tests: a radiograph-like image and a single-frame DX dataset around it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CR_DIR = Path(get_testdata_file("MR_small.dcm")).parent / "dicomdirtests" / "77654033"


# --------------------------------------------------------------------------------------------------
# Helpers: writing DICOM files and the slow reference chain
# --------------------------------------------------------------------------------------------------


def radiograph(
    rows: int = 96, cols: int = 80, bits: int = 12, seed: int = 0, noise: float = 0.004
) -> np.ndarray:
    """A smooth radiograph-like image of `bits`-bit unsigned values, with a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    body = np.exp(-(((xx - cols / 2) / (0.42 * cols)) ** 4 + ((yy - rows / 2) / (0.5 * rows)) ** 4))
    lungs = sum(
        np.exp(-(((xx - cx) / (0.14 * cols)) ** 2 + ((yy - 0.45 * rows) / (0.28 * rows)) ** 2))
        for cx in (0.32 * cols, 0.68 * cols)
    )
    ribs = 0.05 * np.sin(yy / rows * 40.0) * body
    img = 0.15 + 0.7 * body - 0.35 * lungs + ribs
    img += rng.normal(0.0, noise, img.shape)
    top = (1 << bits) - 1
    return np.clip(img * top, 0, top).astype(np.uint16)


def make_ds(
    pixels: np.ndarray,
    *,
    bits_stored: Optional[int] = None,
    signed: bool = False,
    photometric: str = "MONOCHROME2",
    tsyntax: str = ExplicitVRLittleEndian,
    **attrs: Any,
) -> Dataset:
    """A single-frame greyscale DX dataset holding `pixels` (stored values as given)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = tsyntax
    ds.SOPClassUID = DX_SOP_CLASS
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    allocated = pixels.dtype.itemsize * 8
    ds.BitsAllocated = allocated
    ds.BitsStored = bits_stored or allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def write(tmp_path: Path, name: str, pixels: np.ndarray, **kwargs: Any) -> Path:
    return save(make_ds(pixels, **kwargs), tmp_path / name)
