"""RSNA Pneumonia Detection importer on a tiny tree in the published layout (medfilip/testing/rsna_layout.py)."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from medfilip.config import DataParams, PixelsParams
from medfilip.data.importers import DatasetError
from medfilip.data.importers.rsna import load
from medfilip.data.ingest import ingest
from medfilip.evaluate.truth import build_truth

pydicom = pytest.importorskip("pydicom")  # the fixture writes DICOMs
from medfilip.testing.rsna_layout import RSNA_PATIENTS, RSNA_TEST_IDS, write_rsna  # noqa: E402

CLASS = {pid: cls for pid, cls, _view, _boxes in RSNA_PATIENTS}


def params(root: Path) -> DataParams:
    return DataParams(source="rsna", root=str(root), metadata="stage_2_train_labels.csv")


@pytest.fixture(scope="module")
def rsna_root(tmp_path_factory) -> Path:
    return write_rsna(tmp_path_factory.mktemp("rsna"))


def test_one_study_and_patient_per_labelled_image(rsna_root):
    ds = load(rsna_root, params(rsna_root))
    assert ds.studies.column("study_id").to_pylist() == [p[0] for p in RSNA_PATIENTS]
    assert ds.studies.column("patient_id").to_pylist() == ds.studies.column("study_id").to_pylist()
    assert "split" not in ds.studies.column_names and set(ds.studies.column("report").to_pylist()) == {""}
    for image in ds.images.to_pylist():
        assert Path(image["path"]) == rsna_root / "stage_2_train_images" / f"{image['image_id']}.dcm"
        assert Path(image["path"]).is_file() and image["view"] is None
    assert ds.notes["n_test_images_unlabelled"] == len(RSNA_TEST_IDS)
    assert ds.notes["n_images_not_found"] == ds.notes["n_train_images_without_labels"] == 0
    assert ds.notes["labels_without_counterpart"] == {"No Lung Opacity / Not Normal": 2}


def test_classes_become_reference_rows(rsna_root):
    rows = load(rsna_root, params(rsna_root)).reference.to_pylist()
    got = {(r["study_id"], r["category"], r["negated"]) for r in rows}
    expected = set()
    for pid, cls in CLASS.items():
        expected.add({"Lung Opacity": (pid, "pneumonia", False), "Normal": (pid, "no finding", False),
                      "No Lung Opacity / Not Normal": (pid, "no finding", True)}[cls])
    assert got == expected and len(rows) == len(CLASS)


def test_not_normal_studies_are_neither_pneumonia_nor_normal_in_evaluation(rsna_root):
    ds = load(rsna_root, params(rsna_root))
    studies = ds.studies.append_column("split", ds.studies.column("study_id"))
    for derive_normal in (False, True):  # as evaluate reads a reference, and as it reads extractor labels
        truth = build_truth(ds.images, studies, ds.reference, ["pneumonia", "no finding"], derive_normal=derive_normal)
        _check_not_normal(truth)


def _check_not_normal(truth):
    for i, study in enumerate(truth.study_ids):
        pneumonia, normal = truth.labels[i]
        assert (pneumonia, normal) == {"Lung Opacity": (True, False), "Normal": (False, True),
                                       "No Lung Opacity / Not Normal": (False, False)}[CLASS[study]]


def test_target_1_boxes_become_masks(rsna_root):
    masks = load(rsna_root, params(rsna_root)).masks.to_pylist()
    expected = [(pid, *box) for pid, _cls, _view, boxes in RSNA_PATIENTS for box in boxes]
    assert [(m["image_id"], m["x"], m["y"], m["w"], m["h"]) for m in masks] == expected
    assert {(m["source_label"], m["label"], m["kind"]) for m in masks} == {("Lung Opacity", "pneumonia", "box")}


def test_ingest_and_pixel_store_decode_the_dicoms(rsna_root, tmp_path):
    from medfilip.pixels import PixelStore, build_pixel_store

    summary = ingest(params(rsna_root), tmp_path / "interim")
    assert summary["n_studies"] == summary["n_patients"] == len(RSNA_PATIENTS)
    assert summary["n_mask_rows"] == 5 and summary["n_missing_image_files"] == 0
    images = pq.read_table(tmp_path / "interim" / "images.parquet")
    stats = build_pixel_store(images, tmp_path / "pixels", PixelsParams(image_size=8, workers=1), progress=False)
    assert stats["n_ok"] == len(RSNA_PATIENTS) and stats["n_failed"] == 0
    array = PixelStore.open(tmp_path / "pixels").array
    assert array.shape == (len(RSNA_PATIENTS), 8, 8) and array.dtype == np.uint8
    for row, path in zip(array, images.column("path").to_pylist(), strict=True):  # each row is its own DICOM's pixels
        original = pydicom.dcmread(path).pixel_array.astype(float)
        assert np.corrcoef(original.ravel(), row.astype(float).ravel())[0, 1] > 0.95


def test_missing_file_or_column_is_a_sentence(tmp_path):
    root = write_rsna(tmp_path / "a", images=False)
    (root / "stage_2_detailed_class_info.csv").unlink()
    with pytest.raises(DatasetError, match=r"stage_2_detailed_class_info\.csv: not found; point data\.root"):
        load(root, params(root))
    root = write_rsna(tmp_path / "b", images=False)
    path = root / "stage_2_train_labels.csv"
    path.write_text(path.read_text().replace("Target", "target", 1))
    with pytest.raises(DatasetError, match=r"stage_2_train_labels\.csv: column 'Target' not found"):
        load(root, params(root))


def test_unknown_class_names_the_label_map(tmp_path):
    patients = RSNA_PATIENTS[:3] + [("0100515c-5204-4f31-98e0-f35e4b00004a", "Atelectasis", "PA", [])]
    root = write_rsna(tmp_path, patients=patients, images=False)
    with pytest.raises(DatasetError, match=r"rsna\.yaml.*'Atelectasis'"):
        load(root, params(root))


def test_files_that_disagree_are_an_error(tmp_path):
    patients = [(pid, "Lung Opacity" if cls == "Normal" else cls, v, b) for pid, cls, v, b in RSNA_PATIENTS]
    root = write_rsna(tmp_path / "a", patients=patients, images=False)
    with pytest.raises(DatasetError, match=r"patient '00322d4d-.*' is 'Lung Opacity' in one file but not in"):
        load(root, params(root))
    root = write_rsna(tmp_path / "b", images=False)
    path = root / "stage_2_train_labels.csv"
    path.write_text(path.read_text().replace(",,,,,0", ",,,,,2", 1))
    with pytest.raises(DatasetError, match=r"line 2 has a 'Target' that is neither 0 nor 1"):
        load(root, params(root))
