"""SIIM-ACR Pneumothorax importer on a tiny tree in the Kaggle layout: labels, RLE masks, DICOMs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from medfilip.config import DataParams, PixelsParams
from medfilip.data.importers import DatasetError
from medfilip.data.importers.siim import decode_rle, load
from medfilip.data.ingest import ingest
from medfilip.evaluate.truth import build_truth

pytest.importorskip("pydicom")
from medfilip.testing.siim_layout import (  # noqa: E402
    TEST_IMAGES,
    TRAIN,
    encode_rle,
    image_path,
    siim_uid,
    write_siim,
)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_siim(tmp_path_factory.mktemp("siim"))


def _params(root: Path, metadata: str = "train-rle.csv") -> DataParams:
    return DataParams(source="siim", root=str(root), metadata=metadata)


def _kaggle_rle2mask(rle: str, width: int, height: int) -> np.ndarray:
    """The slow obvious twin: the competition's mask_functions.rle2mask, loop for loop, then .T as its users do."""
    mask = np.zeros(width * height)
    numbers = [int(x) for x in rle.split()]
    position = 0
    for start, length in zip(numbers[0::2], numbers[1::2]):
        position += start
        mask[position:position + length] = 255
        position += length
    return mask.reshape(width, height).T > 0


def test_images_labels_and_counts(tree):
    ds = load(tree, _params(tree))
    assert ds.studies.column("study_id").to_pylist() == sorted(TRAIN)
    assert ds.studies.column("patient_id").to_pylist() == sorted(TRAIN)  # ImageId as patient
    assert "split" not in ds.studies.column_names  # no official labelled split: data.split hashes it
    paths = dict(zip(ds.images.column("image_id").to_pylist(), ds.images.column("path").to_pylist()))
    for n, image_id in enumerate(TRAIN):
        assert paths[image_id] == str(image_path(tree, "dicom-images-train", image_id, n))
    ref = {r["study_id"]: r for r in ds.reference.to_pylist()}
    assert set(ref) == set(TRAIN) and {r["category"] for r in ref.values()} == {"pneumothorax"}
    for image_id, regions in TRAIN.items():
        assert ref[image_id]["negated"] is (not regions)  # "-1": pneumothorax absent, not "no finding"
    assert ds.notes["n_images_pneumothorax"] == 2 and ds.notes["n_images_pneumothorax_absent"] == 3
    assert ds.notes["n_unlabelled_files"] == {"dicom-images-train": 0, "dicom-images-test": len(TEST_IMAGES)}
    assert ds.notes["label_file"] == "train-rle.csv" and ds.notes["rle_format"] == "relative"


def test_every_region_is_a_mask_row_that_decodes_to_the_drawn_region(tree):
    ds = load(tree, _params(tree))
    rows = ds.masks.to_pylist()
    assert len(rows) == sum(len(r) for r in TRAIN.values()) == ds.notes["n_mask_regions"] == 3
    assert {(r["label"], r["kind"], r["rle_format"], r["height"], r["width"]) for r in rows} == {
        ("pneumothorax", "rle", "relative", None, None)}
    for image_id, regions in TRAIN.items():
        mine = [decode_rle(r["rle"], 8, 8) for r in rows if r["image_id"] == image_id]
        assert len(mine) == len(regions)  # the multi-region image keeps both regions apart
        for got, want in zip(mine, regions):
            assert np.array_equal(got, want)


def test_rle_decoding_matches_the_competition_code():
    rng = np.random.default_rng(0)
    for height, width in ((8, 8), (16, 16), (6, 10)):
        for _ in range(20):
            mask = rng.random((height, width)) < 0.3
            rle = encode_rle(mask)
            if rle == "-1":
                continue
            assert np.array_equal(decode_rle(rle, height, width), mask)
            if height == width:  # the competition's reshape(width, height).T assumes square images
                assert np.array_equal(_kaggle_rle2mask(rle, width, height), mask)
    # The published example's first runs: 387620 = 378 * 1024 + 548 pixels in (column 378, row 548),
    # 23 on; then 996 further (column 379, row 543), 33 on.
    big = decode_rle("387620 23 996 33", 1024, 1024)
    assert big.sum() == 56 and big[548:571, 378].all() and big[543:576, 379].all()
    assert not big[547, 378] and not big[571, 378] and not big[542, 379]


