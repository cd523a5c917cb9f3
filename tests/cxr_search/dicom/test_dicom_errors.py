"""The DICOM reader on bad files: truncated, not DICOM, no pixels, multi-frame, colour, no decoder, damage.

Each is refused with one of cxr-search's own errors naming the file; nothing foreign escapes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

import cxr_search.dicom.read as dicom_mod
from cxr_search.dicom.header import read_dicom_header
from cxr_search.dicom.read import read_dicom
from cxr_search.errors import (
    ColourImageError,
    DicomError,
    MultiFrameError,
    NoPixelDataError,
    NotDicomError,
    PixelDataError,
)
from tests.helpers.dicom_files import make_ds, radiograph, save, write

# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def test_truncated_pixel_data(tmp_path: Path) -> None:
    path = write(tmp_path, "full.dcm", radiograph(bits=12), bits_stored=12)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(path.read_bytes()[:-2000])
    with pytest.raises(PixelDataError) as info:
        read_dicom(cut)
    assert str(cut) in str(info.value) and "truncated" in str(info.value)
    with pytest.raises(PixelDataError):
        read_dicom(get_testdata_file("MR_truncated.dcm"))
    # A truncated JPEG 2000 codestream.
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.compress(JPEG2000Lossless)
    data = bytearray(ds.PixelData)
    ds.PixelData = bytes(data[: len(data) // 3]) + b"\x00" * (len(data) // 3 % 2)
    broken = tmp_path / "broken_j2k.dcm"
    ds.save_as(broken, enforce_file_format=True)
    with pytest.raises(PixelDataError):
        read_dicom(broken)


def test_not_dicom_files(tmp_path: Path) -> None:
    text = tmp_path / "report.txt"
    text.write_text("FINDINGS: No acute cardiopulmonary process.\n" * 10)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    noise = tmp_path / "noise.dcm"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    png = tmp_path / "image.dcm"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png, format="PNG")
    for path in (text, empty, noise, png, Path(get_testdata_file("no_meta.dcm"))):
        with pytest.raises(NotDicomError) as info:
            read_dicom(path)
        assert str(path) in str(info.value)
        with pytest.raises(NotDicomError):
            read_dicom_header(path)
    with pytest.raises(DicomError):
        read_dicom(tmp_path / "missing.dcm")


def test_structured_report_has_no_pixel_data(tmp_path: Path) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.ValueType = "CONTAINER"
    path = save(ds, tmp_path / "sr.dcm")
    with pytest.raises(NoPixelDataError) as info:
        read_dicom(path)
    assert "Basic Text SR" in str(info.value)
    header = read_dicom_header(path)
    assert header.has_pixel_data is False and header.number_of_frames is None
    with pytest.raises(NoPixelDataError):
        read_dicom(get_testdata_file("test-SR.dcm"))


def test_multi_frame_and_colour_are_rejected(tmp_path: Path) -> None:
    frames = np.stack([radiograph(bits=12)] * 2)
    ds = make_ds(frames[0], bits_stored=12)
    ds.NumberOfFrames = 2
    ds.PixelData = frames.tobytes()
    multi = save(ds, tmp_path / "multi.dcm")
    with pytest.raises(MultiFrameError):
        read_dicom(multi)
    assert read_dicom_header(multi).number_of_frames == 2

    rgb = np.zeros((16, 16, 3), np.uint8)
    ds = make_ds(rgb[..., 0], photometric="RGB")
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.PixelData = rgb.tobytes()
    with pytest.raises(ColourImageError):
        read_dicom(save(ds, tmp_path / "rgb.dcm"))
    with pytest.raises(ColourImageError):
        read_dicom(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    with pytest.raises(ColourImageError):
        read_dicom(get_testdata_file("examples_palette.dcm"))


def test_unsupported_or_missing_decoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no pixel decoder
    path = tmp_path / "mpeg.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(PixelDataError) as info:
        read_dicom(path)
    assert "MPEG2" in str(info.value)

    class Missing:
        is_available = False
        missing_dependencies = ["pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0"]

    monkeypatch.setattr(dicom_mod, "get_decoder", lambda uid: Missing())
    with pytest.raises(PixelDataError) as info:
        read_dicom(get_testdata_file("MR_small_jp2klossless.dcm"))
    message = str(info.value)
    assert "JPEG 2000" in message and "pylibjpeg-openjpeg" in message


def test_no_foreign_exception_escapes_for_damaged_files(tmp_path: Path) -> None:
    source = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    rng = np.random.default_rng(7)
    damaged = [source[:cut] for cut in rng.integers(0, len(source), 25)]
    for _ in range(40):
        data = bytearray(source)
        for pos in rng.integers(132, len(data), 4):
            data[pos] = int(rng.integers(0, 256))
        damaged.append(bytes(data))
    path = tmp_path / "damaged.dcm"
    for data in damaged:
        path.write_bytes(data)
        for reader in (read_dicom, read_dicom_header):
            try:
                reader(path)
            except DicomError:
                pass
