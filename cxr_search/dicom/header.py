"""DICOM header reading and normalisation for cxr-search.

This module opens DICOM files (with or without the 128-byte preamble), rejects files that are
not DICOM at all, and turns the handful of header attributes the engine needs into a
:class:`DicomHeader` with normalised values (sex, age in years, study date, view position, pixel
spacing). The value parsers live in :mod:`cxr_search.dicom.values`; like them, building a header
is total: a value that cannot be understood becomes ``None`` (or ``"UNKNOWN"`` for the view), never
an exception.

:func:`read_dicom_header` reads with ``stop_before_pixels`` so that scanning a PACS export of a
million files costs a fraction of a millisecond per file. The pixel reader lives in
:mod:`cxr_search.dicom.read`.

Privacy: :attr:`DicomHeader.patient_name` is kept only so that ingestion can see (and drop) it;
the search index must never store it. :meth:`DicomHeader.to_dict` leaves it out by default.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian

from cxr_search.dicom.values import (
    age_from_dates,
    as_text,
    normalise_view,
    parse_age,
    parse_da,
    parse_pixel_spacing,
    parse_sex,
)
from cxr_search.errors import DicomError, NotDicomError

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]


# Groups a DICOM data set without preamble can plausibly start with: command (0000), file meta
# (0002) or identifying (0008) elements. Anything else is treated as "not DICOM" rather than
# handed to pydicom's forced reader, which will happily parse any byte string into garbage.
_PLAUSIBLE_FIRST_GROUPS = (0x0000, 0x0002, 0x0008)
# A forced read must find at least one of these before we believe the file is DICOM.
_EVIDENCE_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "Rows",
)
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)


@dataclass(frozen=True)
class DicomHeader:
    """The header attributes cxr-search uses, normalised.

    Attributes:
        sop_instance_uid: SOPInstanceUID (the image's unique key).
        study_instance_uid: StudyInstanceUID.
        series_instance_uid: SeriesInstanceUID.
        sop_class_uid: SOPClassUID (falls back to the file meta MediaStorageSOPClassUID).
        accession_number: AccessionNumber, the usual key of RIS report exports.
        patient_id: PatientID (pseudonymise before storing).
        patient_name: PatientName, kept only so that ingestion can ignore it. The index must NOT
            store it; :meth:`to_dict` omits it unless asked.
        sex: ``"M"``, ``"F"``, ``"O"`` or ``None``.
        age_years: From PatientAge (``"045Y"``, ``"006M"``, ``"010W"``, ``"003D"``), else from
            PatientBirthDate and StudyDate; ``None`` when neither gives a plausible age.
        study_date: StudyDate, or ``None`` when absent or not a valid date.
        study_time: StudyTime as written (``"HHMMSS.FFFFFF"`` or a prefix of it), or ``None``.
        modality: Modality (``"CR"``, ``"DX"``, ...).
        body_part: BodyPartExamined, upper-case.
        view: One of :data:`VIEWS`, from ViewPosition and, failing that, ViewCodeSequence,
            SeriesDescription, ProtocolName and similar free text.
        rows: Rows of the stored image.
        columns: Columns of the stored image.
        pixel_spacing: (row spacing, column spacing) in mm from PixelSpacing or
            ImagerPixelSpacing, or ``None``.
        photometric_interpretation: PhotometricInterpretation, upper-case.
        transfer_syntax_uid: The file's transfer syntax, or ``None`` without file meta.
        manufacturer: Manufacturer.
        number_of_frames: NumberOfFrames (1 when absent on an image), ``None`` without pixels
            or when unreadable.
        has_pixel_data: Whether the object holds a Pixel Data element.
        bits_stored: BitsStored.
    """

    sop_instance_uid: Optional[str] = None
    study_instance_uid: Optional[str] = None
    series_instance_uid: Optional[str] = None
    sop_class_uid: Optional[str] = None
    accession_number: Optional[str] = None
    patient_id: Optional[str] = None
    patient_name: Optional[str] = None
    sex: Optional[str] = None
    age_years: Optional[float] = None
    study_date: Optional[_dt.date] = None
    study_time: Optional[str] = None
    modality: Optional[str] = None
    body_part: Optional[str] = None
    view: str = "UNKNOWN"
    rows: Optional[int] = None
    columns: Optional[int] = None
    pixel_spacing: Optional[tuple[float, float]] = None
    photometric_interpretation: Optional[str] = None
    transfer_syntax_uid: Optional[str] = None
    manufacturer: Optional[str] = None
    number_of_frames: Optional[int] = None
    has_pixel_data: bool = False
    bits_stored: Optional[int] = None

    def to_dict(self, *, include_patient_name: bool = False) -> dict[str, Any]:
        """Return the header as a JSON-serialisable dict.

        ``study_date`` becomes an ISO string (``"2020-01-31"``) and ``pixel_spacing`` a list.

        Args:
            include_patient_name: Also include ``patient_name``. Leave it ``False`` for anything
                that is stored or logged: the index must not hold patient names.

        Returns:
            A dict with one key per field (``patient_name`` only on request).
        """
        out = dataclasses.asdict(self)
        if not include_patient_name:
            out.pop("patient_name")
        if self.study_date is not None:
            out["study_date"] = self.study_date.isoformat()
        if self.pixel_spacing is not None:
            out["pixel_spacing"] = list(self.pixel_spacing)
        return out


# --------------------------------------------------------------------------------------------
# Opening files
# --------------------------------------------------------------------------------------------


@contextmanager
def capture_pydicom_warnings(path: PathLike) -> Iterator[None]:
    """Route warnings raised inside the block to this module's logger at DEBUG level.

    pydicom warns about every non-conformant value; on a million-file scan that drowns the
    console, yet the details matter when one file is being debugged.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        logger.debug("%s: %s", path, w.message)


def _sniff(path: PathLike) -> bool:
    """True if the file has the DICM prefix; raises NotDicomError if it cannot be DICOM."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise DicomError(path, f"cannot read the file: {exc}") from exc
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    if len(head) < 8:
        raise NotDicomError(path, f"not a DICOM file: only {len(head)} bytes long")
    for order in ("little", "big"):
        group = int.from_bytes(head[0:2], order)  # type: ignore[arg-type]
        element = int.from_bytes(head[2:4], order)  # type: ignore[arg-type]
        if group in _PLAUSIBLE_FIRST_GROUPS and element < 0x1000:
            return False
    raise NotDicomError(
        path, "not a DICOM file: no 'DICM' prefix at byte 128 and no DICOM element at byte 0"
    )


def read_dataset(path: PathLike, *, stop_before_pixels: bool = False) -> tuple[Dataset, bool]:
    """Read a DICOM file into a pydicom Dataset, with or without the 128-byte preamble.

    Files without the preamble (ACR-NEMA style exports, some PACS dumps) are read with
    ``force=True``, but only when their first bytes look like a DICOM element and the result
    holds an identifying attribute, so that text files and other binaries are still rejected.
    A missing file-meta TransferSyntaxUID is filled in from the encoding pydicom detected.

    Args:
        path: The file to read.
        stop_before_pixels: Stop before the Pixel Data element (header-only read).

    Returns:
        The dataset, and whether the object holds pixel data (known even when stopped before).

    Raises:
        NotDicomError: The file is not DICOM.
        DicomError: The file cannot be read, or its header is corrupt.
    """
    has_prefix = _sniff(path)
    try:
        with open(path, "rb") as fh, capture_pydicom_warnings(path):
            ds = pydicom.dcmread(fh, force=not has_prefix, stop_before_pixels=stop_before_pixels)
            if stop_before_pixels:
                has_pixels = _next_is_pixel_data(fh)
            else:
                has_pixels = any(tag in ds for tag in _PIXEL_TAGS)
    except InvalidDicomError as exc:
        raise NotDicomError(path, f"not a DICOM file: {exc}") from exc
    except OSError as exc:
        raise DicomError(path, f"cannot read the file: {exc}") from exc
    except Exception as exc:  # pydicom raises many types on corrupt headers
        raise DicomError(
            path, f"corrupt DICOM header ({type(exc).__name__}: {exc}); re-export the file"
        ) from exc
    if not has_prefix and not has_pixels and not any(kw in ds for kw in _EVIDENCE_KEYWORDS):
        raise NotDicomError(path, "not a DICOM file: no preamble and no identifying attributes")
    meta = getattr(ds, "file_meta", None)
    if meta is None or not meta.get("TransferSyntaxUID"):
        implicit, little = getattr(ds, "original_encoding", (None, None))
        if implicit is not None and little is not None:
            if meta is None:
                ds.file_meta = meta = pydicom.dataset.FileMetaDataset()
            meta.TransferSyntaxUID = (
                pydicom.uid.ImplicitVRLittleEndian if implicit
                else pydicom.uid.ExplicitVRLittleEndian if little
                else pydicom.uid.ExplicitVRBigEndian
            )  # fmt: skip
    elif stop_before_pixels and meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        # A deflated data set is parsed from an inflated copy, so the file position says
        # nothing about pixel data; such files are rare enough to afford a full read.
        has_pixels = read_dataset(path)[1]
    return ds, has_pixels


def _next_is_pixel_data(fh: Any) -> bool:
    """Whether the next element in `fh` (where stop_before_pixels left it) is pixel data."""
    tag = fh.read(4)
    if len(tag) < 4:
        return False
    little = (int.from_bytes(tag[0:2], "little") << 16) | int.from_bytes(tag[2:4], "little")
    return little in _PIXEL_TAGS or int.from_bytes(tag, "big") in _PIXEL_TAGS


def read_dicom_header(path: PathLike) -> DicomHeader:
    """Read and normalise the header of a DICOM file without reading its pixel data.

    Reads with ``stop_before_pixels`` (well under a millisecond for a typical radiograph), so
    it suits scanning large PACS exports. Works on images, SRs, presentation states, DICOMDIRs.

    Args:
        path: The DICOM file.

    Returns:
        The normalised header.

    Raises:
        NotDicomError: The file is not DICOM.
        DicomError: The file cannot be read or its header is corrupt.
    """
    ds, has_pixels = read_dataset(path, stop_before_pixels=True)
    return header_from_dataset(ds, has_pixel_data=has_pixels)


# --------------------------------------------------------------------------------------------
# Dataset -> DicomHeader
# --------------------------------------------------------------------------------------------


def _get(ds: Dataset, keyword: str) -> Any:
    """ds.get that never raises (pydicom converts lazily and may fail on a corrupt value)."""
    try:
        return ds.get(keyword)
    except Exception as exc:
        logger.debug("cannot convert %s: %s", keyword, exc)
        return None


def _raw_value(ds: Dataset, keyword: str) -> Any:
    """The element's value, read from the raw bytes when pydicom has not converted it yet.

    Used for values pydicom would validate (and warn about, or reject) on conversion.
    """
    tag = pydicom.datadict.tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return None
    try:
        elem = ds.get_item(tag)
    except Exception:
        return None
    if elem is None:
        return None
    return elem.value


def _text(ds: Dataset, keyword: str) -> Optional[str]:
    return as_text(_get(ds, keyword))


def _int(value: Any) -> Optional[int]:
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("latin-1", errors="replace")
    try:
        return int(str(value).strip().strip("\x00").strip()) if value is not None else None
    except ValueError:
        try:
            number = float(str(value).strip())
        except ValueError:
            return None
        return int(number) if number.is_integer() else None


def _view_code_meaning(ds: Dataset) -> Optional[str]:
    seq = _get(ds, "ViewCodeSequence")
    try:
        return _text(seq[0], "CodeMeaning") if seq else None
    except Exception:
        return None


def header_from_dataset(ds: Dataset, *, has_pixel_data: Optional[bool] = None) -> DicomHeader:
    """Build a :class:`DicomHeader` from a pydicom Dataset.

    Args:
        ds: The dataset (a full read or a ``stop_before_pixels`` read).
        has_pixel_data: Whether the object holds pixel data; when ``None`` it is taken from the
            dataset, which is only right for a full read.

    Returns:
        The normalised header. Never raises on odd values.
    """
    if has_pixel_data is None:
        has_pixel_data = any(int(tag) in ds for tag in _PIXEL_TAGS)
    meta = getattr(ds, "file_meta", None)
    tsyntax = as_text(meta.get("TransferSyntaxUID")) if meta is not None else None
    sop_class = _text(ds, "SOPClassUID")
    if sop_class is None and meta is not None:
        sop_class = as_text(meta.get("MediaStorageSOPClassUID"))
    frames = _int(_raw_value(ds, "NumberOfFrames"))
    if frames is None and has_pixel_data and "NumberOfFrames" not in ds:
        frames = 1
    spacing = parse_pixel_spacing(_raw_value(ds, "PixelSpacing"))
    if spacing is None:
        spacing = parse_pixel_spacing(_raw_value(ds, "ImagerPixelSpacing"))
    age = parse_age(_raw_value(ds, "PatientAge"))
    if age is None:
        age = age_from_dates(_raw_value(ds, "PatientBirthDate"), _raw_value(ds, "StudyDate"))
    body_part = _text(ds, "BodyPartExamined")
    photometric = _text(ds, "PhotometricInterpretation")
    view = normalise_view(
        _text(ds, "ViewPosition"),
        _view_code_meaning(ds),
        _text(ds, "SeriesDescription"),
        _text(ds, "ProtocolName"),
        _text(ds, "AcquisitionDeviceProcessingDescription"),
        _text(ds, "ImageLaterality"),
    )
    return DicomHeader(
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        sop_class_uid=sop_class,
        accession_number=_text(ds, "AccessionNumber"),
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        sex=parse_sex(_get(ds, "PatientSex")),
        age_years=age,
        study_date=parse_da(_raw_value(ds, "StudyDate")),
        study_time=as_text(_raw_value(ds, "StudyTime")),
        modality=_text(ds, "Modality"),
        body_part=body_part.upper() if body_part else None,
        view=view,
        rows=_int(_get(ds, "Rows")),
        columns=_int(_get(ds, "Columns")),
        pixel_spacing=spacing,
        photometric_interpretation=photometric.upper() if photometric else None,
        transfer_syntax_uid=tsyntax,
        manufacturer=_text(ds, "Manufacturer"),
        number_of_frames=frames,
        has_pixel_data=bool(has_pixel_data),
        bits_stored=_int(_get(ds, "BitsStored")),
    )
