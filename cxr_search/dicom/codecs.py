"""Codec-specific decoding for the DICOM reader: reduced-resolution JPEG 2000 and 12-bit JPEG.

Two paths that pydicom's pixel data plugins do not offer, used by
:func:`cxr_search.dicom.read.read_dicom`:

* JPEG 2000 decoded at a power-of-two reduced resolution with Pillow (openjpeg), which is where
  the time goes when ingesting compressed archives (2500x3000 lossless: 514 ms full, 47 ms at
  1/4);
* 12-bit JPEG Extended (process 4) decoded with GDCM directly, because pydicom's GDCM plugin
  refuses it and only the GPL libjpeg plugin would take it.

Also holds the transfer-syntax tables the decoder plumbing in :mod:`cxr_search.dicom.read` uses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from cxr_search.dicom.header import DicomHeader

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

__all__ = ["INSTALL_HINTS", "J2K_SYNTAXES", "decode_jpeg12_gdcm", "try_j2k_reduced"]

J2K_SYNTAXES = {
    pydicom.uid.JPEG2000Lossless,
    pydicom.uid.JPEG2000,
    pydicom.uid.HTJ2KLossless,
    pydicom.uid.HTJ2KLosslessRPCL,
    pydicom.uid.HTJ2K,
}

# What to install when a transfer syntax has no available decoder (permissive packages first).
INSTALL_HINTS = {
    **dict.fromkeys(
        pydicom.uid.JPEGTransferSyntaxes, "python-gdcm (or pylibjpeg + pylibjpeg-libjpeg, GPL)"
    ),
    **dict.fromkeys(pydicom.uid.JPEGLSTransferSyntaxes, "pyjpegls or python-gdcm"),
    **dict.fromkeys(J2K_SYNTAXES, "pylibjpeg + pylibjpeg-openjpeg (or python-gdcm)"),
    pydicom.uid.RLELossless: "pylibjpeg + pylibjpeg-rle",
}


def decode_jpeg12_gdcm(ds: Dataset, header: DicomHeader) -> np.ndarray:
    """Decode one 12-bit JPEG Extended (process 4) frame with GDCM directly.

    Args:
        ds: The full dataset (encapsulated Pixel Data, PixelRepresentation).
        header: Its normalised header (rows, columns, bits stored, photometric).

    Returns:
        The stored values, 2-D, 16-bit, with unused high bits masked or sign-extended.

    Raises:
        ValueError: GDCM could not decode the frame (the caller falls back to pydicom).
    """
    import gdcm  # python-gdcm; imported lazily because it is slow to import

    frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(frame)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    elem = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    elem.SetValue(fragments.__ref__())
    rows, columns = int(header.rows or 0), int(header.columns or 0)
    bits_stored = int(header.bits_stored or 12)
    signed = bool(ds.get("PixelRepresentation"))
    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((columns, rows, 1))
    image.SetDataElement(elem)
    photometric = header.photometric_interpretation or "MONOCHROME2"
    image.SetPhotometricInterpretation(
        gdcm.PhotometricInterpretation(gdcm.PhotometricInterpretation.GetPIType(photometric))
    )
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGExtendedProcess2_4))
    image.SetPixelFormat(gdcm.PixelFormat(1, 16, bits_stored, bits_stored - 1, int(signed)))
    buffer = image.GetBuffer()
    if buffer is None:
        raise ValueError("GDCM could not decode the JPEG codestream")
    # GDCM returns char* as str: re-encode to the original bytes (as pydicom's plugin does).
    raw = buffer.encode("utf-8", "surrogateescape")
    if len(raw) < rows * columns * 2:
        raise ValueError(f"GDCM returned {len(raw)} bytes for a {rows}x{columns} 16-bit frame")
    arr = np.frombuffer(raw[: rows * columns * 2], dtype="<i2" if signed else "<u2")
    arr = arr.reshape(rows, columns).copy()
    shift = 16 - bits_stored
    if shift > 0:  # mask / sign-extend the unused high bits, as pydicom does
        arr <<= shift
        arr >>= shift
    return arr


@dataclass(frozen=True)
class _J2KInfo:
    rows: int
    columns: int
    components: int
    precision: int
    signed: bool
    levels: int


def _j2k_info(frame: bytes) -> Optional[_J2KInfo]:
    """Parse SIZ and COD of a raw J2K codestream's main header; None if not a plain codestream."""
    if frame[:2] != b"\xff\x4f":
        return None  # JP2-wrapped (non-conformant) or garbage: leave it to pydicom
    pos, siz, levels = 2, None, None
    while pos + 4 <= len(frame):
        marker = int.from_bytes(frame[pos : pos + 2], "big")
        if marker in (0xFF90, 0xFF93):  # SOT / SOD: end of the main header
            break
        length = int.from_bytes(frame[pos + 2 : pos + 4], "big")
        seg = frame[pos + 4 : pos + 2 + length]
        if marker == 0xFF51 and len(seg) >= 37:
            xsiz, ysiz, xosiz, yosiz = (
                int.from_bytes(seg[i : i + 4], "big") for i in (2, 6, 10, 14)
            )
            comps = int.from_bytes(seg[34:36], "big")
            siz = (ysiz - yosiz, xsiz - xosiz, comps, (seg[36] & 0x7F) + 1, bool(seg[36] & 0x80))
        elif marker == 0xFF52 and len(seg) >= 6:
            levels = seg[5]
        pos += 2 + length
    if siz is None or levels is None:
        return None
    return _J2KInfo(*siz, levels=levels)


