"""COVID-19 Radiography Database importer on tiny trees in the published layout (medfilip/testing/covid_layout.py)."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from medfilip.config import DataParams
from medfilip.data.importers import DatasetError
from medfilip.data.importers.covid import load
from medfilip.data.ingest import canonicalize, ingest
from medfilip.testing.covid_layout import write_covid

COUNTS = {"COVID": 3, "Lung_Opacity": 2, "Normal": 4, "Viral Pneumonia": 1}
CATEGORY = {"COVID": "covid-19", "Lung_Opacity": "lung opacity", "Normal": "no finding",
            "Viral Pneumonia": "pneumonia"}


def params(root: Path) -> DataParams:
    return DataParams(source="covid", root=str(root), metadata=".")


@pytest.mark.parametrize("flat", [False, True])
def test_one_study_and_patient_per_image_labelled_by_folder(tmp_path, flat):
    root = write_covid(tmp_path, per_class=COUNTS, flat=flat)
    ds = load(root, params(root))
    assert ds.images.num_rows == ds.studies.num_rows == sum(COUNTS.values())
    assert ds.notes["images_per_class"] == COUNTS
    assert ds.notes["lung_masks_per_class"] == ({k: 0 for k in COUNTS} if flat else COUNTS)
    studies = ds.studies.to_pylist()
    assert all(s["patient_id"] == s["study_id"] and s["report"] == "" for s in studies)
    assert "split" not in ds.studies.column_names  # no source split: ingest hash-splits
    paths = {r["image_id"]: Path(r["path"]) for r in ds.images.to_pylist()}
    assert paths["Viral_Pneumonia-1"] == root / "Viral Pneumonia" / ("" if flat else "images") / "Viral Pneumonia-1.png"
    assert all(p.is_file() and "masks" not in p.parts for p in paths.values())
    truth = {r["study_id"]: r["category"] for r in ds.reference.to_pylist()}
    assert len(truth) == ds.reference.num_rows == sum(COUNTS.values())
    for study, category in truth.items():
        folder = next(name for name in COUNTS if study.startswith(name.replace(" ", "_") + "-"))
        assert category == CATEGORY[folder]
    assert not any(r["negated"] for r in ds.reference.to_pylist())
    assert ds.notes["one_patient_per_image"] and "patient" in ds.notes["warnings"][0]


def test_data_root_may_be_the_unpacked_archive_above_the_dataset_folder(tmp_path):
    write_covid(tmp_path)
    assert load(tmp_path, params(tmp_path)).images.num_rows == 10


def test_ingest_hash_splits_and_keeps_covid_as_reference(tmp_path):
    root = write_covid(tmp_path / "raw", per_class={"COVID": 6, "Normal": 6})
    summary = ingest(params(root), tmp_path / "interim")
    assert summary["n_studies"] == summary["n_patients"] == summary["n_images"] == 12
    assert not summary["split_from_source"] and summary["n_missing_image_files"] == 0
    reference = pq.read_table(tmp_path / "interim" / "reference.parquet")
    assert reference.column("category").to_pylist().count("covid-19") == 6


def test_unknown_class_folder_names_the_label_map(tmp_path):
    root = write_covid(tmp_path)
    (root / "Tuberculosis" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"covid\.yaml.*'Tuberculosis'"):
        load(root, params(root))


def test_missing_or_empty_dataset_is_a_sentence(tmp_path):
    with pytest.raises(DatasetError, match="folder not found; point data.root at COVID-19_Radiography_Dataset"):
        load(tmp_path / "nowhere", params(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="no class folders"):
        load(tmp_path, params(tmp_path))
    (tmp_path / "COVID" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match="hold no .png/.jpg images"):
        load(tmp_path, params(tmp_path))


def test_two_files_with_one_id_are_an_error_naming_both(tmp_path):
    root = write_covid(tmp_path, per_class={"Normal": 1}, flat=True)
    (root / "Normal" / "Normal 1.png").write_bytes((root / "Normal" / "Normal-1.png").read_bytes())
    (root / "Normal" / "Normal-1.png").rename(root / "Normal" / "Normal_1.png")
    with pytest.raises(DatasetError, match=r"Normal_1\.png: its id 'Normal_1' is also the id of .*Normal 1\.png"):
        load(root, params(root))


def test_canonicalize_accepts_the_import(tmp_path):
    root = write_covid(tmp_path)
    studies, images, summary = canonicalize(load(root, params(root)), params(root))
    assert studies.num_rows == images.num_rows == summary["n_patients"] == 10
