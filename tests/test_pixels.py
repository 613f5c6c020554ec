"""The pixel store: decoding, windowing, letterboxing, alignment and failure handling."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medfilip.config import PixelsParams
from medfilip.pixels import (
    INDEX_FILE,
    PixelError,
    PixelStore,
    benchmark,
    build_pixel_store,
    load_image,
    resize_square,
    shard_name,
    to_uint8,
)


def _gradient(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    return np.clip(xx * 7 + yy * 3 + rng.integers(0, 40, (h, w)), 0, 255).astype(np.uint8)


def _write_pngs(root: Path, shapes: list[tuple[int, int]]) -> pa.Table:
    """PNGs of the given (h, w) under root/imgs; the images table with paths relative to root."""
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    ids, paths = [], []
    for k, (h, w) in enumerate(shapes):
        Image.fromarray(_gradient(h, w, k)).save(root / "imgs" / f"im{k}.png")
        ids.append(f"im{k}")
        paths.append(f"imgs/im{k}.png")
    return pa.table(
        {"image_id": ids, "study_id": [f"s{k // 2}" for k in range(len(ids))], "path": paths}
    )


def _expected(path: Path, size: int) -> np.ndarray:
    return resize_square(to_uint8(load_image(path)), size)


def _params(size: int = 16, on_error: str = "fail", workers: int = 1) -> PixelsParams:
    return PixelsParams(image_size=size, on_error=on_error, workers=workers)


# --------------------------------------------------------------------------- building


def test_round_trip_keeps_order_and_pixels(tmp_path):
    table = _write_pngs(tmp_path, [(16, 16), (20, 10), (10, 30), (16, 16)])
    # A non-sorted order: the store must follow the table, not the file names.
    table = table.take([2, 0, 3, 1])
    summary = build_pixel_store(table, tmp_path / "store", _params(16), base_dir=tmp_path)
    assert summary["n_images"] == 4 and summary["n_ok"] == 4 and summary["n_failed"] == 0
    assert summary["failures"] == [] and summary["image_size"] == 16

    store = PixelStore.open(tmp_path / "store")
    assert len(store) == 4 and store.image_size == 16
    assert store.array.shape == (4, 16, 16) and store.array.dtype == np.uint8
    assert all(isinstance(s, np.memmap) and not s.flags.writeable for s in store.array.shards)
    assert store.index.column("image_id").to_pylist() == table.column("image_id").to_pylist()
    assert store.index.column("study_id").to_pylist() == table.column("study_id").to_pylist()
    assert store.index.column("row").to_pylist() == [0, 1, 2, 3]
    assert store.ok.tolist() == [True] * 4
    assert store.index.column("orig_height").to_pylist() == [10, 16, 16, 20]
    assert store.index.column("orig_width").to_pylist() == [30, 16, 16, 10]
    for row, (image_id, path) in enumerate(
        zip(table.column("image_id").to_pylist(), table.column("path").to_pylist())
    ):
        assert store.row_of(image_id) == row
        np.testing.assert_array_equal(store.get(image_id), _expected(tmp_path / path, 16))
    # A 16x16 image stored at 16 px is stored untouched.
    np.testing.assert_array_equal(store.get("im0"), _gradient(16, 16, 0))
    with pytest.raises(KeyError, match="nope"):
        store.row_of("nope")


def test_store_pickles_as_a_reopened_memmap(tmp_path):
    table = _write_pngs(tmp_path, [(12, 12)])
    build_pixel_store(table, tmp_path / "store", _params(12), base_dir=tmp_path, progress=False)
    clone = pickle.loads(pickle.dumps(PixelStore.open(tmp_path / "store")))
    assert all(isinstance(s, np.memmap) for s in clone.array.shards)  # reopened, not copied
    np.testing.assert_array_equal(clone.get("im0"), _gradient(12, 12, 0))


def test_absolute_paths_are_used_as_is(tmp_path):
    table = _write_pngs(tmp_path, [(8, 8)])
    table = table.set_column(2, "path", pa.array([str(tmp_path / "imgs" / "im0.png")]))
    summary = build_pixel_store(table, tmp_path / "store", _params(8), base_dir=Path("/elsewhere"))
    assert summary["n_ok"] == 1


def test_empty_table_gives_a_valid_empty_store(tmp_path):
    table = pa.table(
        {"image_id": pa.array([], pa.string()), "study_id": pa.array([], pa.string()),
         "path": pa.array([], pa.string())}
    )
    summary = build_pixel_store(table, tmp_path / "store", _params(32, workers=2))
    assert summary["n_images"] == 0 and summary["n_failed"] == 0
    store = PixelStore.open(tmp_path / "store")
    assert len(store) == 0 and store.array.shape == (0, 32, 32)


def test_duplicate_image_id_is_an_error(tmp_path):
    table = _write_pngs(tmp_path, [(8, 8), (8, 8)])
    table = table.set_column(0, "image_id", pa.array(["same", "same"]))
    with pytest.raises(ValueError, match="duplicate image_id.*'same'"):
        build_pixel_store(table, tmp_path / "store", _params(8), base_dir=tmp_path)
    assert not list((tmp_path / "store").glob("pixels*.npy"))


def test_workers_give_the_same_bytes_as_in_process(tmp_path):
    table = _write_pngs(tmp_path, [(20, 12), (9, 17), (16, 16), (31, 5), (7, 7), (25, 25)])
    build_pixel_store(table, tmp_path / "w1", _params(16, workers=1), base_dir=tmp_path)
    build_pixel_store(table, tmp_path / "w2", _params(16, workers=2), base_dir=tmp_path)
    one, two = tmp_path / "w1", tmp_path / "w2"
    assert (one / shard_name(0)).read_bytes() == (two / shard_name(0)).read_bytes()
    assert pq.read_table(one / INDEX_FILE).equals(pq.read_table(two / INDEX_FILE))


# --------------------------------------------------------------------------- failures


def _table_with_bad_images(tmp_path: Path) -> pa.Table:
    table = _write_pngs(tmp_path, [(12, 12), (12, 12)])
    (tmp_path / "imgs" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    extra = pa.table(
        {"image_id": ["missing", "corrupt"], "study_id": ["s9", "s9"],
         "path": ["imgs/missing.png", "imgs/corrupt.png"]}
    )
    return pa.concat_tables([table.slice(0, 1), extra, table.slice(1, 1)])


@pytest.mark.parametrize("bad_first", ["missing", "corrupt"])
def test_bad_image_with_on_error_fail_leaves_nothing_behind(tmp_path, bad_first):
    table = _table_with_bad_images(tmp_path)
    if bad_first == "corrupt":  # make the corrupt file the first failure met
        table = table.take([0, 2, 1, 3])
    out = tmp_path / "store"
    with pytest.raises(PixelError) as info:
        build_pixel_store(table, out, _params(12, "fail"), base_dir=tmp_path)
    message = str(info.value)
    assert f"imgs/{bad_first}.png" in message and repr(bad_first) in message
    assert "on_error: skip" in message
    assert sorted(p.name for p in out.iterdir()) == []  # no store, no partial files


def test_bad_image_with_on_error_skip_is_recorded(tmp_path):
    table = _table_with_bad_images(tmp_path)
    summary = build_pixel_store(table, tmp_path / "store", _params(12, "skip"), base_dir=tmp_path)
    assert summary["n_images"] == 4 and summary["n_ok"] == 2 and summary["n_failed"] == 2
    assert [f["image_id"] for f in summary["failures"]] == ["missing", "corrupt"]
    assert "not found" in summary["failures"][0]["error"]
    assert "missing.png" in summary["failures"][0]["error"]
    assert "corrupt.png" in summary["failures"][1]["error"]

    store = PixelStore.open(tmp_path / "store")
    assert store.ok.tolist() == [True, False, False, True]
    errors = store.index.column("error").to_pylist()
    assert errors[0] is None and errors[3] is None and errors[1] and errors[2]
    assert store.index.column("orig_height").to_pylist() == [12, None, None, 12]
    assert not store.array[1].any() and not store.array[2].any()
    np.testing.assert_array_equal(store.get("im0"), _gradient(12, 12, 0))
    np.testing.assert_array_equal(store.get("im1"), _gradient(12, 12, 1))
    with pytest.raises(PixelError, match="missing"):
        store.get("missing")


def test_load_image_names_the_path(tmp_path):
    with pytest.raises(PixelError, match="nothere.png"):
        load_image(tmp_path / "nothere.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(PixelError, match="bad.jpg"):
        load_image(tmp_path / "bad.jpg")


# --------------------------------------------------------------------------- windowing and resizing


def test_16bit_png_is_windowed_to_the_full_uint8_range(tmp_path):
    values = np.linspace(1000, 40000, 64 * 64).reshape(64, 64).astype(np.uint16)
    values[0, 0] = 65535  # a hot pixel must not squash the anatomy into a few grey levels
    Image.fromarray(values).save(tmp_path / "deep.png")
    img = load_image(tmp_path / "deep.png")
    assert img.dtype == np.uint16 and img.max() == 65535

    u8 = to_uint8(img)
    assert u8.dtype == np.uint8 and u8.min() == 0 and u8.max() == 255
    assert np.all(np.diff(u8[1:].ravel().astype(int)) >= 0)  # monotone: order preserved
    assert len(np.unique(u8)) > 200  # the ramp uses (almost) every grey level

    table = pa.table({"image_id": ["deep"], "study_id": ["s"], "path": ["deep.png"]})
    build_pixel_store(table, tmp_path / "store", _params(64), base_dir=tmp_path)
    stored = PixelStore.open(tmp_path / "store").get("deep")
    assert stored.min() == 0 and stored.max() == 255


def test_to_uint8_window_and_edge_cases():
    assert to_uint8(np.full((4, 4), 7, np.uint8)).tolist() == np.full((4, 4), 7).tolist()
    assert not to_uint8(np.full((4, 4), 1234, np.uint16)).any()  # constant: zeros, no NaN
    ramp = np.arange(0, 1000, dtype=np.float32).reshape(10, 100)
    windowed = to_uint8(ramp, window=(500.0, 201.0))  # DICOM linear: 400..600 -> 0..255
    assert windowed[0, 0] == 0 and windowed[-1, -1] == 255 and windowed[5, 0] == 128


def test_16bit_tiff_and_jpeg_draft_record_original_size(tmp_path):
    deep = (np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.tif")
    photo = _gradient(300, 400, 3)
    Image.fromarray(photo).save(tmp_path / "big.jpg", quality=95)
    table = pa.table(
        {"image_id": ["tif", "jpg", "nopath"], "study_id": ["s", "s", "s"],
         "path": ["deep.tif", "big.jpg", None]}
    )
    summary = build_pixel_store(table, tmp_path / "store", _params(32, "skip"), base_dir=tmp_path)
    assert summary["n_failed"] == 1 and "no path" in summary["failures"][0]["error"]
    store = PixelStore.open(tmp_path / "store")
    assert store.index.column("orig_height").to_pylist() == [30, 300, None]
    assert store.index.column("orig_width").to_pylist() == [40, 400, None]
    tif = store.get("tif")
    # 16-bit windowed to the full range (the resize softens the extreme pixels a little).
    assert tif[4:28].min() <= 3 and tif[4:28].max() >= 252 and not tif[:4].any()
    # The reduced-scale JPEG decode stays close to a full decode resized the same way.
    full = _expected(tmp_path / "big.jpg", 32).astype(int)
    assert np.abs(store.get("jpg").astype(int) - full).mean() < 2


def test_rgb_is_converted_to_luminance(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 1] = 200
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    img = load_image(tmp_path / "rgb.png")
    assert img.shape == (8, 8) and img.dtype == np.uint8
    assert abs(int(img[0, 0]) - round(0.587 * 200)) <= 1


def test_letterbox_keeps_aspect_ratio_and_pads_with_zero():
    wide = np.full((20, 40), 255, np.uint8)
    out = resize_square(wide, 20)
    assert out.shape == (20, 20)
    assert not out[:5].any() and not out[15:].any()
    assert (out[5:15] == 255).all()

    tall = np.full((30, 10), 200, np.uint8)
    out = resize_square(tall, 15)
    assert not out[:, :5].any() and not out[:, 10:].any()
    assert (out[:, 5:10] == 200).all()

    big = _gradient(200, 100, 0)
    out = resize_square(big, 50)
    assert out.shape == (50, 50) and not out[:, :12].any() and not out[:, 37:].any()
    assert abs(float(out[:, 12:37].mean()) - float(big.mean())) < 3  # antialiased, not decimated


# --------------------------------------------------------------------------- DICOM


def _write_dicom(path: Path, pixels: np.ndarray, **attrs) -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_dicom_rescale_window_and_monochrome1(tmp_path):
    raw = np.tile(np.arange(0, 4000, 1000, dtype=np.uint16), (4, 1))  # columns 0,1000,2000,3000
    # Rescale to -1000..2000, window 0..1000 (center 500.5, width 1001 -> exactly 0..255).
    attrs = dict(RescaleSlope=1, RescaleIntercept=-1000, WindowCenter=500.5, WindowWidth=1001)
    # No .dcm suffix: found by the DICM magic.
    _write_dicom(tmp_path / "mono2.bin", raw, **attrs)
    img = load_image(tmp_path / "mono2.bin")
    assert img.dtype == np.uint8 and img[0].tolist() == [0, 0, 255, 255]

    _write_dicom(tmp_path / "mono1.dcm", raw, PhotometricInterpretation="MONOCHROME1", **attrs)
    assert load_image(tmp_path / "mono1.dcm")[0].tolist() == [255, 255, 0, 0]

    # Without a window: raw values (inverted for MONOCHROME1) go to the percentile window.
    _write_dicom(tmp_path / "nowin.dcm", raw, PhotometricInterpretation="MONOCHROME1")
    img = load_image(tmp_path / "nowin.dcm")
    assert img.dtype != np.uint8 and img[0].tolist() == [3000, 2000, 1000, 0]
    assert to_uint8(img)[0].tolist() == [255, 170, 85, 0]


def test_dicom_voi_lut_sequence_is_preferred_and_normalised_by_its_data(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.add_new(0x00283002, "US", [4, 0, 16])  # LUT Descriptor: 4 entries from 0, "16 bits"
    item.add_new(0x00283006, "US", [0, 100, 300, 4095])  # LUT Data: really 12 bits
    raw = np.array([[0, 1, 2, 3, 9]], np.uint16)  # 9 lies past the LUT: clamps to its end
    _write_dicom(
        tmp_path / "voi.dcm", raw, VOILUTSequence=Sequence([item]), WindowCenter=1, WindowWidth=2
    )
    assert load_image(tmp_path / "voi.dcm")[0].tolist() == [0, 6, 19, 255, 255]


def test_missing_pydicom_is_an_install_hint_not_a_skipped_image(tmp_path, monkeypatch):
    _write_dicom(tmp_path / "x.dcm", np.zeros((4, 4), np.uint16))
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom -> ImportError
    table = pa.table({"image_id": ["x"], "study_id": ["s"], "path": ["x.dcm"]})
    with pytest.raises(ImportError, match=r"medfilip\[dicom\]"):
        build_pixel_store(table, tmp_path / "store", _params(8, "skip"), base_dir=tmp_path)
    assert not list((tmp_path / "store").glob("pixels*.npy"))


def test_real_radiograph_rg1_uncr_decodes_plausibly():
    pydicom_data = pytest.importorskip("pydicom.data", reason="pydicom not installed")
    try:
        path = pydicom_data.get_testdata_file("RG1_UNCR.dcm")
    except Exception as exc:  # pydicom may try (and fail) to download a missing file
        pytest.skip(f"RG1_UNCR.dcm not available ({exc}); pip install pydicom-data")
    if path is None:
        pytest.skip("RG1_UNCR.dcm not found: pip install pydicom-data to run this test")

    img = load_image(Path(path))
    assert img.shape == (1955, 1841) and img.dtype == np.uint8  # windowed by its own VOI window
    out = resize_square(to_uint8(img), 224)
    assert out.shape == (224, 224)
    assert int(out.max()) - int(out.min()) > 200  # uses the uint8 range

    def region(y0: float, y1: float, x0: float, x1: float) -> float:
        content = out[:, 6:-6]  # 1841x1955 is letterboxed by ~5 px each side
        h, w = content.shape
        return float(content[int(y0 * h) : int(y1 * h), int(x0 * w) : int(x1 * w)].mean())

    lungs = (region(0.25, 0.5, 0.15, 0.35) + region(0.25, 0.5, 0.65, 0.85)) / 2
    mediastinum = region(0.25, 0.6, 0.45, 0.55)
    # MONOCHROME1 is inverted: air-filled lungs dark, spine and mediastinum bright.
    assert mediastinum > lungs + 30, (lungs, mediastinum)


# --------------------------------------------------------------------------- benchmark


def test_benchmark_reports_throughput():
    result = benchmark(n_images=4, image_size=32, workers=1)
    assert result["n_images"] == 4 and result["images_per_s"] > 0


# --------------------------------------------------------------------------- shards and resume


def test_sharded_store_equals_one_shard(tmp_path):
    table = _write_pngs(tmp_path, [(20, 12), (9, 17), (16, 16), (31, 5), (7, 7), (25, 25), (12, 30)])
    build_pixel_store(table, tmp_path / "one", PixelsParams(image_size=16, shard_images=100), base_dir=tmp_path)
    summary = build_pixel_store(table, tmp_path / "many", PixelsParams(image_size=16, shard_images=3),
                                base_dir=tmp_path)
    assert summary["n_shards"] == 3 and sorted(p.name for p in (tmp_path / "many").glob("*.npy")) == [
        shard_name(0), shard_name(1), shard_name(2)]
    one, many = PixelStore.open(tmp_path / "one"), PixelStore.open(tmp_path / "many")
    assert many.array.shape == one.array.shape == (7, 16, 16) and len(many) == 7 and many.image_size == 16
    whole = np.asarray(one.array[np.arange(7)])
    assert np.array_equal(many.array[np.arange(7)], whole)
    assert np.array_equal(many.array[2:6], whole[2:6]) and np.array_equal(many.array[-1], whole[-1])
    rows = np.array([6, 0, 3, 3, 5])  # unsorted, repeated, across shards
    assert np.array_equal(many.array[rows], whole[rows])
    for r in range(7):
        assert np.array_equal(many.array[r], whole[r])
    assert many.get("im4").tolist() == one.get("im4").tolist()
    assert many.index.column("shard").to_pylist() == [0, 0, 0, 1, 1, 1, 2]
    assert pickle.loads(pickle.dumps(many)).array[5].tolist() == whole[5].tolist()
    with pytest.raises(IndexError):
        many.array[7]


def test_interrupted_build_resumes_and_skips_finished_shards(tmp_path, monkeypatch):
    import medfilip.pixels as pixels

    table = _write_pngs(tmp_path, [(20, 12), (9, 17), (16, 16), (31, 5), (7, 7), (25, 25), (12, 30)])
    params = PixelsParams(image_size=16, shard_images=2)
    build_pixel_store(table, tmp_path / "ref", params, base_dir=tmp_path)
    real = pixels._write_shard
    written: list[int] = []

    def interrupted(out_dir, k, *args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt  # killed while writing the third shard
        written.append(k)
        return real(out_dir, k, *args, **kwargs)

    monkeypatch.setattr(pixels, "_write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_pixel_store(table, tmp_path / "store", params, base_dir=tmp_path)
    left = sorted(p.name for p in (tmp_path / "store").iterdir())
    assert left == [shard_name(0), shard_name(0)[:-4] + ".parquet", shard_name(1), shard_name(1)[:-4] + ".parquet"]
    finished = {k: (tmp_path / "store" / shard_name(k)).stat().st_mtime_ns for k in (0, 1)}

    written.clear()
    monkeypatch.setattr(pixels, "_write_shard", lambda out_dir, k, *a, **kw: written.append(k) or real(out_dir, k, *a, **kw))
    summary = build_pixel_store(table, tmp_path / "store", params, base_dir=tmp_path)
    assert written == [2, 3] and summary["n_shards_reused"] == 2 and summary["n_shards"] == 4
    assert {k: (tmp_path / "store" / shard_name(k)).stat().st_mtime_ns for k in (0, 1)} == finished
    ref, store = PixelStore.open(tmp_path / "ref"), PixelStore.open(tmp_path / "store")
    assert np.array_equal(store.array[np.arange(7)], ref.array[np.arange(7)])
    assert pq.read_table(tmp_path / "store" / INDEX_FILE).equals(pq.read_table(tmp_path / "ref" / INDEX_FILE))

    # A changed image size, or changed rows, rebuild the shards they touch.
    written.clear()
    build_pixel_store(table, tmp_path / "store", PixelsParams(image_size=8, shard_images=2), base_dir=tmp_path)
    assert written == [0, 1, 2, 3]
    written.clear()
    build_pixel_store(table.slice(0, 5), tmp_path / "store", PixelsParams(image_size=8, shard_images=2),
                      base_dir=tmp_path)
    assert written == [2] and not (tmp_path / "store" / shard_name(3)).exists()
    assert len(PixelStore.open(tmp_path / "store")) == 5


def test_a_failed_image_keeps_the_finished_shards(tmp_path):
    table = _write_pngs(tmp_path, [(12, 12), (12, 12), (12, 12)])
    (tmp_path / "imgs" / "im2.png").write_bytes(b"not a png")
    with pytest.raises(PixelError, match="im2"):
        build_pixel_store(table, tmp_path / "store", PixelsParams(image_size=8, shard_images=2), base_dir=tmp_path)
    assert (tmp_path / "store" / shard_name(0)).exists() and not (tmp_path / "store" / shard_name(1)).exists()
    assert not list((tmp_path / "store").glob("*.partial"))


def test_trainer_dataset_reads_a_sharded_store(tmp_path):
    torch = pytest.importorskip("torch")
    from medfilip.trainset import PixelDataset

    table = _write_pngs(tmp_path, [(20, 12), (9, 17), (16, 16), (31, 5), (7, 7)])
    build_pixel_store(table, tmp_path / "store", PixelsParams(image_size=16, shard_images=2), base_dir=tmp_path)
    store = PixelStore.open(tmp_path / "store")
    index = type("Index", (), {"pixel_row": np.array([4, 1, 2, 0])})()
    dataset = PixelDataset(store, index)
    images, positions = dataset.__getitems__([0, 1, 3])
    assert isinstance(images, torch.Tensor) and images.shape == (3, 16, 16)
    for i, p in enumerate([0, 1, 3]):
        assert np.array_equal(images[i].numpy(), store.array[int(index.pixel_row[p])])
        assert np.array_equal(dataset[p][0].numpy(), images[i].numpy())


def test_a_changed_image_file_rebuilds_only_its_shard(tmp_path):
    """With ingest's fingerprint (size, mtime), an image replaced in place rebuilds its shard and no other."""
    import os

    import medfilip.pixels as pixels
    from medfilip.data.ingest import image_files

    table = _write_pngs(tmp_path, [(20, 12), (9, 17), (16, 16), (31, 5), (7, 7)])
    absolute = table.set_column(2, "path", pa.array([str(tmp_path / p) for p in table.column("path").to_pylist()]))
    params = PixelsParams(image_size=16, shard_images=2)
    build_pixel_store(absolute, tmp_path / "store", params, files=image_files(absolute))
    written: list[int] = []
    real = pixels._write_shard

    def spy(out_dir, k, *a, **kw):
        written.append(k)
        return real(out_dir, k, *a, **kw)

    import pytest as _pytest

    with _pytest.MonkeyPatch.context() as mp:
        mp.setattr(pixels, "_write_shard", spy)
        build_pixel_store(absolute, tmp_path / "store", params, files=image_files(absolute))
        assert written == []  # nothing changed: every shard reused
        target = tmp_path / "imgs" / "im2.png"  # shard 1
        Image.fromarray(np.full((16, 16), 255, np.uint8)).save(target)
        os.utime(target, ns=(1_000_000_000, 1_000_000_000))  # a distinct mtime even on a coarse clock
        build_pixel_store(absolute, tmp_path / "store", params, files=image_files(absolute))
    assert written == [1]
    assert PixelStore.open(tmp_path / "store").array[2].min() == 255


