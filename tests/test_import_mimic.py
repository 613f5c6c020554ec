"""The mimic-cxr importer on tiny MIMIC-CXR-JPG trees in PhysioNet's layout (synthetic ids and text)."""

import csv
import gzip
import io
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from medfilip.config import DataParams, SplitParams
from medfilip.data.importers import DatasetError
from medfilip.data.importers.mimic_cxr import load
from medfilip.data.ingest import ingest
from medfilip.testing.mimic_layout import (
    MimicImage, MimicStudy, remove_tree_reports, tiny_mimic_studies, write_mimic_cxr,
)

METADATA = "mimic-cxr-2.0.0-metadata.csv.gz"


def params(root: Path, **split) -> DataParams:
    return DataParams(source="mimic-cxr", root=str(root), metadata=METADATA, split=SplitParams(**split))


def rewrite_gz(path: Path, edit) -> None:
    """Apply ``edit(header, rows) -> (header, rows)`` to a .csv.gz in place."""
    with gzip.open(path, "rt", newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = edit(rows[0], rows[1:])
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *body])
    with gzip.open(path, "wt", newline="") as fh:
        fh.write(buf.getvalue())


@pytest.fixture
def tree(tmp_path):
    return write_mimic_cxr(tmp_path / "mimic-cxr-jpg")


def test_frontal_studies_with_reports_official_split(tree):
    ds = load(tree, params(tree))
    studies = {r["study_id"]: r for r in ds.studies.to_pylist()}
    # dropped: 57375967 (lateral only), 50771384 (no report)
    assert set(studies) == {"50414267", "53189527", "50771383", "51234567", "52000001"}
    assert {s: r["split"] for s, r in studies.items()} == {
        "50414267": "train", "53189527": "train", "50771383": "val", "51234567": "test", "52000001": "train"}
    assert studies["53189527"]["patient_id"] == "10000032"
    assert "Small right pleural effusion." in studies["53189527"]["report"]
    images = ds.images.to_pylist()
    assert sorted(im["view"] for im in images) == ["AP", "AP", "AP", "PA", "PA", "PA"]
    by_study = {}
    for im in images:
        by_study.setdefault(im["study_id"], []).append(im)
        assert Path(im["path"]).is_file()
    assert len(by_study["51234567"]) == 2  # both frontal views of one study
    [pa_image] = by_study["50414267"]
    assert pa_image["path"] == str(tree / "files/p10/p10000032/s50414267" / f"{pa_image['image_id']}.jpg")
    notes = ds.notes
    assert notes["images_dropped_by_view"] == {"LATERAL": 3, "LL": 1, "(blank)": 1}
    assert notes["n_studies_without_frontal_image"] == 1
    assert notes["n_studies_without_report"] == 1
    assert notes["n_reports_without_metadata"] == 1
    assert notes["n_metadata_studies"] == 7 and notes["n_metadata_images"] == 12
    assert notes["reports_from"] == {"tree": 5, "zip": 0}


def test_chexpert_labels_become_reference_rows(tree):
    ds = load(tree, params(tree))
    rows = {(r["study_id"], r["category"]): (r["uncertain"], r["negated"]) for r in ds.reference.to_pylist()}
    assert rows == {
        ("50414267", "no finding"): (False, False),
        ("53189527", "pleural effusion"): (False, False),
        ("53189527", "pulmonary edema"): (True, False),  # -1.0
        ("53189527", "pneumothorax"): (False, True),  # 0.0
        ("50771383", "consolidation"): (True, False),
        ("50771383", "support device"): (False, False),
        ("51234567", "atelectasis"): (False, False),
        ("51234567", "lung opacity"): (False, True),
    }  # blank cells give no row; labels of dropped studies are left out
    assert ds.notes["n_label_rows_without_study"] == 2
    assert ds.notes["n_studies_without_labels"] == 1


def test_ingest_writes_official_split_and_reference(tree, tmp_path):
    summary = ingest(params(tree), tmp_path / "interim")
    studies = pq.read_table(tmp_path / "interim" / "studies.parquet").to_pylist()
    assert [s["study_id"] for s in studies] == sorted(s["study_id"] for s in studies)
    assert summary["split_from_source"] is True
    assert summary["studies_per_split"] == {"train": 3, "val": 1, "test": 1}
    assert summary["n_images"] == 6 and summary["n_missing_image_files"] == 0
    assert summary["n_reference_rows"] == 8
    assert summary["n_studies_without_report"] == 1  # the importer's notes reach reports/ingest.json
    assert {s["study_id"]: s["impression"] for s in studies}["50414267"] == "No acute cardiopulmonary process."


