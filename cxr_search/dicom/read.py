"""Photometric-aware DICOM reader: from a file to a display-ready 8-bit greyscale radiograph.

The chain follows what a viewer (and torchxrayvision's reader) does:

1. decode the pixel data (any transfer syntax the installed plugins handle: uncompressed,
   deflate, RLE, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000), with unused high bits
   masked or sign-extended as pydicom does;
2. modality LUT: Modality LUT Sequence or RescaleSlope/RescaleIntercept;
3. VOI LUT: VOI LUT Sequence, else the first WindowCenter/WindowWidth pair (with the
   VOILUTFunction); with neither, the full range is kept;
4. invert when PhotometricInterpretation is MONOCHROME1;
5. min-max scale to 0..255 (uint8), ignoring PixelPaddingValue pixels, which end up black.

Steps 2-5 are a function of the stored pixel value alone, so instead of running them over
millions of pixels in float64 (measured 147 ms for a 2500x3000 12-bit radiograph) they are
evaluated once per stored value in [min, max], in float64 with pydicom's own
``apply_modality_lut`` and ``apply_voi_lut``, and the resulting uint8 table is gathered over the
image (measured 10 ms, of which the gather is 7). The result is bit-identical to running the
float64 chain on the whole image; tests check this. Only the min/max (and, for a
non-monotonic LUT, a histogram) touch every pixel.

``reduce_to`` lets JPEG 2000 files be decoded at a power-of-two reduced resolution, which is where
the time goes when ingesting compressed archives (2500x3000 lossless: 514 ms full, 47 ms at 1/4);
that decoder and GDCM's direct 12-bit JPEG decode live in :mod:`cxr_search.dicom.codecs`.

The header side (:class:`~cxr_search.dicom.header.DicomHeader`,
:func:`~cxr_search.dicom.header.read_dicom_header`) lives in :mod:`cxr_search.dicom.header` and the
value normalisers in :mod:`cxr_search.dicom.values`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.uid import UID

from cxr_search.dicom.codecs import (
    INSTALL_HINTS,
    J2K_SYNTAXES,
    decode_jpeg12_gdcm,
    try_j2k_reduced,
)
from cxr_search.dicom.header import (
    DicomHeader,
    capture_pydicom_warnings,
    header_from_dataset,
    read_dataset,
)
from cxr_search.errors import (
    ColourImageError,
    CxrSearchError,
    MultiFrameError,
    NoPixelDataError,
    PixelDataError,
)

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

__all__ = ["DicomImage", "read_dicom"]

_COLOUR_PHOTOMETRICS = {
    "RGB", "ARGB", "CMYK", "HSV", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422",
    "YBR_PARTIAL_420", "YBR_PARTIAL_422", "YBR_ICT", "YBR_RCT",
}  # fmt: skip

# Lookup tables are built over [min, max] of the stored values; wider ranges (32-bit data) use
# the direct per-pixel computation instead.
_MAX_TABLE_SIZE = 1 << 20
# Gather in blocks of about this many pixels: keeps the index temporaries in cache (2x faster).
_CHUNK_PIXELS = 1 << 19


@dataclass(frozen=True, eq=False)  # eq on ndarray fields is ambiguous; compare .pixels yourself
class DicomImage:
    """A decoded, display-ready radiograph.

    Attributes:
        pixels: 2-D ``numpy.uint8`` array (rows, columns), 0 = black, after the full chain.
        header: The normalised header of the file.
        reduction: The power-of-two factor the decoder reduced the resolution by (1 = full
            resolution; only JPEG 2000 files read with ``reduce_to`` can have more).
    """

    pixels: np.ndarray
    header: DicomHeader
    reduction: int = 1


def read_dicom(path: PathLike, *, reduce_to: Optional[int] = None) -> DicomImage:
    """Read a single-frame greyscale DICOM image and apply the display chain.

    Decode -> modality LUT -> VOI LUT or window (first pair) or full range -> invert
    MONOCHROME1 -> min-max to uint8, excluding PixelPaddingValue pixels (which become black).
    Files without the 128-byte preamble are accepted; files that are not DICOM are not.

    Args:
        path: The DICOM file.
        reduce_to: Optional hint that the caller will downsample to a shorter side of this many
            pixels. JPEG 2000 files are then decoded at the largest power-of-two reduction whose
            shorter side stays >= ``reduce_to`` (and that the codestream's decomposition levels
            allow). The result is the codec's wavelet low-pass: close to, not equal to, a
            downsampled full decode, and its samples sit on the full image's pixels
            ``2**k * n`` rather than at block centres (a shift of under half a reduced pixel).
            Other codecs ignore the hint. ``None`` (default) decodes at full resolution with the
            exact chain.

    Returns:
        The image and its header.

    Raises:
        NotDicomError: The file is not DICOM.
        NoPixelDataError: The object holds no pixel data (SR, presentation state, ...).
        MultiFrameError: NumberOfFrames > 1.
        ColourImageError: SamplesPerPixel > 1 or a colour PhotometricInterpretation.
        PixelDataError: Pixel data truncated or undecodable, or no decoder installed for the
            transfer syntax (the message names the syntax and the package to install).
        DicomError: The file cannot be read or its header is corrupt.
        ValueError: ``reduce_to`` is not a positive integer.
    """
    if reduce_to is not None and (isinstance(reduce_to, bool) or int(reduce_to) < 1):
        raise ValueError(f"reduce_to must be a positive integer or None, got {reduce_to!r}")
    with capture_pydicom_warnings(path):
        ds, _ = read_dataset(path)
        try:
            header = header_from_dataset(ds)
            return _read_image(ds, header, path, reduce_to)
        except CxrSearchError:
            raise
        except Exception as exc:  # the promise: no foreign exception type escapes for a bad file
            raise PixelDataError(
                path, f"cannot read the image ({type(exc).__name__}: {exc})"
            ) from exc


def _read_image(
    ds: Dataset, header: DicomHeader, path: PathLike, reduce_to: Optional[int]
) -> DicomImage:
    _check_is_greyscale_image(ds, header, path)
    tsyntax = UID(header.transfer_syntax_uid or pydicom.uid.ExplicitVRLittleEndian)
    arr, reduction = _decode(ds, header, tsyntax, path, reduce_to)
    monochrome1 = header.photometric_interpretation == "MONOCHROME1"
    pixels = _to_display(arr, ds, path, monochrome1=monochrome1)
    return DicomImage(pixels=pixels, header=header, reduction=reduction)


def _check_is_greyscale_image(ds: Dataset, header: DicomHeader, path: PathLike) -> None:
    if not header.has_pixel_data:
        sop = UID(header.sop_class_uid).name if header.sop_class_uid else "unknown SOP class"
        raise NoPixelDataError(
            path,
            f"no pixel data: this is a '{sop}' object, not an image (reports are read by the "
            "report reader; other non-image objects can be skipped)",
        )
    if "PixelData" not in ds:
        raise PixelDataError(path, "only float pixel data found; radiographs use integer pixels")
    if header.number_of_frames is not None and header.number_of_frames > 1:
        raise MultiFrameError(
            path,
            f"multi-frame object ({header.number_of_frames} frames); chest radiographs are "
            "single-frame, so this is probably not a radiograph",
        )
    samples = ds.get("SamplesPerPixel")
    samples = 1 if samples in (None, "") else samples
    photometric = header.photometric_interpretation or ""
    if samples != 1 or photometric in _COLOUR_PHOTOMETRICS:
        raise ColourImageError(
            path,
            f"colour image (PhotometricInterpretation {photometric or 'missing'}, "
            f"SamplesPerPixel {samples}); chest radiographs are greyscale",
        )
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        logger.warning(
            "%s: PhotometricInterpretation %r is not MONOCHROME1/2; reading it as MONOCHROME2",
            path,
            photometric or None,
        )
    if not header.rows or not header.columns:
        raise PixelDataError(path, "Rows or Columns missing or zero; the image cannot be decoded")


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _decode(
    ds: Dataset, header: DicomHeader, tsyntax: UID, path: PathLike, reduce_to: Optional[int]
) -> tuple[np.ndarray, int]:
    """Decode the single frame; returns (stored values array, reduction factor)."""
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise PixelDataError(
            path,
            f"transfer syntax '{tsyntax.name}' ({tsyntax}) is not supported by any pixel data "
            "decoder; convert the file to a standard syntax (e.g. with dcmtk or gdcmconv)",
        ) from exc
    if not decoder.is_available:
        hint = INSTALL_HINTS.get(tsyntax, "a pydicom pixel data plugin for it")
        raise PixelDataError(
            path,
            f"no installed decoder for transfer syntax '{tsyntax.name}' ({tsyntax}); install "
            f"{hint} (missing: {'; '.join(decoder.missing_dependencies)})",
        )
    if reduce_to is not None and tsyntax in J2K_SYNTAXES:
        reduced = try_j2k_reduced(ds, header, path, reduce_to)
        if reduced is not None:
            return reduced
    if tsyntax == pydicom.uid.JPEGExtended12Bit and (header.bits_stored or 8) > 8:
        # pydicom's GDCM plugin refuses 12-bit JPEG Extended and only the GPL libjpeg plugin
        # takes it, yet GDCM itself decodes it correctly (tests round-trip a GDCM-encoded file).
        try:
            return decode_jpeg12_gdcm(ds, header), 1
        except Exception as exc:
            logger.debug("%s: GDCM 12-bit JPEG decode failed, trying pydicom (%s)", path, exc)
    try:
        arr, _ = decoder.as_array(ds, index=0)
    except Exception as exc:
        raise PixelDataError(
            path,
            f"cannot decode the '{tsyntax.name}' pixel data ({type(exc).__name__}: {exc}); the "
            "file is probably truncated or corrupt",
        ) from exc
    if arr.ndim != 2:
        raise PixelDataError(path, f"decoded pixel data has shape {arr.shape}, expected 2-D")
    return arr, 1


# --------------------------------------------------------------------------------------------
# Display chain
# --------------------------------------------------------------------------------------------


def _padding_range(ds: Dataset, arr: np.ndarray) -> Optional[tuple[int, int]]:
    """(low, high) stored values that are padding, in the array's signedness, or None."""
    values = []
    for keyword in ("PixelPaddingValue", "PixelPaddingRangeLimit"):
        value: Any = ds.get(keyword)
        if isinstance(value, (bytes, bytearray)) and len(value) in (1, 2, 4):
            value = int.from_bytes(value, "little", signed=bool(ds.get("PixelRepresentation")))
        elif isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            value = value[0] if len(value) else None
        if value is None:
            values.append(None)
            continue
        try:
            value = int(value)
        except (TypeError, ValueError):
            logger.debug("ignoring unreadable %s %r", keyword, value)
            value = None
        if value is not None and arr.dtype.kind in "iu":
            # US/SS confusion: reinterpret the bits in the array's signedness.
            bits = arr.dtype.itemsize * 8
            if arr.dtype.kind == "i" and value >= 1 << (bits - 1):
                value -= 1 << bits
            elif arr.dtype.kind == "u" and value < 0:
                value += 1 << bits
        values.append(value)
    low, limit = values
    if low is None:
        return None
    if limit is None:
        return (low, low)
    return (min(low, limit), max(low, limit))


