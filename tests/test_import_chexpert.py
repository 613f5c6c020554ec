"""The chexpert importer on tiny CheXpert evaluation sets in Stanford's layout (made-up patients and labels)."""

import csv
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from medfilip.config import DataParams, SplitParams
from medfilip.data.importers import DatasetError
from medfilip.data.importers.chexpert import load
from medfilip.data.ingest import ingest
from medfilip.testing.chexpert_layout import CheXpertImage, write_chexpert


def params(root: Path, **split) -> DataParams:
    return DataParams(source="chexpert", root=str(root), metadata="valid.csv", split=SplitParams(**split))


def rewrite(path: Path, edit) -> None:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = edit(rows[0], rows[1:])
    with open(path, "w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows([header, *body])


def test_valid_only_frontal_images_and_labels(tmp_path):
    root = write_chexpert(tmp_path)
    ds = load(root, params(root))
    assert "split" not in ds.studies.column_names  # one set: ingest splits by patient
    studies = ds.studies.to_pylist()
    assert [s["study_id"] for s in studies] == ["patient64541/study1", "patient64542/study1", "patient64544/study1"]
    assert {s["patient_id"] for s in studies} == {"patient64541", "patient64542", "patient64544"}
    assert all(s["report"] == "" for s in studies)
    images = ds.images.to_pylist()
    assert [im["image_id"] for im in images] == [
        "patient64541/study1/view1_frontal", "patient64542/study1/view1_frontal", "patient64544/study1/view1_frontal"]
    assert [im["view"] for im in images] == ["AP", "PA", "AP"]
    assert images[0]["path"] == str(root / "valid/patient64541/study1/view1_frontal.jpg")
    ref = {(r["study_id"], r["category"]): (r["uncertain"], r["negated"]) for r in ds.reference.to_pylist()}
    positives = {k: v for k, v in ref.items() if not v[1]}
    assert positives == {
        ("patient64541/study1", "cardiomegaly"): (False, False),
        ("patient64541/study1", "pulmonary edema"): (True, False),
        ("patient64541/study1", "support device"): (False, False),
        ("patient64542/study1", "no finding"): (False, False),
        ("patient64544/study1", "lung lesion"): (False, False),
        ("patient64544/study1", "pleural other"): (False, False),
    }
    assert ref[("patient64541/study1", "pleural effusion")] == (False, True)  # 0.0
    assert ref[("patient64544/study1", "enlarged cardiomediastinum")] == (False, True)
    assert ("patient64542/study1", "pneumonia") not in ref  # blank: no row
    assert ("patient64543/study1", "fracture") not in ref  # lateral-only study dropped
    # 14 labels per study, one blank cell
    assert len(ref) == 3 * 14 - 1
    assert ds.notes["n_lateral_images_dropped"] == 2
    assert ds.notes["n_studies_without_frontal_image"] == 1
    assert ds.notes["split_from_label_files"] is False


def test_valid_and_test_keep_their_split_through_ingest(tmp_path):
    root = write_chexpert(tmp_path, with_test=True)
    ds = load(root, params(root))
    split = dict(zip(ds.studies.column("study_id").to_pylist(), ds.studies.column("split").to_pylist()))
    assert split["patient64541/study1"] == "val" and split["patient64741/study1"] == "test"
    test_image = [im for im in ds.images.to_pylist() if im["study_id"] == "patient64742/study1"]
    assert [im["path"] for im in test_image] == [str(root / "test/patient64742/study1/view1_frontal.jpg")]
    assert ds.notes["n_lateral_images_dropped"] == 3  # the test file's lateral, told by its file name
    ref = {(r["study_id"], r["category"]): r["negated"] for r in ds.reference.to_pylist()}
    assert ref[("patient64741/study1", "pneumonia")] is False and ref[("patient64741/study1", "consolidation")] is True
    summary = ingest(params(root), tmp_path / "interim")
    assert summary["split_from_source"] is True
    assert summary["studies_per_split"] == {"train": 0, "val": 3, "test": 2}
    assert summary["n_missing_image_files"] == 0
    assert pq.read_table(tmp_path / "interim" / "reference.parquet").num_rows == 5 * 14 - 1


def test_valid_only_ingest_splits_by_patient(tmp_path):
    root = write_chexpert(tmp_path)
    summary = ingest(params(root, train=0.0, val=0.5, test=0.5), tmp_path / "interim")
    assert summary["split_from_source"] is False
    assert summary["studies_per_split"]["train"] == 0 and summary["n_studies"] == 3


def test_full_size_folder_and_paths_relative_to_the_dataset(tmp_path):
    root = write_chexpert(tmp_path, folder="CheXpert-v1.0")
    # Paths written relative to the dataset folder itself still resolve.
    rewrite(root / "valid.csv", lambda h, rows: (h, [[r[0].split("/", 1)[1], *r[1:]] for r in rows]))
    ds = load(root, params(root))
    assert all(Path(p).is_file() for p in ds.images.column("path").to_pylist())
    assert ds.studies.num_rows == 3


def test_root_above_the_dataset_folder_says_where_to_point(tmp_path):
    write_chexpert(tmp_path)
    with pytest.raises(DatasetError, match="set data.root to .*CheXpert-v1.0-small"):
        load(tmp_path, params(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no CheXpert label file"):
        load(tmp_path / "empty", params(tmp_path / "empty"))


def test_missing_column_names_file_and_column(tmp_path):
    root = write_chexpert(tmp_path)
    rewrite(root / "valid.csv", lambda h, rows: (h[:-1], [r[:-1] for r in rows]))
    with pytest.raises(DatasetError, match=r"valid.csv: column 'Support Devices' not found"):
        load(root, params(root))


def test_bad_label_and_bad_path_name_their_row(tmp_path):
    root = write_chexpert(tmp_path)

    def bad_label(header, rows):
        rows[2][header.index("Edema")] = "maybe"
        return header, rows

    rewrite(root / "valid.csv", bad_label)
    with pytest.raises(DatasetError, match=r"valid.csv: row 4, column 'Edema': 'maybe' is not a label value"):
        load(root, params(root))
    root = write_chexpert(tmp_path / "b")
    rewrite(root / "valid.csv", lambda h, rows: (h, [["somewhere/else.jpg", *rows[0][1:]], *rows[1:]]))
    with pytest.raises(DatasetError, match=r"row 2, column 'Path': 'somewhere/else.jpg'"):
        load(root, params(root))


def test_images_not_found_is_a_sentence(tmp_path):
    root = write_chexpert(tmp_path)
    shutil.rmtree(root / "valid")
    with pytest.raises(DatasetError, match="valid.csv: none of its 5 images was found"):
        load(root, params(root))


def test_disagreeing_images_of_a_study_keep_the_positive(tmp_path):
    valid = [CheXpertImage(64600, 1, 1, True, "PA", {"Edema": "0.0"}),
             CheXpertImage(64600, 1, 2, True, "AP", {"Edema": "1.0"})]
    root = write_chexpert(tmp_path, valid)
    ds = load(root, params(root))
    ref = {r["category"]: (r["uncertain"], r["negated"]) for r in ds.reference.to_pylist()}
    assert ref["pulmonary edema"] == (False, False)
    assert ds.notes["n_label_conflicts"] == 1
    assert ds.images.num_rows == 2 and ds.studies.num_rows == 1


def test_a_test_csv_without_labels_is_passed_over(tmp_path):
    root = write_chexpert(tmp_path)
    (root / "test.csv").write_text("Path\ntest/patient64741/study1/view1_frontal.jpg\n")
    ds = load(root, params(root))
    assert ds.notes["label_files"] == {"val": "valid.csv"}
    assert ds.notes["files_without_labels_ignored"] == ["test.csv"]
