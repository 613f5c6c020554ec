import csv
import dataclasses
import logging
import shutil
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from medfilip.config import DataParams, ManifestParams, SplitParams
from medfilip.data.importers import DatasetError
from medfilip.data.ingest import ingest
from medfilip.data.sections import findings_and_impression, split_sections
from medfilip.data.split import assign_split, assign_splits


def test_sections_parsed():
    report = (
        "EXAMINATION: CHEST PA\nINDICATION: cough\n\nFINDINGS: Lungs are clear.\n"
        "No effusion.\n\nIMPRESSION:  No acute process.\n"
    )
    findings, impression = findings_and_impression(report)
    assert findings == "Lungs are clear. No effusion."
    assert impression == "No acute process."
    assert split_sections(report)["INDICATION"] == "cough"


def test_sections_absent_give_none():
    assert findings_and_impression("Heart size normal. Lungs clear.") == (None, None)
    assert findings_and_impression("") == (None, None)
    assert findings_and_impression("IMPRESSION: Normal.") == (None, "Normal.")


def test_split_is_deterministic_grouped_and_near_fractions():
    params = SplitParams(train=0.7, val=0.1, test=0.2, seed=3)
    ids = [f"p{i}" for i in range(20000)]
    first = assign_splits(ids, params)
    assert first == assign_splits(ids, params)
    share = {s: first.count(s) / len(ids) for s in ("train", "val", "test")}
    assert share["train"] == pytest.approx(0.7, abs=0.02)
    assert share["test"] == pytest.approx(0.2, abs=0.02)
    # Adding patients never moves an existing patient.
    assert assign_split("p5", params) == first[5]
    assert assign_splits(ids[:100], SplitParams(seed=4)) != assign_splits(ids[:100], SplitParams(seed=3))


