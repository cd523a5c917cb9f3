"""The photometric-aware DICOM reader: decode, modality/VOI LUTs, inversion, padding (headers and
errors: ``test_dicom_header.py``, ``test_dicom_errors.py``).

Real files only: pydicom's own test files and DICOM files written here with pydicom (and GDCM for
the JPEG syntaxes pydicom cannot encode). Every fast path is compared with a slow, obvious float64
computation of the same chain.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ImplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

import cxr_search.dicom.codecs as codecs_mod
from cxr_search.dicom.header import read_dicom_header
from cxr_search.dicom.read import read_dicom
from cxr_search.errors import NoPixelDataError
from tests.helpers.dicom_files import CR_DIR, make_ds, radiograph, save, write

# --------------------------------------------------------------------------------------------------
# The slow reference chain
# --------------------------------------------------------------------------------------------------


def minmax_u8(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The min-max definition the reader implements: rint(clip((v-lo)*255/(hi-lo), 0, 255))."""
    low, high = values[keep].min(), values[keep].max()
    return np.rint(np.clip((values - low) * (255.0 / (high - low)), 0, 255)).astype(np.uint8)


def finish(values: np.ndarray, keep: np.ndarray, monochrome1: bool) -> np.ndarray:
    out = minmax_u8(values, keep)
    if monochrome1:
        out = 255 - out
    out[~keep] = 0
    return out


def slow_chain(path: Path | str) -> np.ndarray:
    """The obvious chain on every pixel in float64, with pydicom's decode and LUT functions."""
    ds = pydicom.dcmread(path, force=True)
    arr = ds.pixel_array
    values = apply_voi_lut(apply_modality_lut(arr, ds).astype(np.float64), ds).astype(np.float64)
    keep = np.ones(arr.shape, dtype=bool)
    if "PixelPaddingValue" in ds:
        pad = int(ds.PixelPaddingValue)
        limit = int(ds.get("PixelPaddingRangeLimit", pad))
        keep = ~((arr >= min(pad, limit)) & (arr <= max(pad, limit)))
    return finish(values, keep, ds.PhotometricInterpretation == "MONOCHROME1")


# --------------------------------------------------------------------------------------------------
# Real files: compressed twins, the chain against the slow reference
# --------------------------------------------------------------------------------------------------

MR_TWINS = [
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "MR_small_implicit.dcm",
    "MR_small_padded.dcm",
]


@pytest.mark.parametrize("name", MR_TWINS)
def test_pydicom_compressed_twins_equal_uncompressed(name: str) -> None:
    reference = read_dicom(get_testdata_file("MR_small.dcm")).pixels
    image = read_dicom(get_testdata_file(name))
    assert image.pixels.dtype == np.uint8 and image.pixels.shape == (64, 64)
    np.testing.assert_array_equal(image.pixels, reference)


@pytest.mark.parametrize("tsyntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
@pytest.mark.parametrize("source", ["CT_small.dcm", "MR_small.dcm"])
def test_compressed_with_pydicom_equal_uncompressed(
    tmp_path: Path, source: str, tsyntax: str
) -> None:
    ds = pydicom.dcmread(get_testdata_file(source))
    ds.compress(tsyntax)
    path = tmp_path / "compressed.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert read_dicom_header(path).transfer_syntax_uid == tsyntax
    np.testing.assert_array_equal(
        read_dicom(path).pixels, read_dicom(get_testdata_file(source)).pixels
    )


def _gdcm_transcode(src: Path, dst: Path, ts_name: str) -> None:
    gdcm = pytest.importorskip("gdcm")  # python-gdcm is a core dependency
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, ts_name)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()


def test_jpeg_lossless_sv1_equals_uncompressed(tmp_path: Path) -> None:
    # The most common PACS syntax; pydicom cannot encode it, GDCM can.
    pixels = radiograph(120, 100, bits=12)
    src = write(tmp_path, "u.dcm", pixels, bits_stored=12, PhotometricInterpretation="MONOCHROME1")
    dst = tmp_path / "sv1.dcm"
    _gdcm_transcode(src, dst, "JPEGLosslessProcess14_1")
    assert read_dicom_header(dst).transfer_syntax_uid == pydicom.uid.JPEGLosslessSV1
    np.testing.assert_array_equal(read_dicom(dst).pixels, read_dicom(src).pixels)


