"""VinDr-CXR importer on a tiny tree in the PhysioNet layout: counts, split, majority labels, boxes, DICOMs."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from medfilip.config import DataParams, PixelsParams, SplitParams
from medfilip.data.importers import DatasetError
from medfilip.data.importers.vindr import load
from medfilip.data.ingest import ingest
from medfilip.data.labelmap import load_label_map
from medfilip.data.split import assign_split

pytest.importorskip("pydicom")
from medfilip.testing.vindr_layout import LABELS, LOCAL_LABELS, TEST, TRAIN, vindr_id, write_vindr  # noqa: E402


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_vindr(tmp_path_factory.mktemp("vindr"))


def _params(root: Path, **split) -> DataParams:
    return DataParams(source="vindr", root=str(root), metadata="annotations", split=SplitParams(**split))


def _reference(ds) -> dict[str, set]:
    out = defaultdict(set)
    for row in ds.reference.to_pylist():
        assert not row["negated"] and not row["uncertain"]
        out[row["study_id"]].add((row["category"], row["location"]))
    return dict(out)


def _majority_from_csv(path: Path) -> dict[str, set[str]]:
    """The slow obvious twin: read the CSV row by row and count each image's readers and votes."""
    readers, votes = defaultdict(int), defaultdict(lambda: defaultdict(int))
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            readers[row["image_id"]] += 1
            for label in LABELS:
                votes[row["image_id"]][label] += row[label] == "1"
    return {i: {label for label, v in votes[i].items() if 2 * v > readers[i]} for i in readers}


def test_every_image_is_a_study_and_a_patient_with_its_dicom_path(tree):
    ds = load(tree, _params(tree))
    ids = sorted(TRAIN) + sorted(TEST)
    assert sorted(ds.studies.column("study_id").to_pylist()) == sorted(ids)
    assert ds.studies.column("patient_id").to_pylist() == ds.studies.column("study_id").to_pylist()
    assert set(ds.studies.column("report").to_pylist()) == {""}
    paths = dict(zip(ds.images.column("image_id").to_pylist(), ds.images.column("path").to_pylist()))
    assert ds.images.column("image_id").to_pylist() == ds.images.column("study_id").to_pylist()
    for image_id, path in paths.items():
        part = "test" if image_id in TEST else "train"
        assert path == str(tree / part / f"{image_id}.dicom") and Path(path).is_file()
    assert "patient" in ds.notes["patients"] and ds.notes["readers_per_train_image"] == {"3": len(TRAIN)}


def test_test_set_is_test_and_train_images_split_train_val_by_the_ratio(tree):
    ds = load(tree, _params(tree, train=0.6, val=0.2, test=0.2, seed=3))
    split = dict(zip(ds.studies.column("study_id").to_pylist(), ds.studies.column("split").to_pylist()))
    renormalised = SplitParams(train=0.75, val=0.25, test=0.0, seed=3)
    for image_id in TRAIN:
        assert split[image_id] == assign_split(image_id, renormalised) in ("train", "val")
    assert all(split[i] == "test" for i in TEST)
    with pytest.raises(DatasetError, match="data.split.train and data.split.val"):
        load(tree, _params(tree, train=0.0, val=0.0, test=1.0))


def test_train_labels_are_the_majority_of_readers_and_test_labels_the_consensus(tree):
    ds = load(tree, _params(tree))
    ref = _reference(ds)
    assert ref[vindr_id("heart")] == {("cardiomegaly", None)}  # aortic enlargement: 1 reader of 3
    assert ref[vindr_id("normal")] == {("no finding", None)}
    assert ref[vindr_id("nodule")] == {("nodule", None)}  # Other lesion (2 of 3) has no counterpart
    assert ref[vindr_id("copd")] == {("emphysema", None), ("fracture", None)}  # COPD 2/3 -> one emphysema row
    assert vindr_id("disagree") not in ref  # three readers, three answers: no label
    assert ref[vindr_id("test-effusion")] == {("pleural effusion", None), ("lung opacity", None), ("pneumonia", None)}
    assert ref[vindr_id("test-normal")] == {("no finding", None)}
    assert ref[vindr_id("test-clavicle")] == {("fracture", "upper zone")}
    assert ds.notes["labels_without_counterpart"] == {"Other lesion": 1, "Tuberculosis": 1}
    assert ds.notes["n_train_images_without_label"] == 1

    # The vectorised vote equals a row-by-row count of the CSV, mapped through the label map.
    lm = load_label_map("vindr")
    twin = _majority_from_csv(tree / "annotations" / "image_labels_train.csv")
    for image_id, labels in twin.items():
        mapped = {(t.category, t.location) for t in map(lm.get, labels) if t is not None}
        assert ref.get(image_id, set()) == mapped


def test_boxes_are_kept_per_reader_as_masks(tree):
    ds = load(tree, _params(tree))
    rows = ds.masks.to_pylist()
    expected = sum(name in LOCAL_LABELS for readings in TRAIN.values() for _, labels in readings for name in labels)
    expected += sum(name in LOCAL_LABELS for labels in TEST.values() for name in labels)
    assert len(rows) == expected and {r["kind"] for r in rows} == {"box"}
    assert all(r["rle"] is None and r["w"] == 30.5 and r["h"] == 41.0 for r in rows)
    heart = [r for r in rows if r["image_id"] == vindr_id("heart")]
    assert sorted((r["rad_id"], r["source_label"], r["label"]) for r in heart) == [
        ("R1", "Aortic enlargement", "aortic enlargement"), ("R1", "Cardiomegaly", "cardiomegaly"),
        ("R2", "Cardiomegaly", "cardiomegaly")]
    assert {r["label"] for r in rows if r["source_label"] == "Other lesion"} == {None}
    assert {r["rad_id"] for r in rows if r["image_id"] in TEST} == {None}  # consensus: no reader
    assert not any(r["image_id"] == vindr_id("normal") for r in rows)  # "No finding": no box


