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
    assert {"synthesize", "ingest", "pixels", "extract"} <= ran_stages(first)
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
    extract = json.loads((root / "reports/extract.json").read_text())
    assert extract["n_reports"] == studies.num_rows == extract["n_ok"]
    extractions = pq.read_table(root / "data/interim/extractions.parquet")
    assert extractions.num_rows == studies.num_rows
    triplets = pq.read_table(root / "data/interim/triplets_raw.parquet")
    assert set(triplets.column("study_id").to_pylist()) <= set(studies.column("study_id").to_pylist())
    assert (root / "data/cache/llm.sqlite").exists()
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


@pytest.mark.slow
def test_changing_llm_reruns_extract_only_and_swapping_back_is_cached(project):
    root, _ = project
    params = (root / "params.yaml").read_text()
    (root / "params.yaml").write_text(params.replace("model: rules-v1", "model: rules-v1-alt"))
    proc = dvc(["repro"], root)
    assert ran_stages(proc) == {"extract"}, proc.stdout
    alt = json.loads((root / "reports/extract.json").read_text())
    assert alt["llm_calls"] > 0 and alt["cache_hits"] == 0  # a new model is a new cache key
    models = set(pq.read_table(root / "data/interim/triplets_raw.parquet").column("model").to_pylist())
    assert models == {"rules-v1-alt"}

    # Swapping back: DVC restores the first run's outputs from its run cache without running
    # the stage; forced to run, it pays for nothing because the LLM cache has every answer.
    (root / "params.yaml").write_text(params)
    proc = dvc(["repro"], root)
    assert ran_stages(proc) == set() and "Stage 'extract' is cached" in proc.stdout, proc.stdout
    models = set(pq.read_table(root / "data/interim/triplets_raw.parquet").column("model").to_pylist())
    assert models == {"rules-v1"}
    proc = dvc(["repro", "--force", "--single-item", "extract"], root)
    assert ran_stages(proc) == {"extract"}
    back = json.loads((root / "reports/extract.json").read_text())
    assert back["llm_calls"] == 0 and back["cache_hits"] == back["n_reports"] > 0
    assert ran_stages(dvc(["repro"], root)) == set()