def _window_is_numeric(ds: Dataset) -> bool:
    for keyword in ("WindowCenter", "WindowWidth"):
        value = ds.get(keyword)
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            value = value[0] if len(value) else None
        try:
            if value is None or value == "" or not math.isfinite(float(value)):
                return False
        except (TypeError, ValueError):
            return False
    return True


def _chain_values(values: np.ndarray, ds: Dataset, path: PathLike) -> np.ndarray:
    """Modality LUT then VOI LUT/window for `values` (stored values), as float64.

    Uses pydicom's functions so the semantics (LUT descriptors, first-map offsets, LINEAR /
    LINEAR_EXACT / SIGMOID windows) are pydicom's. A LUT or window that cannot be applied is
    skipped with a warning rather than failing the image: it only changes contrast.
    """
    out: np.ndarray = values
    if ds.get("ModalityLUTSequence") or ("RescaleSlope" in ds and "RescaleIntercept" in ds):
        try:
            modality = np.asarray(apply_modality_lut(values, ds))
            if not np.all(np.isfinite(modality)):
                raise ValueError("non-finite values")
            out = modality
        except Exception as exc:
            logger.warning("%s: ignoring unusable modality LUT/rescale (%s)", path, exc)
    if out.dtype.kind == "f" and np.array_equal(out, np.rint(out)):
        # Integral rescale output: the VOI LUT Sequence expects integers, and pydicom warns on
        # floats; the values are the same.
        out = out.astype(np.int64)
    has_voi_lut = bool(ds.get("VOILUTSequence"))
    if has_voi_lut or _window_is_numeric(ds):
        try:
            voi = np.asarray(apply_voi_lut(out, ds, index=0))
            if not np.all(np.isfinite(voi)):
                raise ValueError("non-finite values")
            out = voi
        except Exception as exc:
            logger.warning("%s: ignoring unusable VOI LUT/window, using full range (%s)", path, exc)
    return out.astype(np.float64, copy=False)