def test_jpeg_extended_12_bit_decodes_close_to_original(tmp_path: Path) -> None:
    # 12-bit lossy JPEG: pydicom's GDCM plugin refuses it, the reader calls GDCM directly.
    pixels = radiograph(128, 112, bits=12)
    src = write(tmp_path, "u.dcm", pixels, bits_stored=12)
    dst = tmp_path / "ext12.dcm"
    _gdcm_transcode(src, dst, "JPEGExtendedProcess2_4")
    assert read_dicom_header(dst).transfer_syntax_uid == pydicom.uid.JPEGExtended12Bit
    lossy = read_dicom(dst).pixels.astype(np.int32)
    exact = read_dicom(src).pixels.astype(np.int32)
    assert np.abs(lossy - exact).mean() < 1.0
    assert np.abs(lossy - exact).max() <= 8


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "JPEG-lossy.dcm"])
def test_pydicom_12_bit_jpeg_extended_files_decode(name: str) -> None:
    # pydicom alone cannot decode these without the GPL libjpeg plugin.
    image = read_dicom(get_testdata_file(name))
    assert image.pixels.shape == (1024, 256) and image.pixels.dtype == np.uint8
    assert image.pixels.min() == 0 and image.pixels.max() == 255
    assert image.pixels.std() > 20  # an image, not a constant


@pytest.mark.parametrize(
    "path",
    [
        get_testdata_file("MR_small.dcm"),  # window centre/width
        get_testdata_file("CT_small.dcm"),  # rescale + pixel padding value
        get_testdata_file("693_J2KI.dcm"),  # JPEG 2000, signed 14-bit, padding, window
        get_testdata_file("J2K_pixelrep_mismatch.dcm"),  # J2K sign mismatch, multi-valued window
        get_testdata_file("examples_overlay.dcm"),  # two windows: the first is used
        get_testdata_file("image_dfl.dcm"),  # deflate
        get_testdata_file("JPEG2000.dcm"),
        get_testdata_file("liver_1frame.dcm"),  # 1 bit allocated
        get_testdata_file("rtdose_1frame.dcm"),  # 32-bit
        str(CR_DIR / "CR1" / "6154"),  # real CR: MONOCHROME1, rescale slope 0.684, window
        str(CR_DIR / "CR2" / "6247"),
    ],
    ids=lambda p: Path(p).name,
)
def test_chain_equals_slow_float64_reference(path: str) -> None:
    image = read_dicom(path)
    np.testing.assert_array_equal(image.pixels, slow_chain(path))
    assert image.reduction == 1


def test_cr_monochrome1_is_inverted() -> None:
    path = CR_DIR / "CR1" / "6154"
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    out = read_dicom(path).pixels
    raw = ds.pixel_array
    # The highest stored value (densest in MONOCHROME1) must be the darkest output.
    assert out[raw == raw.max()].max() == out.min() == 0


# --------------------------------------------------------------------------------------------------
# Generated files: photometric interpretation, bit depths, signedness, padding, windows, LUTs
# --------------------------------------------------------------------------------------------------


def test_monochrome1_is_exact_inversion_of_monochrome2(tmp_path: Path) -> None:
    pixels = radiograph(bits=12)
    mono2 = read_dicom(write(tmp_path, "m2.dcm", pixels, bits_stored=12)).pixels
    mono1 = read_dicom(
        write(tmp_path, "m1.dcm", pixels, bits_stored=12, photometric="MONOCHROME1")
    ).pixels
    np.testing.assert_array_equal(mono1, 255 - mono2)
    assert mono2.min() == 0 and mono2.max() == 255
    # Full range without a window: the chain is min-max of the stored values.
    expected = minmax_u8(pixels.astype(np.float64), np.ones(pixels.shape, dtype=bool))
    np.testing.assert_array_equal(mono2, expected)