def test_the_store_does_not_depend_on_this_machines_mtimes(tmp_path):
    """Two builds from the same images with different mtimes: identical shards and index parts (what DVC
    hashes); only the .dvcignore'd fingerprint records differ."""
    import os

    from medfilip.data.ingest import image_files

    table = _write_pngs(tmp_path, [(20, 12), (9, 17), (16, 16)])
    absolute = table.set_column(2, "path", pa.array([str(tmp_path / p) for p in table.column("path").to_pylist()]))
    params = PixelsParams(image_size=16, shard_images=2)
    build_pixel_store(absolute, tmp_path / "a", params, files=image_files(absolute))
    for p in absolute.column("path").to_pylist():
        os.utime(p, ns=(2_000_000_000, 2_000_000_000))
    build_pixel_store(absolute, tmp_path / "b", params, files=image_files(absolute))
    hashed = sorted(p.name for p in (tmp_path / "a").iterdir() if not p.name.endswith(".fingerprint"))
    assert hashed == sorted(p.name for p in (tmp_path / "b").iterdir() if not p.name.endswith(".fingerprint"))
    for name in hashed:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    fingerprints = sorted(p.name for p in (tmp_path / "a").glob("*.fingerprint"))
    assert fingerprints == ["pixels-00000.fingerprint", "pixels-00001.fingerprint"]
    assert (tmp_path / "a" / fingerprints[0]).read_text() != (tmp_path / "b" / fingerprints[0]).read_text()
    dvcignore = (Path(__file__).resolve().parents[1] / ".dvcignore").read_text().splitlines()
    assert "pixels-*.fingerprint" in dvcignore
