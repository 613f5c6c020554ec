"""DICOM decoding: stored bits, signed pixels, VOI functions, compressed transfer syntaxes, a real radiograph."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from medfilip.config import PixelsParams
from medfilip.errors import UserError
from medfilip.pixels import (
    DicomDecoderMissing,
    _can_decode,
    _stored_values,
    build_pixel_store,
    load_image,
    resize_square,
    to_uint8,
)

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.uid import JPEGBaseline8Bit, JPEGLosslessSV1, RLELossless  # noqa: E402

from medfilip.testing.vindr_layout import write_dicom  # noqa: E402


def _ds(bits_stored: int, signed: bool) -> Dataset:
    ds = Dataset()
    ds.BitsStored, ds.PixelRepresentation = bits_stored, int(signed)
    return ds


def _ramp(bits: int) -> np.ndarray:
    return (np.arange(64, dtype=np.int64).reshape(8, 8) * ((1 << bits) - 1) // 63).astype(np.uint16)


# --------------------------------------------------------------------------- stored bits and sign


def test_bits_above_bits_stored_are_masked():
    words = np.array([[0x0FFF, 0xF001, 0x1234, 0x0005]], np.uint16)  # 12 bits stored, garbage above
    assert _stored_values(words, _ds(12, False)).tolist() == [[4095, 1, 0x234, 5]]
    clean = np.array([[4095, 1, 0x234, 5]], np.uint16)
    assert np.array_equal(_stored_values(clean, _ds(12, False)), clean)  # idempotent (pydicom 3 masks already)
    assert _stored_values(words, _ds(16, False)) is words  # all bits stored: nothing to do


def test_signed_values_are_sign_extended_from_bits_stored():
    # 12-bit two's complement in 16-bit words, once raw (garbage high bits) and once as pydicom 3 gives it.
    raw = np.array([[0x0FFF, 0x0800, 0x07FF, 0xAFFF]], np.uint16).view(np.int16)
    extended = np.array([[-1, -2048, 2047, -1]], np.int16)
    assert _stored_values(raw, _ds(12, True)).tolist() == [[-1, -2048, 2047, -1]]
    assert _stored_values(extended, _ds(12, True)).tolist() == extended.tolist()


def test_garbage_high_bits_do_not_reach_the_image(tmp_path):
    clean = _ramp(12)
    dirty = clean | np.uint16(0xA000)  # an overlay plane in bit 13 and 15
    write_dicom(tmp_path / "clean.dcm", clean, bits_stored=12)
    write_dicom(tmp_path / "dirty.dcm", clean, bits_stored=12, stored_words=dirty)
    assert np.array_equal(load_image(tmp_path / "dirty.dcm"), load_image(tmp_path / "clean.dcm"))


def test_signed_pixels_with_rescale_and_window(tmp_path):
    # Signed 16-bit values, intercept -24, window 0 +- 500: -1024 and 976 clip, -250/0/250 land at 1/4, 1/2, 3/4.
    values = np.array([[-1000, -226, 24, 274, 1000]], np.int16)
    write_dicom(tmp_path / "signed.dcm", values, bits_stored=16, signed=True,
                RescaleSlope=1, RescaleIntercept=-24, WindowCenter=0, WindowWidth=1001)
    assert load_image(tmp_path / "signed.dcm")[0].tolist() == [0, 64, 128, 191, 255]


# --------------------------------------------------------------------------- VOI LUT functions


@pytest.mark.parametrize("function", ["SIGMOID", "LINEAR_EXACT", "LINEAR", "UNKNOWN"])
def test_voi_lut_function(tmp_path, function):
    raw = np.array([[0, 1000, 2000, 2500, 3000, 4000]], np.uint16)
    write_dicom(tmp_path / "w.dcm", raw, WindowCenter=2000, WindowWidth=2000, VOILUTFunction=function)
    img = load_image(tmp_path / "w.dcm")
    x = raw[0].astype(np.float64)
    kind = function.strip().upper()
    if kind == "SIGMOID":  # PS3.3 C.11.2.1.3.1: 1 / (1 + exp(-4 (x - c) / w))
        expected = 255 / (1 + np.exp(-4 * (x - 2000) / 2000))
    elif kind == "LINEAR_EXACT":
        expected = np.clip((x - 2000) / 2000 + 0.5, 0, 1) * 255
    else:  # LINEAR, and an unknown name falls back to it
        expected = np.clip((x - 1999.5) / 1999 + 0.5, 0, 1) * 255
    assert img.dtype == np.uint8 and img[0].tolist() == np.rint(expected).astype(int).tolist()


def test_eight_bit_without_window_is_display_ready(tmp_path):
    raw = np.array([[0, 10, 128, 250, 255]], np.uint8)
    for photometric, expected in (("MONOCHROME2", raw), ("MONOCHROME1", 255 - raw)):
        path = tmp_path / f"{photometric}.dcm"
        write_dicom(path, raw, bits_stored=8, bits_allocated=8, photometric=photometric)
        img = load_image(path)
        assert img.dtype == np.uint8 and img.tolist() == expected.tolist()


# --------------------------------------------------------------------------- compressed transfer syntaxes


def test_rle_lossless_decodes_like_the_uncompressed_file(tmp_path):
    pixels = _ramp(12)
    for photometric in ("MONOCHROME2", "MONOCHROME1"):
        plain = write_dicom(tmp_path / f"plain-{photometric}.dcm", pixels, photometric=photometric)
        packed = write_dicom(tmp_path / f"rle-{photometric}.dcm", pixels, photometric=photometric, rle=True)
        assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID == RLELossless
        assert packed.read_bytes() != plain.read_bytes()
        assert np.array_equal(load_image(packed), load_image(plain))


def _encapsulated(path: Path, syntax, frame: bytes, pixels_shape=(8, 8)) -> Path:
    """A minimal 8-bit MONOCHROME2 file whose pixel data is ``frame`` under ``syntax``."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels_shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 8, 8, 7
    ds.PixelRepresentation, ds.PhotometricInterpretation = 0, "MONOCHROME2"
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    try:
        ds.save_as(path, implicit_vr=False, little_endian=True, enforce_file_format=True)
    except TypeError:  # pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)
    return path