def make_manifest(tmp_path: Path, rows: list[dict], name="manifest.csv") -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    with open(tmp_path / name, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        (tmp_path / row["file"]).write_bytes(b"x")
    return tmp_path / name


def manifest_params(tmp_path, **kw) -> DataParams:
    fields = dict(path="manifest.csv", image_col="file", report_col="text", patient_col="subject")
    fields.update(kw)
    return DataParams(source="manifest", root=str(tmp_path), manifest=ManifestParams(**fields))


ROWS = [
    {"file": "img/a.png", "text": "FINDINGS: Small left effusion.\nIMPRESSION: Effusion.", "subject": "007", "study": "s1"},
    {"file": "img/b.png", "text": "FINDINGS: Small left effusion.\nIMPRESSION: Effusion.", "subject": "007", "study": "s1"},
    {"file": "img/c.png", "text": "No acute disease.", "subject": "008", "study": "s2"},
    {"file": "img/d.png", "text": "", "subject": "009", "study": "s3"},
]


def test_manifest_ingest_writes_contract_tables(tmp_path):
    make_manifest(tmp_path, ROWS)
    out = tmp_path / "interim"
    summary = ingest(manifest_params(tmp_path, study_col="study"), out)
    studies = pq.read_table(out / "studies.parquet")
    images = pq.read_table(out / "images.parquet")
    assert studies.column_names[:6] == ["study_id", "patient_id", "split", "report", "findings", "impression"]
    assert images.column_names == ["image_id", "study_id", "path", "view"]
    rows = {r["study_id"]: r for r in studies.to_pylist()}
    assert set(rows) == {"s1", "s2", "s3"}
    assert rows["s1"]["patient_id"] == "007"  # ids stay text: no leading zero lost
    assert rows["s1"]["findings"] == "Small left effusion."
    assert rows["s2"]["findings"] is None
    assert sorted(images.column("study_id").to_pylist()) == ["s1", "s1", "s2", "s3"]
    assert all(Path(p).exists() for p in images.column("path").to_pylist())
    assert summary["n_studies"] == 3 and summary["n_images"] == 4 and summary["n_patients"] == 3
    assert summary["n_empty_reports"] == 1
    assert summary["n_missing_image_files"] == 0


def test_manifest_each_row_its_own_study_without_study_col(tmp_path):
    make_manifest(tmp_path, ROWS)
    summary = ingest(manifest_params(tmp_path), tmp_path / "out")
    assert summary["n_studies"] == 4


def test_manifest_missing_column_named(tmp_path):
    make_manifest(tmp_path, ROWS)
    with pytest.raises(DatasetError, match=r"column 'patient' \(from data.manifest.patient_col\)"):
        ingest(manifest_params(tmp_path, patient_col="patient"), tmp_path / "out")


def test_manifest_missing_file_named(tmp_path):
    with pytest.raises(DatasetError, match="manifest.csv: manifest not found"):
        ingest(manifest_params(tmp_path), tmp_path / "out")


def test_manifest_conflicting_reports_named(tmp_path):
    rows = [dict(ROWS[0]), dict(ROWS[1], text="Different.")]
    make_manifest(tmp_path, rows)
    with pytest.raises(DatasetError, match="study 's1' has two different reports"):
        ingest(manifest_params(tmp_path, study_col="study"), tmp_path / "out")


def test_missing_images_are_counted_not_dropped(tmp_path):
    make_manifest(tmp_path, ROWS)
    (tmp_path / "img/c.png").unlink()
    summary = ingest(manifest_params(tmp_path, study_col="study"), tmp_path / "out")
    assert summary["n_missing_image_files"] == 1
    assert pq.read_table(tmp_path / "out/images.parquet").num_rows == 4


def test_source_split_kept_and_patient_leak_refused(tmp_path):
    rows = [dict(r, split=s) for r, s in zip(ROWS, ["train", "train", "test", "val"])]
    make_manifest(tmp_path, rows)
    ingest(manifest_params(tmp_path, study_col="study", split_col="split"), tmp_path / "out")
    splits = {r["study_id"]: r["split"] for r in pq.read_table(tmp_path / "out/studies.parquet").to_pylist()}
    assert splits == {"s1": "train", "s2": "test", "s3": "val"}

    rows[2]["subject"] = "007"  # patient 007 now in train and test
    make_manifest(tmp_path, rows)
    with pytest.raises(DatasetError, match="patient '007' has studies in both"):
        ingest(manifest_params(tmp_path, study_col="study", split_col="split"), tmp_path / "out")


def test_computed_split_groups_patients(tmp_path):
    rows = [
        {"file": f"img/{i}.png", "text": "Normal.", "subject": f"p{i // 3}", "study": f"s{i}"}
        for i in range(300)
    ]
    make_manifest(tmp_path, rows)
    ingest(manifest_params(tmp_path, study_col="study"), tmp_path / "out")
    studies = pq.read_table(tmp_path / "out/studies.parquet").to_pylist()
    per_patient: dict[str, set] = {}
    for s in studies:
        per_patient.setdefault(s["patient_id"], set()).add(s["split"])
    assert all(len(v) == 1 for v in per_patient.values())
    assert {s["split"] for s in studies} == {"train", "val", "test"}


def test_unknown_source_says_what_to_do():
    from medfilip.data.importers import get_importer

    with pytest.raises(DatasetError, match="data.source: manifest"):
        get_importer("padchest")


# --------------------------------------------------------------------------- ids independent of data.root (issue 9)


def _ids(out: Path) -> tuple[list, list]:
    studies = pq.read_table(out / "studies.parquet").select(["study_id", "patient_id", "split"]).to_pylist()
    images = pq.read_table(out / "images.parquet").select(["image_id", "study_id"]).to_pylist()
    return studies, images


def test_manifest_ids_and_splits_do_not_depend_on_where_the_data_sits(tmp_path, monkeypatch):
    rows = [{"file": f"img/p{i:03d}.png", "text": f"Report {i}."} for i in range(60)]
    (tmp_path / "a" / "data").mkdir(parents=True)
    make_manifest(tmp_path / "a" / "data", rows)
    shutil.copytree(tmp_path / "a" / "data", tmp_path / "b" / "moved")
    monkeypatch.chdir(tmp_path)
    fields = dict(path="manifest.csv", image_col="file", report_col="text")  # no id columns at all

    relative = DataParams(source="manifest", root="a/data", manifest=ManifestParams(**fields))
    absolute = DataParams(source="manifest", root=str(tmp_path / "b" / "moved"), manifest=ManifestParams(**fields))
    ingest(relative, tmp_path / "out_rel")
    ingest(absolute, tmp_path / "out_abs")

    studies, images = _ids(tmp_path / "out_rel")
    assert _ids(tmp_path / "out_abs") == (studies, images)
    assert {s["split"] for s in studies} == {"train", "val", "test"}  # a real split, kept as it was

    # The same manifest written with absolute image paths gets the same ids too.
    absolute_rows = [{**r, "file": str(tmp_path / "b" / "moved" / r["file"])} for r in rows]
    make_manifest(tmp_path / "b" / "moved", absolute_rows, name="absolute.csv")
    ingest(dataclasses.replace(absolute, manifest=ManifestParams(**{**fields, "path": "absolute.csv"})),
           tmp_path / "out_abs_paths")
    assert _ids(tmp_path / "out_abs_paths") == (studies, images)


def test_manifest_without_patient_col_warns_and_flags_the_report(tmp_path, caplog, capsys):
    make_manifest(tmp_path, ROWS)
    with caplog.at_level(logging.WARNING):
        summary = ingest(manifest_params(tmp_path, patient_col=None), tmp_path / "out")
    assert summary["patient_col_missing"] is True
    assert "its own patient" in summary["warnings"][0] and "patient_col" in summary["warnings"][0]
    assert "its own patient" in caplog.text and "its own patient" in capsys.readouterr().err
    assert summary["n_patients"] == summary["n_studies"] == 4

    with_patients = ingest(manifest_params(tmp_path), tmp_path / "out2")
    assert with_patients["patient_col_missing"] is False and "warnings" not in with_patients


def test_manifest_empty_patient_cells_are_an_error_naming_the_rows(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[1]["subject"] = ""
    rows[3]["subject"] = "  "
    make_manifest(tmp_path, rows)
    with pytest.raises(DatasetError, match=r"2 row\(s\) have an empty 'subject'.*row 3, 5"):
        ingest(manifest_params(tmp_path, study_col="study"), tmp_path / "out")


# --------------------------------------------------------------------------- fingerprint and reference (issue 9)


def test_ingest_fingerprints_every_image_by_size_and_mtime_without_reading_it(tmp_path):
    make_manifest(tmp_path, ROWS)
    (tmp_path / "img/c.png").unlink()
    out = tmp_path / "interim"
    ingest(manifest_params(tmp_path, study_col="study"), out)
    images = pq.read_table(out / "images.parquet")
    files = pq.read_table(out / "image_files.parquet")
    assert files.column_names == ["image_id", "path", "bytes", "mtime_ns"]
    assert files.column("image_id").to_pylist() == images.column("image_id").to_pylist()
    for row in files.to_pylist():
        path = Path(row["path"])
        if path.exists():
            st = path.stat()
            assert (row["bytes"], row["mtime_ns"]) == (st.st_size, st.st_mtime_ns)
        else:
            assert row["bytes"] is None and row["mtime_ns"] is None
    assert files.column("bytes").null_count == 1


def test_a_source_without_labels_writes_an_empty_reference(tmp_path):
    from medfilip.data.importers import REFERENCE_SCHEMA

    make_manifest(tmp_path, ROWS)
    summary = ingest(manifest_params(tmp_path, study_col="study"), tmp_path / "interim")
    reference = pq.read_table(tmp_path / "interim" / "reference.parquet")
    assert reference.num_rows == 0 and reference.schema.equals(REFERENCE_SCHEMA)
    assert summary["n_reference_rows"] == 0


def test_phantom_truth_becomes_the_reference(tmp_path):
    from medfilip.config import PhantomParams
    from medfilip.data.phantom import synthesize

    root = tmp_path / "phantom"
    synthesize(PhantomParams(n_patients=8, max_studies_per_patient=1, image_size=64, seed=3, workers=1),
               SplitParams(), root)
    ingest(DataParams(source="phantom", root=str(root)), tmp_path / "interim")
    truth = pq.read_table(root / "truth.parquet")
    reference = pq.read_table(tmp_path / "interim" / "reference.parquet")
    key = lambda t: sorted(zip(t.column("study_id").to_pylist(), t.column("category").to_pylist(),
                               t.column("severity").to_pylist(), t.column("location").to_pylist()))
    rendered = reference.filter(pc.not_equal(reference["category"], "no finding"))
    assert key(rendered) == key(truth) and rendered.num_rows > 0
    # Studies with nothing rendered are normal, explicitly.
    studies = set(pq.read_table(root / "studies.parquet").column("study_id").to_pylist())
    normal = set(reference.filter(pc.equal(reference["category"], "no finding")).column("study_id").to_pylist())
    assert normal == studies - set(truth.column("study_id").to_pylist()) and normal
    assert not any(reference.column("negated").to_pylist())
    assert reference.column("uncertain").to_pylist().count(True) == truth.column("uncertain").to_pylist().count(True)


def test_labels_of_an_unknown_study_are_named(tmp_path):
    import pyarrow as pa

    from medfilip.data.importers import ImportedDataset, reference_table
    from medfilip.data.ingest import canonical_reference

    ds = ImportedDataset(studies=pa.table({"study_id": ["s1"]}), images=pa.table({"image_id": []}),
                         reference=reference_table([{"study_id": "s9", "category": "effusion"}]))
    with pytest.raises(DatasetError, match="study 's9'"):
        canonical_reference(ds, {"s1"})