def test_stage2_csv_labels_the_test_folder_and_may_use_absolute_runs(tmp_path):
    extra = {TEST_IMAGES[0]: [], TEST_IMAGES[1]: [TRAIN[siim_uid(4, 0)][0]]}
    root = write_siim(tmp_path / "siim", stage2=True, test_labels=extra)
    ds = load(root, _params(root, "stage_2_train.csv"))
    assert ds.notes["label_file"] == "stage_2_train.csv" and ds.notes["rle_format"] == "relative"
    assert ds.studies.num_rows == len(TRAIN) + 2 and ds.notes["n_unlabelled_files"]["dicom-images-test"] == 0
    negated = {r["study_id"]: r["negated"] for r in ds.reference.to_pylist()}
    assert negated[TEST_IMAGES[0]] is True and negated[TEST_IMAGES[1]] is False

    # The same masks written in Kaggle's standard form (1-based absolute starts) are read as such.
    csv_path = root / "stage_2_train.csv"
    lines = csv_path.read_text().splitlines()
    rewritten = [lines[0]]
    for line in lines[1:]:
        image_id, rle = line.split(",")
        if rle != "-1":
            numbers = [int(x) for x in rle.split()]
            begins = np.cumsum(np.add(numbers[0::2], numbers[1::2])) - numbers[1::2]
            rle = " ".join(f"{b + 1} {n}" for b, n in zip(begins, numbers[1::2]))
        rewritten.append(f"{image_id},{rle}")
    csv_path.write_text("\n".join(rewritten) + "\n")
    absolute = load(root, _params(root, "stage_2_train.csv"))
    assert absolute.notes["rle_format"] == "absolute"
    for before, after in zip(ds.masks.to_pylist(), absolute.masks.to_pylist()):
        assert np.array_equal(decode_rle(before["rle"], 8, 8, "relative"), decode_rle(after["rle"], 8, 8, "absolute"))


def test_positives_are_pneumothorax_and_negated_rows_never_are(tree):
    ds = load(tree, _params(tree))
    studies = ds.studies.append_column("split", ds.studies.column("study_id"))  # any split: only labels matter
    truth = build_truth(ds.images, studies, ds.reference, ["pneumothorax", "no finding"])
    col = truth.column("pneumothorax")
    got = dict(zip(truth.image_ids, truth.labels[:, col].tolist()))
    assert got == {image_id: bool(regions) for image_id, regions in TRAIN.items()}


def test_ingest_writes_reference_and_masks(tree, tmp_path):
    summary = ingest(_params(tree), tmp_path / "interim")
    assert summary["n_images"] == len(TRAIN) and summary["n_missing_image_files"] == 0
    assert summary["n_mask_rows"] == 3 and summary["n_reference_rows"] == len(TRAIN)
    assert not summary["split_from_source"] and summary["rle_format"] == "relative"
    masks = pq.read_table(tmp_path / "interim" / "masks.parquet")
    assert masks.column("rle").to_pylist() == [encode_rle(m) for regions in TRAIN.values() for m in regions]


def test_a_labelled_image_without_a_file_is_left_out_with_a_warning(tmp_path, capsys):
    root = write_siim(tmp_path / "siim")
    gone = next(iter(TRAIN))
    image_path(root, "dicom-images-train", gone, 0).unlink()
    ds = load(root, _params(root))
    assert gone not in ds.studies.column("study_id").to_pylist() and ds.notes["n_labelled_without_file"] == 1
    assert gone in ds.notes["warnings"][0] and gone in capsys.readouterr().err


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace(", -1", ", 12 x", 1), r"train-rle\.csv: line \d+ \(ImageId 1\.2\.276[^)]*\): EncodedPixels"),
    (lambda t: t.replace(", -1", ", 3 4 5", 1), r"pairs of non-negative integers"),
    (lambda t: t.replace(", -1", ",", 1), r"EncodedPixels must be -1"),
    (lambda t: t.replace("ImageId,", "Image,", 1), r"column 'ImageId' not found"),
])
def test_bad_label_rows_name_the_file_and_line(tmp_path, edit, message):
    root = write_siim(tmp_path / "siim")
    csv_path = root / "train-rle.csv"
    csv_path.write_text(edit(csv_path.read_text()))
    with pytest.raises(DatasetError, match=message):
        load(root, _params(root))


def test_missing_files_say_where_to_point_data_root(tmp_path):
    with pytest.raises(DatasetError, match=r"neither train-rle\.csv nor stage_2_train\.csv found"):
        load(tmp_path, _params(tmp_path))
    (tmp_path / "train-rle.csv").write_text("ImageId, EncodedPixels\n1.2.3, -1\n")
    with pytest.raises(DatasetError, match=r"no dicom-images-train or dicom-images-test folder"):
        load(tmp_path, _params(tmp_path))


def test_a_label_map_without_pneumothorax_names_the_file(tree, tmp_path, monkeypatch):
    (tmp_path / "siim.yaml").write_text("labels:\n  Collapsed lung: pneumothorax\n")
    monkeypatch.setattr("medfilip.data.labelmap.LABEL_MAP_DIR", tmp_path)
    with pytest.raises(DatasetError, match=r"siim\.yaml: the dataset has a label 'Pneumothorax'"):
        load(tree, _params(tree))


def test_the_jpeg_dicoms_build_a_pixel_store(tree, tmp_path):
    from medfilip.pixels import PixelStore, build_pixel_store, load_image

    ds = load(tree, _params(tree))
    summary = build_pixel_store(ds.images, tmp_path / "pixels", PixelsParams(image_size=8, workers=1), progress=False)
    store = PixelStore.open(tmp_path / "pixels")
    assert summary["n_failed"] == 0 and len(store) == ds.images.num_rows and bool(np.all(store.ok))
    first = Path(ds.images.column("path")[0].as_py())
    img = load_image(first)
    assert img.dtype == np.uint8  # 8-bit, no window: display-ready, as an 8-bit PNG
    xx = np.mgrid[0:8, 0:8][1]
    assert np.abs(img.astype(int) - (40 + 20 * xx + 5 * np.mgrid[0:8, 0:8][0])).max() <= 4  # JPEG, quality 95
