"""The whole DAG on a small phantom: `dvc repro`, then nothing left to do."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline_project import dvc, make_project, ran_stages

SMALL = {
    "phantom.n_patients": 24,
    "phantom.image_size": 96,
    "phantom.workers": 1,
    "pixels.image_size": 48,
    "pixels.workers": 1,
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("proj"), SMALL)
    first = dvc(["repro"], root)
    return root, first


@pytest.mark.slow
def test_repro_runs_every_stage_and_writes_contracts(project):
    root, first = project
    assert {"synthesize", "ingest", "pixels"} <= ran_stages(first)
    studies = pq.read_table(root / "data/interim/studies.parquet")
    images = pq.read_table(root / "data/interim/images.parquet")
    assert {"study_id", "patient_id", "split", "report", "findings", "impression"} <= set(studies.column_names)
    assert {"image_id", "study_id", "path", "view"} <= set(images.column_names)
    assert (root / "data/raw/phantom/truth.parquet").exists()
    pixels = np.load(root / "data/processed/pixels/pixels.npy", mmap_mode="r")
    assert pixels.shape == (images.num_rows, 48, 48) and pixels.dtype == np.uint8
    index = pq.read_table(root / "data/processed/pixels/index.parquet")
    assert index.column("image_id").to_pylist() == images.column("image_id").to_pylist()
    report = json.loads((root / "reports/ingest.json").read_text())
    assert report["n_studies"] == studies.num_rows
    for severity in ("mild", "moderate", "severe"):
        assert (root / f"reports/figures/phantom_{severity}.png").exists()


@pytest.mark.slow
def test_second_repro_does_nothing_and_status_clean(project):
    root, _ = project
    status = dvc(["status"], root)
    assert "up to date" in status.stdout, status.stdout
    again = dvc(["repro"], root)
    assert ran_stages(again) == set(), again.stdout


@pytest.mark.slow
def test_changing_pixels_params_reruns_only_pixels(project):
    root, _ = project
    text = (root / "params.yaml").read_text().replace("image_size: 48", "image_size: 40")
    (root / "params.yaml").write_text(text)
    proc = dvc(["repro"], root)
    assert ran_stages(proc) == {"pixels"}, proc.stdout
