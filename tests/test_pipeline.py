"""The whole DAG on a small phantom: `dvc repro`, then nothing left to do."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from medfilip.model import load as load_model
from medfilip.pixels import PixelStore
from pipeline_project import dvc, make_project, ran_stages

SMALL = {
    "phantom.n_patients": 24,
    "phantom.image_size": 96,
    "phantom.workers": 1,
    "pixels.image_size": 48,
    "pixels.workers": 1,
    "train.epochs": 1,
    "train.batch_size": 8,
    "train.image_size": 32,
    "train.workers": 0,
    "train.text_frozen": True,
    "evaluate.n_bootstrap": 50,
    "evaluate.split": "val",
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("proj"), SMALL)
    first = dvc(["repro"], root)
    return root, first


@pytest.mark.slow
def test_repro_runs_every_stage_and_writes_contracts(project):
    root, first = project
    assert {"synthesize", "ingest", "pixels", "extract", "normalize", "explain", "embed", "train",
            "evaluate", "score", "phantom-nih14", "evaluate-extra@phantom-nih14"} <= ran_stages(first)
    # The trained model, scored on an evaluation set imported through a real importer (nih14 layout).
    nih = json.loads((root / "reports/eval/phantom-nih14/zeroshot.json").read_text())
    assert nih["truth_source"] == "reference.parquet" and nih["n_images"] > 0 and "no finding" in nih["classes"]
    studies = pq.read_table(root / "data/interim/studies.parquet")
    images = pq.read_table(root / "data/interim/images.parquet")
    assert {"study_id", "patient_id", "split", "report", "findings", "impression"} <= set(studies.column_names)
    assert {"image_id", "study_id", "path", "view"} <= set(images.column_names)
    assert (root / "data/raw/phantom/truth.parquet").exists()
    pixels = PixelStore.open(root / "data/processed/pixels").array  # the only reader of the shards
    assert pixels.shape == (images.num_rows, 48, 48) and pixels[0].dtype == np.uint8
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
    triplets_norm = pq.read_table(root / "data/processed/triplets.parquet")
    assert triplets_norm.num_rows == triplets.num_rows  # nothing dropped silently
    assert {"category_norm", "severity_norm", "location_norm", "kept", "drop_reason"} <= set(triplets_norm.column_names)
    labels = pq.read_table(root / "data/processed/labels.parquet")
    texts = pq.read_table(root / "data/processed/texts.parquet")
    embeddings = pq.read_table(root / "data/processed/embeddings.parquet")
    assert set(labels.column("text_id").to_pylist()) == set(texts.column("text_id").to_pylist())
    assert {"study_id", "text_id", "category_norm", "negated", "uncertain"} <= set(labels.column_names)
    explain = json.loads((root / "reports/explain.json").read_text())
    assert explain["n_studies"] == studies.num_rows
    assert explain["n_studies_labelled"] + explain["n_studies_unlabelled"] == studies.num_rows
    assert explain["n_studies_unlabelled"] == sum(explain["unlabelled_by_reason"].values())
    # The phantom's normal studies (no truth row) get the normal label from their reports.
    truth_ids = set(pq.read_table(root / "data/raw/phantom/truth.parquet").column("study_id").to_pylist())
    normal = {s for s, c in zip(labels.column("study_id").to_pylist(), labels.column("category_norm").to_pylist())
              if c == "no finding"}
    phantom_normal = set(studies.column("study_id").to_pylist()) - truth_ids
    assert phantom_normal and len(normal & phantom_normal) >= 0.9 * len(phantom_normal)
    assert explain["n_studies_normal_label"] == len(normal)
    assert embeddings.column("text_id").to_pylist() == texts.column("text_id").to_pylist()
    assert embeddings.schema.field("embedding").type.list_size == 384
    model = load_model(root / "data/models/medfilip")
    assert model.embed_texts(["no finding"]).shape == (1, model.cfg.embed_dim)
    train = json.loads((root / "reports/train.json").read_text())
    assert train["finished"] and train["index"]["n_images"] > 0 and train["last_epoch"]["loss"] > 0
    assert json.loads((root / "reports/train/metrics.json").read_text())["train"]["loss"] > 0
    # Every headline number is recomputable from the per-image scores (sklearn as the referee).
    zeroshot = json.loads((root / "reports/eval/zeroshot.json").read_text())
    scores = pq.read_table(root / "reports/eval/zeroshot_scores.parquet").to_pylist()
    for name, entry in zeroshot["classes"].items():
        rows = [r for r in scores if r["class"] == name and r["prompt"] == "explanation" and r["label"] is not None]
        y = [r["label"] for r in rows]
        assert entry["n_pos"] == sum(y)
        if entry["auc"] is not None:
            assert entry["auc"] == pytest.approx(roc_auc_score(y, [r["score"] for r in rows]), abs=1e-6)
    for task in ("single_label", "fine_grained", "unseen", "retrieval", "probe"):
        assert json.loads((root / f"reports/eval/{task}.json").read_text())["split"] == "val"
    probe = json.loads((root / "reports/eval/probe.json").read_text())
    assert {"1%", "10%", "100%", "random_init"} <= set(probe)
    for severity in ("mild", "moderate", "severe"):
        assert (root / f"reports/figures/phantom_{severity}.png").exists()
    quality = json.loads((root / "reports/quality.json").read_text())
    assert {"all", "tuning", "held_out"} <= set(quality["openi"]["rules:rules-v1"])
    assert quality["phantom"]["n_reports"] == studies.num_rows


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
    assert ran_stages(proc) == {"pixels", "train", "evaluate", "evaluate-extra@phantom-nih14"}, proc.stdout


@pytest.mark.slow
def test_changing_explain_mode_reruns_explain_and_embed_only(project):
    root, _ = project
    text = (root / "params.yaml").read_text()
    (root / "params.yaml").write_text(text.replace("mode: triplet_explanation", "mode: triplet"))
    proc = dvc(["repro"], root)
    assert ran_stages(proc) == {"explain", "embed", "train", "evaluate", "evaluate-extra@phantom-nih14"}, proc.stdout
    embed = json.loads((root / "reports/embed.json").read_text())
    assert embed["n_embedded"] == embed["n_texts"] > 0  # new texts, new vectors
    (root / "params.yaml").write_text(text)
    assert ran_stages(dvc(["repro"], root)) == set()  # restored from DVC's run cache
    proc = dvc(["repro", "--force", "--single-item", "embed"], root)
    embed = json.loads((root / "reports/embed.json").read_text())
    assert embed["n_embedded"] == 0 and embed["n_cached"] == embed["n_texts"]  # vectors re-used by (model, text)


@pytest.mark.slow
def test_changing_llm_reruns_extract_only_and_swapping_back_is_cached(project):
    root, _ = project
    params = (root / "params.yaml").read_text()
    (root / "params.yaml").write_text(params.replace("model: rules-v1", "model: rules-v1-alt"))
    proc = dvc(["repro"], root)
    # extract and what depends on it, and the extraction score; nothing upstream (ingest, pixels, synthesize).
    assert {"extract", "score"} <= ran_stages(proc) <= {"extract", "normalize", "explain", "embed", "train",
                                                          "evaluate", "evaluate-extra@phantom-nih14", "score"}, proc.stdout
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
    # The forced run wrote identical findings and statuses: only extractions.parquet (timings,
    # cache hits) changed, and no stage reads it, so nothing downstream re-runs.
    assert ran_stages(dvc(["repro"], root)) == set()


@pytest.mark.slow
def test_extra_evaluation_dataset_runs_through_foreach(project):
    import yaml

    from medfilip.config import PhantomParams, SplitParams
    from medfilip.data.phantom import synthesize

    root, _ = project
    synthesize(PhantomParams(n_patients=40, image_size=96, seed=7, workers=1), SplitParams(),
               root / "data/raw/phantom_ext")
    original = (root / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["evaluate"]["datasets"] = {"ext": {"source": "phantom", "root": "data/raw/phantom_ext", "metadata": "."}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        proc = dvc(["repro"], root)
        assert ran_stages(proc) == {"evaluate-extra@ext"}, proc.stdout  # the main evaluate stays put
        zeroshot = json.loads((root / "reports/eval/ext/zeroshot.json").read_text())
        assert zeroshot["truth_source"] == "reference.parquet" and zeroshot["n_images"] > 0
        scores = pq.read_table(root / "reports/eval/ext/zeroshot_scores.parquet")
        assert set(scores.column("prompt").to_pylist()) == {"explanation", "name", "template", "training"}
        assert dvc(["status"], root).stdout.strip().endswith("up to date.")
    finally:
        (root / "params.yaml").write_text(original)