def _jpeg(pixels: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="JPEG", quality=95)
    return out.getvalue()


def _assert_one_sentence(message: str, path: Path, *parts: str) -> None:
    assert str(path) in message and "\n" not in message
    for part in parts:
        assert part in message, (part, message)


def test_jpeg_lossless_without_a_plugin_is_an_install_hint(tmp_path):
    if _can_decode(JPEGLosslessSV1):
        pytest.skip("a JPEG Lossless decoder (pylibjpeg-libjpeg or gdcm) is installed here")
    path = _encapsulated(tmp_path / "lossless.dcm", JPEGLosslessSV1, b"\xff\xd8\xff\xd9")
    with pytest.raises(DicomDecoderMissing) as err:
        load_image(path)
    assert isinstance(err.value, ImportError) and isinstance(err.value, UserError)
    _assert_one_sentence(str(err.value), path, "JPEG Lossless", str(JPEGLosslessSV1),
                         "pip install pylibjpeg pylibjpeg-libjpeg")
    # An environment problem stops the build even with on_error: skip (never 1000s of skipped images).
    table = pa.table({"image_id": ["a"], "study_id": ["s"], "path": [str(path)]})
    with pytest.raises(DicomDecoderMissing):
        build_pixel_store(table, tmp_path / "store", PixelsParams(image_size=8, on_error="skip", workers=1),
                          progress=False)


def test_jpeg_baseline_decodes_or_names_the_plugin(tmp_path, monkeypatch):
    yy, xx = np.mgrid[0:8, 0:8]
    pixels = (60 + 18 * xx + 4 * yy).astype(np.uint8)
    path = _encapsulated(tmp_path / "baseline.dcm", JPEGBaseline8Bit, _jpeg(pixels))
    if _can_decode(JPEGBaseline8Bit):  # pydicom 3 decodes baseline JPEG through Pillow
        img = load_image(path)
        assert img.dtype == np.uint8 and np.abs(img.astype(int) - pixels).max() <= 4  # lossy, quality 95
    # Without any decoder for it (e.g. pydicom 2 without Pillow's JPEG): one sentence naming the plugin.
    monkeypatch.setattr("medfilip.pixels._can_decode", lambda syntax: False)
    with pytest.raises(DicomDecoderMissing) as err:
        load_image(path)
    _assert_one_sentence(str(err.value), path, "JPEG Baseline", str(JPEGBaseline8Bit),
                         "pip install pylibjpeg pylibjpeg-libjpeg")