def test_12_bit_in_16_allocated_ignores_garbage_high_bits(tmp_path: Path) -> None:
    pixels = radiograph(bits=12)
    rng = np.random.default_rng(1)
    dirty = pixels | (rng.integers(0, 16, pixels.shape, dtype=np.uint16) << 12)  # overlay bits
    clean = read_dicom(write(tmp_path, "clean.dcm", pixels, bits_stored=12)).pixels
    masked = read_dicom(write(tmp_path, "dirty.dcm", dirty, bits_stored=12)).pixels
    np.testing.assert_array_equal(masked, clean)
    np.testing.assert_array_equal(masked, slow_chain(tmp_path / "dirty.dcm"))


def test_signed_pixels_equal_their_unsigned_shift(tmp_path: Path) -> None:
    pixels = radiograph(bits=12).astype(np.int16) - 2048  # negative and positive values
    unsigned = read_dicom(
        write(tmp_path, "u.dcm", (pixels + 2048).astype(np.uint16), bits_stored=12)
    ).pixels
    signed = read_dicom(write(tmp_path, "s.dcm", pixels, bits_stored=16, signed=True)).pixels
    np.testing.assert_array_equal(signed, unsigned)
    # 12-bit two's complement in 16 allocated with garbage above bit 11: sign-extended.
    stored = (pixels.view(np.uint16) & 0x0FFF) | 0xA000
    packed = read_dicom(
        write(tmp_path, "s12.dcm", stored.view(np.int16), bits_stored=12, signed=True)
    ).pixels
    np.testing.assert_array_equal(packed, unsigned)


def test_pixel_padding_is_black_and_excluded_from_minmax(tmp_path: Path) -> None:
    pixels = radiograph(bits=12)
    pixels[:10, :] = 4095  # collimator padding, brighter than any anatomy
    keep = pixels != 4095
    for photometric in ("MONOCHROME2", "MONOCHROME1"):
        path = write(
            tmp_path, f"pad_{photometric}.dcm", pixels, bits_stored=12,
            photometric=photometric, PixelPaddingValue=4095,
        )  # fmt: skip
        out = read_dicom(path).pixels
        assert (out[~keep] == 0).all()
        assert out[keep].min() == 0 and out[keep].max() == 255  # stretched without the padding
        expected = finish(pixels.astype(np.float64), keep, photometric == "MONOCHROME1")
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(out, slow_chain(path))


def test_pixel_padding_range_inside_the_value_range(tmp_path: Path) -> None:
    # Padding values between the image's extremes (exercises the masked min/max path).
    pixels = radiograph(bits=12).astype(np.int16) - 2000
    pixels[:, :6] = -1000
    pixels[:, 6:9] = -998
    lo, hi = int(pixels[:, 9:].min()), int(pixels[:, 9:].max())
    assert lo < -1000 < hi
    path = write(
        tmp_path, "range.dcm", pixels, signed=True,
        PixelPaddingValue=-998, PixelPaddingRangeLimit=-1000,
    )  # fmt: skip
    out = read_dicom(path).pixels
    keep = ~((pixels >= -1000) & (pixels <= -998))
    np.testing.assert_array_equal(out, finish(pixels.astype(np.float64), keep, False))
    assert (out[:, :9] == 0).all()