def test_split_file_optional_without_source_split(tree, tmp_path):
    (tree / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    with pytest.raises(DatasetError, match="mimic-cxr-2.0.0-split.csv.gz: file not found"):
        load(tree, params(tree))
    ds = load(tree, params(tree, use_source_split=False))
    assert "split" not in ds.studies.column_names
    summary = ingest(params(tree, use_source_split=False), tmp_path / "interim")
    assert summary["split_from_source"] is False and summary["n_studies"] == 5


def test_reports_from_zip_give_the_same_tables(tmp_path):
    root = write_mimic_cxr(tmp_path / "m", reports="both")
    from_tree = load(root, params(root))
    assert remove_tree_reports(root) == 7  # six studies with a report + the orphan
    from_zip = load(root, params(root))
    assert from_zip.studies.equals(from_tree.studies)
    assert from_zip.images.equals(from_tree.images)
    assert from_zip.reference.equals(from_tree.reference)
    assert from_tree.notes["reports_from"] == {"tree": 5, "zip": 0}
    assert from_zip.notes["reports_from"] == {"tree": 0, "zip": 5}
    assert from_zip.notes["n_reports_without_metadata"] == 1
    assert {k: v for k, v in from_zip.notes.items() if k != "reports_from"} == \
        {k: v for k, v in from_tree.notes.items() if k != "reports_from"}


def test_zip_only_layout_as_written(tmp_path):
    root = write_mimic_cxr(tmp_path / "m", reports="zip")
    assert not list((root / "files").rglob("*.txt"))
    ds = load(root, params(root))
    assert ds.studies.num_rows == 5 and ds.notes["reports_from"]["zip"] == 5


def test_no_report_anywhere_is_a_sentence(tmp_path):
    root = write_mimic_cxr(tmp_path / "m", reports="none")
    with pytest.raises(DatasetError, match="mimic-cxr-reports.zip"):
        load(root, params(root))


def test_missing_metadata_csv_names_it(tree):
    (tree / METADATA).unlink()
    with pytest.raises(DatasetError, match=f"{METADATA}: file not found; set data.root"):
        load(tree, params(tree))


def test_missing_column_names_file_and_column(tree):
    rewrite_gz(tree / METADATA, lambda h, rows: (h[:4] + h[5:], [r[:4] + r[5:] for r in rows]))
    with pytest.raises(DatasetError, match=f"{METADATA}: column 'ViewPosition' not found"):
        load(tree, params(tree))
    write_mimic_cxr(tree)  # the metadata back; now the label file lacks a column
    rewrite_gz(tree / "mimic-cxr-2.0.0-chexpert.csv.gz", lambda h, rows: (h[:-1], [r[:-1] for r in rows]))
    with pytest.raises(DatasetError, match="chexpert.csv.gz: column 'Support Devices' not found"):
        load(tree, params(tree))


def test_bad_label_value_names_row_and_column(tree):
    def edit(header, rows):
        rows[1][header.index("Cardiomegaly")] = "2.0"
        return header, rows

    rewrite_gz(tree / "mimic-cxr-2.0.0-chexpert.csv.gz", edit)
    with pytest.raises(DatasetError, match=r"chexpert.csv.gz: row 3, column 'Cardiomegaly': '2.0' is not a label"):
        load(tree, params(tree))


def test_prefixed_ids_and_integer_label_cells_are_accepted(tree):
    before = load(tree, params(tree))

    def edit(header, rows):
        i, j = header.index("study_id"), header.index("subject_id")
        for r in rows:
            r[i], r[j] = "s" + r[i], "p" + r[j]
            r[2:] = [c[:-2] if c.endswith(".0") else c for c in r[2:]]  # "1.0" -> "1"
        return header, rows

    rewrite_gz(tree / "mimic-cxr-2.0.0-chexpert.csv.gz", edit)
    assert load(tree, params(tree)).reference.equals(before.reference)


def test_labels_file_missing_leaves_no_reference(tree):
    (tree / "mimic-cxr-2.0.0-chexpert.csv.gz").unlink()
    ds = load(tree, params(tree))
    assert ds.reference is None and "no reference labels" in ds.notes["reference_labels"]


def test_study_split_across_splits_is_an_error(tmp_path):
    study = MimicStudy(10000001, 50000001, (MimicImage("a-1", "PA"), MimicImage("a-2", "AP")))
    root = write_mimic_cxr(tmp_path / "m", [study], orphan_reports=())

    def edit(header, rows):
        rows[1][header.index("split")] = "test"
        return header, rows

    rewrite_gz(root / "mimic-cxr-2.0.0-split.csv.gz", edit)
    with pytest.raises(DatasetError, match="study '50000001' are in different splits"):
        load(root, params(root))


def test_unknown_split_value_and_non_numeric_id(tree):
    def bad_split(header, rows):
        rows[0][header.index("split")] = "holdout"
        return header, rows

    rewrite_gz(tree / "mimic-cxr-2.0.0-split.csv.gz", bad_split)
    with pytest.raises(DatasetError, match="row 2, column 'split': 'holdout'"):
        load(tree, params(tree))

    def bad_id(header, rows):
        rows[3][header.index("study_id")] = "abc"
        return header, rows

    rewrite_gz(tree / METADATA, bad_id)
    with pytest.raises(DatasetError, match=f"{METADATA}: row 5, column 'study_id': 'abc' is not a numeric id"):
        load(tree, params(tree))


def test_generated_tree_matches_spec(tmp_path):
    studies = tiny_mimic_studies()
    root = write_mimic_cxr(tmp_path / "m", studies, reports="both")
    for st in studies:
        for im in st.images:
            assert (root / st.image_path(im)).stat().st_size > 0
        assert (root / st.report_path).is_file() == (st.report is not None)
    with gzip.open(root / METADATA, "rt") as fh:
        assert fh.readline().strip() == ("dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,"
                                         "Rows,Columns,StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,"
                                         "ViewCodeSequence_CodeMeaning,PatientOrientationCodeSequence_CodeMeaning")


def test_import_benchmark_runs_small(tmp_path):
    from medfilip.benchmarks.import_rate import benchmark

    result = benchmark(n_studies=60, workdir=tmp_path)
    assert result["n_studies_generated"] == 60
    assert 0 < result["n_studies"] <= 60 and result["n_images"] >= result["n_studies"]
    assert result["peak_rss_mb"] > 0 and result["image_files"] == "zero-byte placeholders"
