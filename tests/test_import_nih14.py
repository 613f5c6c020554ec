"""NIH ChestX-ray14 importer on tiny trees in the published layout (medfilip/testing/nih14_layout.py)."""

from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from medfilip.config import DataParams, SplitParams
from medfilip.data.importers import DatasetError
from medfilip.data.importers.nih14 import load
from medfilip.data.ingest import canonicalize, ingest
from medfilip.data.split import patient_unit
from medfilip.testing.nih14_layout import NIH14_BOXES, NIH14_ROWS, TEST_PATIENTS, write_nih14

SPLIT = SplitParams(train=0.5, val=0.3, test=0.2, seed=7)


def params(root: Path, split: SplitParams = SPLIT) -> DataParams:
    return DataParams(source="nih14", root=str(root), metadata="Data_Entry_2017_v2020.csv", split=split)


@pytest.mark.parametrize("revision,flat", [("2020", False), ("2017", True)])
def test_images_studies_patients_and_views(tmp_path, revision, flat):
    root = write_nih14(tmp_path, revision=revision, flat=flat)
    ds = load(root, params(root))
    assert ds.studies.num_rows == ds.images.num_rows == len(NIH14_ROWS)
    images = {r["image_id"]: r for r in ds.images.to_pylist()}
    for name, _labels, _patient, view in NIH14_ROWS:
        image = images[name[:-4]]
        assert image["study_id"] == name[:-4] and image["view"] == view
        assert Path(image["path"]).is_file() and Path(image["path"]).name == name
        assert ("/images_00" in image["path"]) != flat
    assert {r["study_id"]: r["patient_id"] for r in ds.studies.to_pylist()} == {
        n[:-4]: p for n, _l, p, _v in NIH14_ROWS}
    assert set(ds.studies.column("report").to_pylist()) == {""}
    assert ds.notes["n_images_not_found"] == 0 and "warnings" not in ds.notes


def test_2020_revision_is_preferred_over_2017(tmp_path):
    root = write_nih14(tmp_path, revision="2017", bbox=False)
    write_nih14(tmp_path, revision="2020", rows=NIH14_ROWS[:3], bbox=False)
    ds = load(root, params(root))
    assert ds.notes["data_entry_file"] == "Data_Entry_2017_v2020.csv" and ds.studies.num_rows == 3


def test_test_list_is_test_and_the_rest_splits_train_val_by_patient(tmp_path):
    root = write_nih14(tmp_path)
    ds = load(root, params(root))
    split_of = defaultdict(set)
    for row in ds.studies.to_pylist():
        split_of[row["patient_id"]].add(row["split"])
    assert all(len(s) == 1 for s in split_of.values()), split_of  # no patient straddles splits
    train_share = SPLIT.train / (SPLIT.train + SPLIT.val)
    for patient, (split,) in split_of.items():
        if patient in TEST_PATIENTS:
            assert split == "test"
        else:  # the slow obvious twin of the renormalised hash split
            assert split == ("train" if patient_unit(patient, SPLIT.seed) < train_share else "val")
    assert {s for (s,) in split_of.values()} == {"train", "val", "test"}
    # ingest honours the source split and finds no patient in two splits.
    studies, _images, summary = canonicalize(ds, params(root))
    assert summary["split_from_source"] and summary["studies_per_split"]["test"] == 5


def test_without_list_files_there_is_no_source_split(tmp_path):
    root = write_nih14(tmp_path, lists=False)
    ds = load(root, params(root))
    assert "split" not in ds.studies.column_names
    studies, _images, summary = canonicalize(ds, params(root))
    assert not summary["split_from_source"] and studies.num_rows == len(NIH14_ROWS)