def _reduction_level(rows: int, columns: int, reduce_to: int, max_level: int) -> int:
    """Largest k <= max_level with the shorter side / 2**k (rounded down) still >= reduce_to."""
    level, short = 0, min(rows, columns)
    while level < max_level and (short >> (level + 1)) >= reduce_to:
        level += 1
    return level


def try_j2k_reduced(
    ds: Dataset, header: DicomHeader, path: PathLike, reduce_to: int
) -> Optional[tuple[np.ndarray, int]]:
    """Decode a J2K frame at reduced resolution with Pillow, or None to use the full decode.

    Args:
        ds: The full dataset with encapsulated JPEG 2000 Pixel Data.
        header: Its normalised header.
        path: The file, for log messages.
        reduce_to: The shorter side the caller will downsample to.

    Returns:
        (stored values, reduction factor), or ``None`` when no reduction applies or the
        codestream is anything but a plain one-component codestream matching the header.
    """
    try:
        frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)
        info = _j2k_info(frame)
    except Exception as exc:
        logger.debug("%s: no reduced J2K decode (%s)", path, exc)
        return None
    if info is None or info.components != 1 or info.precision > 16:
        return None
    # Where the codestream disagrees with the header pydicom applies corrections; let it.
    if info.precision != header.bits_stored or info.signed != bool(ds.get("PixelRepresentation")):
        return None
    level = _reduction_level(info.rows, info.columns, reduce_to, info.levels)
    if level == 0:
        return None
    try:
        arr = _decode_j2k_reduced(frame, level, precision=info.precision, signed=info.signed)
    except Exception as exc:
        logger.debug("%s: reduced J2K decode failed, decoding in full (%s)", path, exc)
        return None
    logger.debug("%s: J2K decoded at 1/%d resolution %s", path, 1 << level, arr.shape)
    return arr, 1 << level


def _decode_j2k_reduced(frame: bytes, level: int, *, precision: int, signed: bool) -> np.ndarray:
    """Decode a one-component J2K codestream at 1/2**level resolution with Pillow (openjpeg).

    Pillow returns N-bit samples scaled up to its 8- or 16-bit container and signed samples
    level-shifted to unsigned; this undoes both, as pydicom's Pillow plugin does, so the result
    holds the stored values (level 0 equals pydicom's decode exactly).
    """
    from PIL import Image

    with Image.open(BytesIO(frame), formats=("JPEG2000",)) as im:
        if level:
            im.reduce = level  # type: ignore[assignment,misc]
        im.load()
        mode = im.mode
        arr = np.array(im)
    if mode == "I;16":
        container, signed_dtype = 16, np.int16
    elif mode == "L":
        container, signed_dtype = 8, np.int8
    else:
        raise ValueError(f"unexpected Pillow mode {mode!r} for a greyscale J2K codestream")
    arr = arr.astype(np.uint16 if container == 16 else np.uint8, copy=False)
    if signed:
        arr ^= np.array(1 << (container - 1), dtype=arr.dtype)  # undo the level shift
        arr = arr.view(signed_dtype)
    if container > precision:
        arr >>= container - precision  # arithmetic shift for signed data
    return arr
