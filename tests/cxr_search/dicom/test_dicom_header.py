"""DICOM header parsing: ages, dates, views, pixel spacing, sex, and headers of generated and real files."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian

from cxr_search.dicom.header import DicomHeader, read_dicom_header
from cxr_search.dicom.read import DicomImage, read_dicom
from cxr_search.dicom.values import age_from_dates, normalise_view, parse_age, parse_da, parse_pixel_spacing, parse_sex
from cxr_search.errors import PixelDataError
from tests.helpers.dicom_files import CR_DIR, DX_SOP_CLASS, make_ds, radiograph, save

# --------------------------------------------------------------------------------------------------
# Header parsing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "years"),
    [
        ("045Y", 45.0), ("006M", 0.5), ("010W", 70 / 365.25), ("003D", 3 / 365.25),
        ("000Y", 0.0), ("45", 45.0), (" 62Y ", 62.0), (b"071Y", 71.0), ("45 years", 45.0),
        ("018m", 1.5), ("", None), (None, None), ("abc", None), ("200Y", None), ("-5Y", None),
        ("Y", None), ("45Q", None),
    ],
)  # fmt: skip
def test_parse_age(value: Any, years: Optional[float]) -> None:
    got = parse_age(value)
    assert (got is None) if years is None else got == pytest.approx(years)


@pytest.mark.parametrize(
    ("birth", "study", "years"),
    [
        ("19600615", "20200614", 59.99), ("19600615", "20200615", 60.0),
        ("2020.01.01", "2021-01-01", 1.0), ("20200101", "20190101", None),
        ("", "20200101", None), ("00000000", "20200101", None), ("19601345", "20200101", None),
    ],
)  # fmt: skip
def test_age_from_birth_date(birth: str, study: str, years: Optional[float]) -> None:
    got = age_from_dates(birth, study)
    assert (got is None) if years is None else got == pytest.approx(years, abs=0.01)


@pytest.mark.parametrize(
    ("view", "fallbacks", "expected"),
    [
        ("PA", (), "PA"), ("PA ", (), "PA"), ("pa", (), "PA"), ("POSTERO_ANTERIOR", (), "PA"),
        ("POSTEROANTERIOR", (), "PA"), ("P-A", (), "PA"), ("AP", (), "AP"),
        ("ANTERO_POSTERIOR", (), "AP"), ("AP SUPINE", (), "AP"), ("A/P", (), "AP"),
        ("LATERAL", (), "LATERAL"), ("LAT", (), "LATERAL"), ("LL", (), "LL"), ("LLAT", (), "LL"),
        ("RL", (), "RL"), ("RLAT", (), "RL"), ("LEFT LATERAL", (), "LL"),
        ("right lateral", (), "RL"), ("", (), "UNKNOWN"), ("   ", (), "UNKNOWN"),
        (None, (), "UNKNOWN"), ("RLD", (), "UNKNOWN"), ("LLO", ("CHEST PA",), "UNKNOWN"),
        ("", ("postero-anterior",), "PA"), ("", ("left lateral",), "LL"),
        ("", (None, "CHEST PA AND LATERAL", "THORAX LAT"), "LATERAL"),
        ("", ("", "Chest AP portable"), "AP"), ("XYZ", ("", "", "LATERALE"), "LATERAL"),
        ("", ("CHEST", "Thorax"), "UNKNOWN"), ("", ("PA AP",), "UNKNOWN"),
    ],
)  # fmt: skip
def test_normalise_view(view: Any, fallbacks: tuple, expected: str) -> None:
    assert normalise_view(view, *fallbacks) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([0.139, 0.14], (0.139, 0.14)), ("0.139\\0.139", (0.139, 0.139)),
        ("0.139", (0.139, 0.139)), (0.2, (0.2, 0.2)), ("0.139,0.14", (0.139, 0.14)),
        ("0.139, 0.14", (0.139, 0.14)), ("0,139\\0,14", (0.139, 0.14)), ("0,139", (0.139, 0.139)),
        ("0,139 0,14", (0.139, 0.14)), (b"0.15\\0.15 ", (0.15, 0.15)), ("[0.1, 0.1]", (0.1, 0.1)),
        ("", None), (None, None), ("abc", None), ("0\\0", None), ("-0.1\\0.1", None),
        ("nan\\nan", None), ("1e9", None), ("0.1\\x", None),
    ],
)  # fmt: skip
def test_parse_pixel_spacing(value: Any, expected: Optional[tuple]) -> None:
    got = parse_pixel_spacing(value)
    assert got == (pytest.approx(expected) if expected else None)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("M", "M"), ("f", "F"), (" O ", "O"), ("FEMALE", "F"), ("", None), ("X", None), (None, None)],
)
def test_parse_sex(value: Any, expected: Optional[str]) -> None:
    assert parse_sex(value) == expected


def test_parse_da() -> None:
    assert parse_da("20200131") == dt.date(2020, 1, 31)
    assert parse_da("2020.01.31") == dt.date(2020, 1, 31)
    assert parse_da(dt.date(2020, 1, 31)) == dt.date(2020, 1, 31)
    assert parse_da("20200231") is None and parse_da("") is None and parse_da("2020") is None


def test_header_from_generated_file(tmp_path: Path) -> None:
    pixels = radiograph(bits=12)
    ds = make_ds(
        pixels, bits_stored=12, photometric="MONOCHROME1",
        AccessionNumber="ACC123", PatientID="PID9", PatientName="Doe^Jane", PatientSex="F",
        PatientBirthDate="19700101", StudyDate="20200101", StudyTime="101530.5",
        BodyPartExamined="CHEST", ViewPosition="", SeriesDescription="Thorax lat",
        Manufacturer="ACME",
    )  # fmt: skip
    ds.add_new("ImagerPixelSpacing", "DS", "0.148\\0.148")
    path = save(ds, tmp_path / "h.dcm")
    path.write_bytes(path.read_bytes().replace(b"CHEST", b"chest"))  # lower case, as seen
    header = read_dicom_header(path)
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert header.study_instance_uid == ds.StudyInstanceUID
    assert header.series_instance_uid == ds.SeriesInstanceUID
    assert header.sop_class_uid == DX_SOP_CLASS
    assert (header.accession_number, header.patient_id) == ("ACC123", "PID9")
    assert header.patient_name == "Doe^Jane"
    assert header.sex == "F" and header.age_years == pytest.approx(50.0, abs=0.01)
    assert header.study_date == dt.date(2020, 1, 1) and header.study_time == "101530.5"
    assert (header.modality, header.body_part, header.view) == ("DX", "CHEST", "LATERAL")
    assert (header.rows, header.columns, header.bits_stored) == (96, 80, 12)
    assert header.pixel_spacing == pytest.approx((0.148, 0.148))
    assert header.photometric_interpretation == "MONOCHROME1"
    assert header.transfer_syntax_uid == ExplicitVRLittleEndian
    assert header.manufacturer == "ACME"
    assert header.number_of_frames == 1 and header.has_pixel_data is True
    assert read_dicom(path).header == header

    as_dict = header.to_dict()
    assert "patient_name" not in as_dict  # the index must never store names
    assert as_dict["study_date"] == "2020-01-01" and as_dict["pixel_spacing"] == [0.148, 0.148]
    json.dumps(as_dict)
    assert header.to_dict(include_patient_name=True)["patient_name"] == "Doe^Jane"


def test_header_of_messy_values(tmp_path: Path) -> None:
    ds = make_ds(
        radiograph(16, 16, bits=12), bits_stored=12, PatientAge="", StudyDate="20200101",
        PatientSex="U", ViewPosition="POSTERO_ANTERIOR", PixelSpacing=[0.125, 0.125],
    )  # fmt: skip
    ds.add_new("NumberOfFrames", "IS", "1")
    path = save(ds, tmp_path / "m.dcm")
    # Invalid values as some exporters write them (pydicom refuses to write them itself).
    data = path.read_bytes()
    data = data.replace(b"0.125\\0.125", b"0,139\\0,139").replace(b"20200101", b"garbage ")
    path.write_bytes(data)
    header = read_dicom_header(path)
    assert header.age_years is None and header.study_date is None and header.sex is None
    assert header.view == "PA" and header.pixel_spacing == pytest.approx((0.139, 0.139))
    assert read_dicom(path).pixels.shape == (16, 16)
    # pydicom's file with NumberOfFrames "1A": header still reads, the image is a PixelDataError.
    bad = get_testdata_file("badVR.dcm")
    assert read_dicom_header(bad).number_of_frames is None
    with pytest.raises(PixelDataError):
        read_dicom(bad)


def test_header_has_pixel_data_for_real_files() -> None:
    assert read_dicom_header(get_testdata_file("MR_small.dcm")).has_pixel_data is True
    assert read_dicom_header(get_testdata_file("MR_small_bigendian.dcm")).has_pixel_data is True
    assert read_dicom_header(get_testdata_file("image_dfl.dcm")).has_pixel_data is True  # deflate
    assert read_dicom_header(get_testdata_file("reportsi.dcm")).has_pixel_data is False
    cr = read_dicom_header(CR_DIR / "CR1" / "6154")
    assert (cr.view, cr.age_years, cr.modality) == ("LL", 47.0, "CR")
    assert cr.pixel_spacing == pytest.approx((0.1, 0.1))


def test_public_types() -> None:
    image = read_dicom(get_testdata_file("MR_small.dcm"))
    assert isinstance(image, DicomImage) and isinstance(image.header, DicomHeader)
    assert image.pixels.ndim == 2 and image.pixels.dtype == np.uint8