def test_finding_labels_become_reference_rows_in_our_vocabulary(tmp_path):
    root = write_nih14(tmp_path)
    ref = load(root, params(root)).reference
    rows = defaultdict(set)
    for r in ref.to_pylist():
        assert not r["negated"] and not r["uncertain"]
        rows[r["study_id"]].add(r["category"])
    assert rows["00000004_000"] == {"mass", "nodule", "pleural thickening"}
    assert rows["00000001_002"] == {"cardiomegaly", "pleural effusion"}
    assert rows["00000003_001"] == {"hiatal hernia", "infiltrate"}
    assert rows["00000005_000"] == {"atelectasis", "consolidation", "pulmonary edema"}
    assert rows["00000002_000"] == {"no finding"}
    assert ref.num_rows == sum(len(r[1].split("|")) for r in NIH14_ROWS)


def test_bbox_list_becomes_box_masks(tmp_path):
    root = write_nih14(tmp_path)
    masks = load(root, params(root)).masks.to_pylist()
    assert [(m["image_id"], m["source_label"], m["label"], m["kind"]) for m in masks] == [
        ("00000001_002", "Effusion", "pleural effusion", "box"),
        ("00000009_000", "Infiltrate", "infiltrate", "box"),
        ("00000010_000", "Atelectasis", "atelectasis", "box"),
    ]
    assert [(m["x"], m["y"], m["w"], m["h"]) for m in masks] == [b[2:] for b in NIH14_BOXES]
    assert masks[0]["rle"] is None
    assert load(root := write_nih14(tmp_path / "nobox", bbox=False), params(root)).masks is None


def test_ingest_writes_reference_and_masks(tmp_path):
    root = write_nih14(tmp_path / "nih")
    summary = ingest(params(root), tmp_path / "interim")
    assert summary["n_studies"] == len(NIH14_ROWS) and summary["n_missing_image_files"] == 0
    assert summary["n_mask_rows"] == len(NIH14_BOXES) and summary["n_boxes"] == len(NIH14_BOXES)
    assert pq.read_table(tmp_path / "interim" / "reference.parquet").num_rows == summary["n_reference_rows"] > 0
    assert pq.read_table(tmp_path / "interim" / "masks.parquet").num_rows == len(NIH14_BOXES)


def test_unknown_label_names_the_label_map(tmp_path):
    rows = NIH14_ROWS[:2] + [("00000003_000.png", "Cardiomegaly|Tuberculosis", "3", "PA")]
    root = write_nih14(tmp_path, rows=rows, bbox=False)
    with pytest.raises(DatasetError, match=r"nih14\.yaml.*'Tuberculosis'"):
        load(root, params(root))


def test_missing_data_entry_file_or_column_is_a_sentence(tmp_path):
    with pytest.raises(DatasetError, match="Data_Entry_2017_v2020.csv nor Data_Entry_2017.csv found"):
        load(tmp_path, params(tmp_path))
    root = write_nih14(tmp_path)
    csv_path = root / "Data_Entry_2017_v2020.csv"
    csv_path.write_text(csv_path.read_text().replace("Patient ID", "Patient", 1))
    with pytest.raises(DatasetError, match=r"Data_Entry_2017_v2020\.csv: column 'Patient ID' not found"):
        load(root, params(root))


def test_empty_patient_and_patient_in_both_lists_are_errors(tmp_path):
    root = write_nih14(tmp_path / "a", rows=NIH14_ROWS[:2] + [("00000002_000.png", "No Finding", "", "PA")])
    with pytest.raises(DatasetError, match=r"line 4 has an empty 'Patient ID'"):
        load(root, params(root))
    root = write_nih14(tmp_path / "b", bbox=False)
    with open(root / "test_list.txt", "a") as fh:
        fh.write("00000001_000.png\n")  # patient 1's other images stay in train_val_list.txt
    with pytest.raises(DatasetError, match=r"test_list\.txt: image '00000001_000.png' is also in train_val_list"):
        load(root, params(root))


def test_missing_images_are_listed_counted_and_left_to_the_pixels_stage(tmp_path):
    root = write_nih14(tmp_path)
    (root / "images_002" / "images" / NIH14_ROWS[-1][0]).unlink()
    ds = load(root, params(root))
    assert ds.images.num_rows == len(NIH14_ROWS) and ds.notes["n_images_not_found"] == 1
    assert "pixels.on_error" in ds.notes["warnings"][0]