def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR window written out (output 0..1)."""
    c, w = center - 0.5, width - 1.0
    out = (values - c) / w + 0.5
    out[values <= c - w / 2] = 0.0
    out[values > c + w / 2] = 1.0
    return out


def test_window_center_width_with_rescale(tmp_path: Path) -> None:
    pixels = radiograph(bits=12)
    path = write(
        tmp_path, "win.dcm", pixels, bits_stored=12,
        RescaleSlope=2.0, RescaleIntercept=-1024.0, WindowCenter=[3000.0, 100.0],
        WindowWidth=[2500.0, 50.0],
    )  # fmt: skip
    out = read_dicom(path).pixels
    hu = pixels.astype(np.float64) * 2.0 - 1024.0
    expected_unit = _linear_window(hu, 3000.0, 2500.0)  # the first window pair
    assert 0 < (expected_unit == 0).mean() < 1 and 0 < (expected_unit == 1).mean() < 1
    np.testing.assert_allclose(out, expected_unit * 255.0, atol=0.51)
    np.testing.assert_array_equal(out, slow_chain(path))


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_voi_lut_functions(tmp_path: Path, function: str) -> None:
    pixels = radiograph(bits=12)
    path = write(
        tmp_path, "f.dcm", pixels, bits_stored=12,
        WindowCenter=1800, WindowWidth=1200, VOILUTFunction=function,
    )  # fmt: skip
    np.testing.assert_array_equal(read_dicom(path).pixels, slow_chain(path))


def _lut_item(n: int, first: int, data: np.ndarray) -> Dataset:
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [n, first, 16])
    item.add_new("LUTData", "OW", data.astype("<u2").tobytes())
    return item


@pytest.mark.parametrize("monotonic", [True, False], ids=["monotonic", "non-monotonic"])
def test_voi_lut_sequence_against_numpy(tmp_path: Path, monotonic: bool) -> None:
    pixels = radiograph(bits=12)
    first, n = 200, 3000
    x = np.arange(n, dtype=np.float64)
    curve = np.sqrt(x / n) * 60000 if monotonic else 30000 + 25000 * np.sin(x / 400.0)
    ds = make_ds(pixels, bits_stored=12, WindowCenter=100, WindowWidth=10)  # LUT wins
    ds.VOILUTSequence = DicomSequence([_lut_item(n, first, curve.astype(np.uint16))])
    path = save(ds, tmp_path / "voi.dcm")
    lut = curve.astype(np.uint16).astype(np.float64)
    values = lut[np.clip(pixels.astype(np.int64) - first, 0, n - 1)]
    expected = minmax_u8(values, np.ones(pixels.shape, dtype=bool))
    np.testing.assert_array_equal(read_dicom(path).pixels, expected)


def test_modality_lut_sequence_against_numpy(tmp_path: Path) -> None:
    pixels = radiograph(bits=12)
    first, n = 100, 4096
    curve = (np.log1p(np.arange(n, dtype=np.float64)) * 7000).astype(np.uint16)
    ds = make_ds(pixels, bits_stored=12, photometric="MONOCHROME1")
    ds.ModalityLUTSequence = DicomSequence([_lut_item(n, first, curve)])
    path = save(ds, tmp_path / "mlut.dcm")
    values = curve[np.clip(pixels.astype(np.int64) - first, 0, n - 1)].astype(np.float64)
    expected = 255 - minmax_u8(values, np.ones(pixels.shape, dtype=bool))
    np.testing.assert_array_equal(read_dicom(path).pixels, expected)


def test_unusable_window_falls_back_to_full_range(tmp_path: Path) -> None:
    pixels = radiograph(bits=12)
    plain = read_dicom(write(tmp_path, "p.dcm", pixels, bits_stored=12)).pixels
    bad = write(tmp_path, "b.dcm", pixels, bits_stored=12, WindowCenter=100, WindowWidth=0)
    np.testing.assert_array_equal(read_dicom(bad).pixels, plain)


def test_eight_bit_and_constant_images(tmp_path: Path) -> None:
    pixels = (radiograph(bits=8)).astype(np.uint8)
    out = read_dicom(write(tmp_path, "u8.dcm", pixels)).pixels
    np.testing.assert_array_equal(out, minmax_u8(pixels.astype(float), np.ones(pixels.shape, bool)))
    flat = read_dicom(write(tmp_path, "flat.dcm", np.full((8, 9), 7, np.uint16))).pixels
    assert flat.shape == (8, 9) and (flat == 0).all()


# --------------------------------------------------------------------------------------------------
# Files without preamble
# --------------------------------------------------------------------------------------------------


def test_files_without_preamble(tmp_path: Path) -> None:
    reference = read_dicom(get_testdata_file("MR_small.dcm")).pixels
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.preamble = None
    with_meta = tmp_path / "no_preamble.dcm"
    ds.save_as(with_meta, enforce_file_format=False)
    assert with_meta.read_bytes()[:2] == b"\x02\x00"  # starts with the file meta group
    np.testing.assert_array_equal(read_dicom(with_meta).pixels, reference)

    bare = tmp_path / "no_meta.dcm"
    ds.file_meta = FileMetaDataset()
    ds.save_as(bare, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert bare.read_bytes()[:2] == b"\x08\x00"  # a bare data set
    image = read_dicom(bare)
    np.testing.assert_array_equal(image.pixels, reference)
    assert image.header.transfer_syntax_uid == ImplicitVRLittleEndian

    # pydicom's own preamble-less file (an RT structure set: a header but no image).
    rtstruct = get_testdata_file("rtstruct.dcm")
    assert read_dicom_header(rtstruct).sop_class_uid == "1.2.840.10008.5.1.4.1.1.481.3"
    with pytest.raises(NoPixelDataError):
        read_dicom(rtstruct)


# --------------------------------------------------------------------------------------------------
# reduce_to: JPEG 2000 decoded at reduced resolution
# --------------------------------------------------------------------------------------------------


def _j2k_file(tmp_path: Path, pixels: np.ndarray, name: str, **kwargs: Any) -> Path:
    ds = make_ds(pixels, **kwargs)
    ds.compress(JPEG2000Lossless)
    return save(ds, tmp_path / name)


def test_reduce_to_j2k_close_to_downsampled_full_decode(tmp_path: Path) -> None:
    # Noise-free: the codec's wavelet low-pass and a box filter disagree mostly on noise.
    pixels = radiograph(384, 512, bits=12, noise=0.0)
    path = _j2k_file(tmp_path, pixels, "j2k.dcm", bits_stored=12)
    full = read_dicom(path)
    reduced = read_dicom(path, reduce_to=90)
    assert full.reduction == 1 and reduced.reduction == 4  # 384 / 8 = 48 < 90 <= 384 / 4
    assert reduced.pixels.shape == (96, 128) and min(reduced.pixels.shape) >= 90
    box = full.pixels.astype(np.float64).reshape(96, 4, 128, 4).mean(axis=(1, 3))
    assert np.abs(reduced.pixels - box).mean() < 3.0  # about 1 % of the range
    # J2K's low-pass samples sit on the even grid (pixel 4n), not at block centres (4n + 1.5):
    # against the full decode taken on that grid the agreement is much closer.
    assert np.abs(reduced.pixels - full.pixels[::4, ::4].astype(np.float64)).mean() < 1.0
    assert reduced.header == full.header
    # A reduction that would undershoot is not taken; an uncompressed file ignores the hint.
    np.testing.assert_array_equal(read_dicom(path, reduce_to=384).pixels, full.pixels)
    plain = write(tmp_path, "plain.dcm", pixels, bits_stored=12)
    assert read_dicom(plain, reduce_to=90).reduction == 1
    np.testing.assert_array_equal(read_dicom(plain, reduce_to=90).pixels, full.pixels)


@pytest.mark.parametrize("signed", [False, True])
def test_pillow_j2k_decoder_at_level_0_equals_pydicom(tmp_path: Path, signed: bool) -> None:
    pixels = radiograph(64, 48, bits=12)
    if signed:
        pixels = (pixels.astype(np.int16) - 2048)
    path = _j2k_file(tmp_path, pixels, "j.dcm", bits_stored=12, signed=signed)
    ds = pydicom.dcmread(path)
    frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)
    info = codecs_mod._j2k_info(frame)
    assert info is not None and info.precision == 12 and info.signed == signed
    ours = codecs_mod._decode_j2k_reduced(frame, 0, precision=12, signed=signed)
    np.testing.assert_array_equal(ours, ds.pixel_array)
    np.testing.assert_array_equal(ours, pixels)
    # And the reduced read of a signed file goes through the same chain.
    assert read_dicom(path, reduce_to=20).reduction == 2


def test_reduce_to_validation() -> None:
    with pytest.raises(ValueError):
        read_dicom(get_testdata_file("MR_small.dcm"), reduce_to=0)