def test_a_syntax_no_plugin_decodes_says_how_to_convert(tmp_path):
    path = _encapsulated(tmp_path / "video.dcm", "1.2.840.10008.1.2.4.100", b"\x00\x00")  # MPEG2 video
    with pytest.raises(DicomDecoderMissing, match=r"1\.2\.840\.10008\.1\.2\.4\.100.*gdcmconv --raw"):
        load_image(path)


def test_an_unknown_transfer_syntax_is_a_bad_image(tmp_path):
    path = _encapsulated(tmp_path / "private.dcm", "1.2.3.4.5.6", b"\x00\x00")
    with pytest.raises(UserError, match=r"private\.dcm: unknown transfer syntax 1\.2\.3\.4\.5\.6") as err:
        load_image(path)
    assert not isinstance(err.value, ImportError)


def test_corrupt_compressed_data_is_a_bad_image_not_a_missing_plugin(tmp_path):
    path = _encapsulated(tmp_path / "broken.dcm", RLELossless, b"\x00" * 8)
    with pytest.raises(UserError) as err:
        load_image(path)
    assert not isinstance(err.value, ImportError) and str(path) in str(err.value)


# --------------------------------------------------------------------------- a real radiograph


def _rg1_uncr() -> Path:
    """pydicom-data's RG1_UNCR.dcm, found the way the pixel tests find it (pydicom.data)."""
    data = pytest.importorskip("pydicom.data", reason="pydicom not installed")
    try:
        path = data.get_testdata_file("RG1_UNCR.dcm")
    except Exception as exc:  # pydicom may try (and fail) to download a missing file
        pytest.skip(f"RG1_UNCR.dcm not available ({exc}); pip install pydicom-data")
    if path is None:
        pytest.skip("RG1_UNCR.dcm not found: pip install pydicom-data to run this test")
    return Path(path)


def test_real_monochrome1_radiograph_has_dark_lungs_and_a_bright_mediastinum():
    path = _rg1_uncr()
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 15
    img = load_image(path)
    # MONOCHROME1: more attenuation is a *lower* stored value; the decoded image is its mirror.
    stored = ds.pixel_array.astype(np.float64)[::7, ::7].ravel()
    assert np.corrcoef(stored, img.astype(np.float64)[::7, ::7].ravel())[0, 1] < -0.99

    out = resize_square(to_uint8(img), 224)[:, 6:-6]  # 1841 x 1955 letterboxed by ~5 px a side
    h, w = out.shape
    band = out[int(0.25 * h):int(0.55 * h)].astype(np.float64)  # rows through both lung fields

    def cols(x0: float, x1: float) -> np.ndarray:
        return band[:, int(x0 * w):int(x1 * w)].mean(axis=1)

    left, centre, right = cols(0.15, 0.35), cols(0.45, 0.55), cols(0.65, 0.85)
    # Row by row, the central strip (spine, mediastinum) is brighter than each lung field on its own.
    assert (centre > left + 30).mean() > 0.9 and (centre > right + 30).mean() > 0.9
    assert centre.mean() > 200 and max(left.mean(), right.mean()) < 170
    # The column profile: a dark lung on each side of a bright middle.
    profile = band.mean(axis=0)
    half = w // 2
    lung_l, lung_r = int(np.argmin(profile[int(0.1 * w):half])) + int(0.1 * w), \
        int(np.argmin(profile[half:int(0.9 * w)])) + half
    assert 0.15 * w < lung_l < 0.45 * w and 0.55 * w < lung_r < 0.85 * w
    middle = profile[lung_l:lung_r]
    assert middle.max() > profile[lung_l] + 60 and middle.max() > profile[lung_r] + 60
    assert lung_l < int(np.argmax(middle)) + lung_l < lung_r