def _scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Min-max scaling to 0..255: rint(clip((v - low) * (255 / (high - low)), 0, 255))."""
    if not high > low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values - low) * (255.0 / (high - low))
    np.clip(scaled, 0.0, 255.0, out=scaled)
    return np.rint(scaled).astype(np.uint8)


def _gather(table: np.ndarray, index: np.ndarray, offset: int = 0) -> np.ndarray:
    """table[index - offset] as uint8, in row blocks (much faster than one big fancy index)."""
    out = np.empty(index.shape, dtype=np.uint8)
    rows = max(1, _CHUNK_PIXELS // max(1, index.shape[1]))
    for start in range(0, index.shape[0], rows):
        block = index[start : start + rows]
        if offset:
            block = block.astype(np.int64) - offset
        np.take(table, block, out=out[start : start + rows])
    return out


def _to_display(arr: np.ndarray, ds: Dataset, path: PathLike, *, monochrome1: bool) -> np.ndarray:
    """Stored values -> display uint8 through the per-value table (exact float64 chain)."""
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "iu":
        return _to_display_direct(arr, ds, path, monochrome1=monochrome1)
    amin, amax = int(arr.min()), int(arr.max())
    if amax - amin + 1 > _MAX_TABLE_SIZE:
        return _to_display_direct(arr, ds, path, monochrome1=monochrome1)
    pad = _padding_range(ds, arr)
    if pad is not None and (pad[1] < amin or pad[0] > amax):
        pad = None  # declared but absent from this image
    vmin, vmax = amin, amax
    if pad is not None:
        is_pad = (arr == pad[0]) if pad[0] == pad[1] else ((arr >= pad[0]) & (arr <= pad[1]))
        keep = np.logical_not(is_pad, out=is_pad)
        if not keep.any():
            return np.zeros(arr.shape, dtype=np.uint8)
        vmin = int(arr.min(where=keep, initial=amax))
        vmax = int(arr.max(where=keep, initial=amin))
    domain = np.arange(amin, amax + 1, dtype=np.int64)
    values = _chain_values(domain.astype(arr.dtype), ds, path)
    pad_entries = (
        (domain >= pad[0]) & (domain <= pad[1]) if pad is not None else np.zeros(0, dtype=bool)
    )
    segment = values[vmin - amin : vmax - amin + 1]
    steps = np.diff(segment)
    if np.all(steps >= 0) or np.all(steps <= 0):
        # Monotonic over [vmin, vmax]: the extremes over the present values are at its ends.
        low, high = min(segment[0], segment[-1]), max(segment[0], segment[-1])
    else:
        # A non-monotonic LUT: find which values actually occur.
        if arr.dtype.itemsize <= 2:
            unsigned = np.uint16 if arr.dtype.itemsize == 2 else np.uint8
            size = 1 << (8 * arr.dtype.itemsize)
            counts = np.bincount(arr.view(unsigned).ravel(), minlength=size)
            present = counts[domain.astype(arr.dtype).view(unsigned)] > 0
        else:
            present = np.bincount((arr.astype(np.int64) - amin).ravel(), minlength=len(domain)) > 0
        if pad is not None:
            present &= ~pad_entries
        low, high = float(values[present].min()), float(values[present].max())
    table = _scale_to_uint8(values, low, high)
    if monochrome1:
        table = 255 - table
    if pad is not None:
        table[pad_entries] = 0
    if arr.dtype.itemsize <= 2:
        # Index by the stored bits directly: a full-width table avoids a subtraction pass.
        unsigned = np.uint16 if arr.dtype.itemsize == 2 else np.uint8
        full = np.zeros(1 << (8 * arr.dtype.itemsize), dtype=np.uint8)
        full[domain.astype(arr.dtype).view(unsigned)] = table
        return _gather(full, arr.view(unsigned))
    return _gather(table, arr, offset=amin)


def _to_display_direct(
    arr: np.ndarray, ds: Dataset, path: PathLike, *, monochrome1: bool
) -> np.ndarray:
    """The chain computed per pixel; only for float data or integer ranges wider than 2**20."""
    logger.debug("%s: %s pixels, using the per-pixel display chain", path, arr.dtype)
    values = _chain_values(arr, ds, path)
    pad = _padding_range(ds, arr) if arr.dtype.kind in "iu" else None
    is_pad = (arr >= pad[0]) & (arr <= pad[1]) if pad is not None else None
    kept = values[~is_pad] if is_pad is not None else values
    if kept.size == 0:
        return np.zeros(arr.shape, dtype=np.uint8)
    out = _scale_to_uint8(values, float(kept.min()), float(kept.max()))
    if monochrome1:
        out = 255 - out
    if is_pad is not None:
        out[is_pad] = 0
    return out
