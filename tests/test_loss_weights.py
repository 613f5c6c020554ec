"""itm_loss's ``weights`` (uncertain labels under ``train.uncertain: ignore``) against a loop twin that skips them."""

from __future__ import annotations

import math

import pytest
import torch

from medfilip.loss import itm_loss
from medfilip.ssm import build_targets

SCALE = 1 / 0.07
MODES = ["paper", "released"]


def loop_weighted_loss(logits, targets, weights, mode, scale):
    """The loss with every weight-0 entry removed: means over the kept entries, softmaxes over them only."""
    x = [[float(v) for v in row] for row in logits]
    s = [[float(v) for v in row] for row in targets]
    w = [[float(v) for v in row] for row in weights]
    n_images, n_texts = len(x), len(x[0])
    kept = [(i, u) for i in range(n_images) for u in range(n_texts) if w[i][u] != 0]

    if mode == "released":
        mse = sum((x[i][u] - s[i][u]) ** 2 for i, u in kept) / max(len(kept), 1)
        bce = 0.0
        for i, u in kept:
            p = 1 / (1 + math.exp(-x[i][u]))
            bce -= s[i][u] * math.log(p) + (1 - s[i][u]) * math.log(1 - p)
        bce /= max(len(kept), 1)
        return mse + bce, {"mse": mse, "bce": bce}

    mse = sum((x[i][u] / scale - s[i][u]) ** 2 for i, u in kept) / max(len(kept), 1)

    def soft_ce(slices):
        """Each slice is the list of its kept (logit, target) pairs; slices without target mass are skipped."""
        losses = []
        for pairs in slices:
            mass = sum(t for _, t in pairs)
            if mass <= 0:
                continue
            log_z = math.log(sum(math.exp(v) for v, _ in pairs))
            losses.append(-sum(t / mass * (v - log_z) for v, t in pairs))
        return sum(losses) / len(losses) if losses else 0.0

    rows = [[(x[i][u], s[i][u]) for u in range(n_texts) if w[i][u] != 0] for i in range(n_images)]
    cols = [[(x[i][u], s[i][u]) for i in range(n_images) if w[i][u] != 0] for u in range(n_texts)]
    ce_i2t, ce_t2i = soft_ce(rows), soft_ce(cols)
    ce = (ce_i2t + ce_t2i) / 2
    return mse + ce, {"mse": mse, "ce": ce, "ce_i2t": ce_i2t, "ce_t2i": ce_t2i}


def weighted_batch(n_images, n_unique, seed, kind="ssm", p_masked=0.3):
    """Logits, targets from build_targets, and 0/1 weights that never mask an image's own labels.

    Every image owns at least one text and every text one image, so each row and column keeps
    target mass outside the masked entries (as in training: the masked texts are uncertain ones).
    """
    gen = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n_images, 8, generator=gen), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n_unique, 8, generator=gen), dim=-1)
    logits = SCALE * img @ txt.T
    owner = torch.cat([torch.arange(n_images), torch.randint(0, n_images, (n_unique,), generator=gen)])
    unique = torch.cat([torch.randint(0, n_unique, (n_images,), generator=gen), torch.arange(n_unique)])
    vecs = torch.randn(n_unique, 16, generator=gen) + 0.3
    category = torch.randint(0, 3, (n_unique,), generator=gen)
    targets = build_targets(kind, vecs, owner, unique, n_images, unique_category=category)
    owned = torch.zeros(n_images, n_unique, dtype=torch.bool)
    owned[owner, unique] = True
    weights = ((torch.rand(n_images, n_unique, generator=gen) >= p_masked) | owned).float()
    return logits, targets, weights


SHAPES = [(2, 2), (4, 6), (7, 5), (10, 12)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["ssm", "multihot", "identity"])
@pytest.mark.parametrize("n_images,n_unique", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_twin_that_skips_masked_entries(mode, kind, n_images, n_unique, seed):
    logits, targets, weights = weighted_batch(n_images, n_unique, seed, kind)
    loss, parts = itm_loss(logits, targets, mode=mode, logit_scale=torch.tensor(SCALE), weights=weights)
    twin_loss, twin_parts = loop_weighted_loss(logits, targets, weights, mode, SCALE)
    assert loss.item() == pytest.approx(twin_loss, rel=1e-5, abs=1e-6)
    for name, value in twin_parts.items():
        assert parts[name].item() == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_twin_cases_mask_something_and_keep_mass_in_every_row_and_column():
    masked = 0
    for n_images, n_unique in SHAPES:
        for seed in (0, 1, 2):
            _, targets, weights = weighted_batch(n_images, n_unique, seed)
            masked += int((weights == 0).sum())
            kept = targets * weights
            assert (kept.sum(1) > 0).all() and (kept.sum(0) > 0).all()
            assert ((weights == 0) & (targets > 0)).any() or n_images == 2
    assert masked > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_logits_change_nothing_and_get_no_gradient(mode, seed):
    logits, targets, weights = weighted_batch(7, 9, seed, p_masked=0.5)
    masked = weights == 0
    assert masked.any()
    noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed + 100)) * 20
    moved = torch.where(masked, logits + noise, logits)
    base, base_parts = itm_loss(logits, targets, mode=mode, logit_scale=SCALE, weights=weights)
    loss, parts = itm_loss(moved, targets, mode=mode, logit_scale=SCALE, weights=weights)
    torch.testing.assert_close(loss, base)
    for name in ("mse", "bce", "ce", "ce_i2t", "ce_t2i"):
        if name in parts:
            torch.testing.assert_close(parts[name], base_parts[name])

    leaf = logits.clone().requires_grad_()
    loss, _ = itm_loss(leaf, targets, mode=mode, logit_scale=SCALE, weights=weights)
    (grad,) = torch.autograd.grad(loss, leaf)
    assert torch.isfinite(grad).all()
    assert grad[masked].eq(0).all()
    assert grad[~masked].abs().sum() > 0


@pytest.mark.parametrize("mode", MODES)
def test_fully_masked_row_and_column_give_finite_loss_and_gradient(mode):
    logits, targets, weights = weighted_batch(5, 6, seed=3)
    weights[2, :] = 0  # an image whose every text is masked
    weights[:, 4] = 0  # a text masked for every image
    leaf = logits.clone().requires_grad_()
    loss, parts = itm_loss(leaf, targets, mode=mode, logit_scale=SCALE, weights=weights)
    (grad,) = torch.autograd.grad(loss, leaf)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert grad[weights == 0].eq(0).all()
    twin_loss, _ = loop_weighted_loss(logits, targets, weights, mode, SCALE)
    assert loss.item() == pytest.approx(twin_loss, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 1])
def test_no_weights_equals_all_ones(mode, seed):
    logits, targets, _ = weighted_batch(6, 8, seed)
    loss, parts = itm_loss(logits, targets, mode=mode, logit_scale=SCALE)
    ones, ones_parts = itm_loss(logits, targets, mode=mode, logit_scale=SCALE, weights=torch.ones_like(logits))
    torch.testing.assert_close(loss, ones, rtol=0, atol=0)
    assert parts.keys() == ones_parts.keys()
    for name in parts:
        torch.testing.assert_close(parts[name], ones_parts[name], rtol=0, atol=0)


def test_weights_of_the_wrong_shape_are_a_clear_error():
    logits, targets, weights = weighted_batch(4, 5, seed=0)
    with pytest.raises(ValueError, match="weights must be"):
        itm_loss(logits, targets, mode="paper", logit_scale=SCALE, weights=weights[:, :3])