def test_ingest_writes_reference_and_masks(tree, tmp_path):
    summary = ingest(_params(tree), tmp_path / "interim")
    studies = pq.read_table(tmp_path / "interim" / "studies.parquet")
    assert summary["n_images"] == len(TRAIN) + len(TEST) and summary["n_missing_image_files"] == 0
    assert summary["split_from_source"] and summary["studies_per_split"]["test"] == len(TEST)
    assert summary["n_mask_rows"] == pq.read_table(tmp_path / "interim" / "masks.parquet").num_rows > 0
    assert pq.read_table(tmp_path / "interim" / "reference.parquet").num_rows == summary["n_reference_rows"] == 10
    assert set(studies.column("report").to_pylist()) == {""}


def test_without_test_files_every_image_gets_the_hashed_split(tmp_path):
    root = write_vindr(tmp_path / "vindr", test={})
    ds = load(root, _params(root))
    assert "split" not in ds.studies.column_names and ds.studies.num_rows == len(TRAIN)
    assert "no annotations/image_labels_test.csv" in ds.notes["split"]


def test_test_csvs_with_an_empty_rad_id_column_read_the_same(tree, tmp_path):
    root = write_vindr(tmp_path / "vindr", test_rad_id=True)
    assert _reference(load(root, _params(root))) == _reference(load(tree, _params(tree)))


def test_an_unknown_label_names_the_label_map(tmp_path):
    root = write_vindr(tmp_path / "vindr")
    labels = root / "annotations" / "image_labels_train.csv"
    lines = labels.read_text().splitlines()
    labels.write_text("\n".join([lines[0] + ",Situs inversus"] + [line + ",0" for line in lines[1:]]) + "\n")
    with pytest.raises(DatasetError, match=r"vindr\.yaml.*'Situs inversus'"):
        load(root, _params(root))


def test_an_unknown_box_class_names_the_label_map(tmp_path):
    root = write_vindr(tmp_path / "vindr")
    boxes = root / "annotations" / "annotations_train.csv"
    boxes.write_text(boxes.read_text().replace("Aortic enlargement", "Dextrocardia", 1))
    with pytest.raises(DatasetError, match=r"vindr\.yaml.*'Dextrocardia'"):
        load(root, _params(root))


@pytest.mark.parametrize("edit, message", [
    (lambda text: text.replace(",R2,0,", ",R2,2,", 1),
     r"image_labels_train\.csv: line \d+, column 'Aortic enlargement': '2' is not 0 or 1"),
    (lambda text: text.replace("image_id,", "image,", 1), r"column 'image_id' not found"),
])
def test_bad_label_csv_names_the_file_line_and_column(tmp_path, edit, message):
    root = write_vindr(tmp_path / "vindr")
    labels = root / "annotations" / "image_labels_train.csv"
    labels.write_text(edit(labels.read_text()))
    with pytest.raises(DatasetError, match=message):
        load(root, _params(root))


def test_a_finding_row_without_a_box_is_an_error(tmp_path):
    root = write_vindr(tmp_path / "vindr")
    boxes = root / "annotations" / "annotations_train.csv"
    lines = boxes.read_text().splitlines()
    lines[1] = ",".join(lines[1].split(",")[:3] + ["", "", "", ""])
    boxes.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"annotations_train\.csv: line 2 \('Cardiomegaly'\) has no box"):
        load(root, _params(root))


def test_an_image_in_train_and_test_is_an_error(tmp_path):
    image_id = next(iter(TRAIN))
    root = write_vindr(tmp_path / "vindr", test={image_id: ["No finding"]})
    with pytest.raises(DatasetError, match=f"'{image_id}' is also in image_labels_train.csv"):
        load(root, _params(root))


def test_missing_label_file_says_where_to_point_data_root(tmp_path):
    with pytest.raises(DatasetError, match=r"image_labels_train\.csv: not found; point data.root"):
        load(tmp_path, _params(tmp_path))


def test_every_vindr_label_is_mapped_to_the_vocabulary():
    lm = load_label_map("vindr")  # loading checks every target against the vocabulary
    assert set(lm.targets) == set(LABELS)


def test_the_dicoms_build_a_pixel_store(tree, tmp_path):
    from medfilip.pixels import PixelStore, build_pixel_store

    ds = load(tree, _params(tree))
    summary = build_pixel_store(ds.images, tmp_path / "pixels", PixelsParams(image_size=8, workers=1), progress=False)
    store = PixelStore.open(tmp_path / "pixels")
    assert summary["n_failed"] == 0
    assert len(store) == ds.images.num_rows and bool(np.all(store.ok))
    for k in range(len(store)):
        img = np.asarray(store.array[k])
        assert img.shape == (8, 8) and int(img.max()) - int(img.min()) > 100  # decoded, not blank
