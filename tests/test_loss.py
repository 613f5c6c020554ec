"""The ITM loss (eq. 9 and the released code's variant) against plain-loop twins, and its properties."""

from __future__ import annotations

import math

import pytest
import torch

from medfilip.loss import itm_loss
from medfilip.ssm import build_targets

SCALE = 1 / 0.07  # CLIP's initial logit scale, exp'd


def loop_paper_loss(logits, targets, scale):
    """Eq. 9 as read in itm_loss's docstring, one element at a time in float64 Python."""
    x = [[float(v) for v in row] for row in logits]
    s = [[float(v) for v in row] for row in targets]
    n_images, n_texts = len(x), len(x[0])

    mse = sum((x[i][u] / scale - s[i][u]) ** 2 for i in range(n_images) for u in range(n_texts))
    mse /= n_images * n_texts

    def soft_ce(rows, target_rows):
        """Mean over rows with a target of -sum q log softmax, q the row's targets over their sum."""
        losses = []
        for row, target in zip(rows, target_rows):
            mass = sum(target)
            if mass <= 0:
                continue
            top = max(row)
            log_z = top + math.log(sum(math.exp(v - top) for v in row))
            losses.append(-sum(t / mass * (v - log_z) for v, t in zip(row, target)))
        return sum(losses) / len(losses) if losses else 0.0

    columns = [[x[i][u] for i in range(n_images)] for u in range(n_texts)]
    target_columns = [[s[i][u] for i in range(n_images)] for u in range(n_texts)]
    ce_i2t, ce_t2i = soft_ce(x, s), soft_ce(columns, target_columns)
    ce = (ce_i2t + ce_t2i) / 2
    return mse + ce, {"mse": mse, "ce": ce, "ce_i2t": ce_i2t, "ce_t2i": ce_t2i}


def loop_released_loss(logits, targets):
    """The released code's MSE + BCE-with-logits (and its unused CE / B), one element at a time."""
    x = [[float(v) for v in row] for row in logits]
    s = [[float(v) for v in row] for row in targets]
    n_images, n_texts = len(x), len(x[0])
    pairs = [(x[i][u], s[i][u]) for i in range(n_images) for u in range(n_texts)]
    mse = sum((v - t) ** 2 for v, t in pairs) / len(pairs)
    sigmoid = [(1 / (1 + math.exp(-v)), t) for v, t in pairs]
    bce = -sum(t * math.log(p) + (1 - t) * math.log(1 - p) for p, t in sigmoid) / len(pairs)
    ce = 0.0
    for row, target in zip(x, s):
        log_z = math.log(sum(math.exp(v) for v in row))
        ce += -sum(t * (v - log_z) for v, t in zip(row, target))
    ce_unused = ce / n_images / n_images
    return mse + bce, {"mse": mse, "bce": bce, "ce_unused": ce_unused}


def random_batch(n_images, n_unique, n_labels, seed, dim=8, n_categories=3):
    """Logits from random unit features, and the label structure of a batch for build_targets."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n_images, dim, generator=gen), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(n_unique, dim, generator=gen), dim=-1)
    unique_vecs = torch.randn(n_unique, 16, generator=gen) + 0.5
    unique = torch.cat([torch.arange(n_unique), torch.randint(0, n_unique, (n_labels - n_unique,), generator=gen)])
    weights = torch.rand(n_images, generator=gen) ** 3 + 1e-3
    owner = torch.multinomial(weights, n_labels, replacement=True, generator=gen)
    category = torch.randint(0, n_categories, (n_unique,), generator=gen)
    return img, txt, (unique_vecs, owner, unique, category)


def targets_of(kind, n_images, labels):
    unique_vecs, owner, unique, category = labels
    same_category_only = kind == "ssm-same-category"
    return build_targets(
        "ssm" if same_category_only else kind,
        unique_vecs,
        owner,
        unique,
        n_images,
        unique_category=category,
        same_category_only=same_category_only,
    )


KINDS = ["ssm", "ssm-same-category", "multihot", "identity"]
SHAPES = [(1, 1, 1), (3, 4, 6), (6, 5, 14), (8, 10, 24)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["paper", "released"])
@pytest.mark.parametrize("n_images,n_unique,n_labels", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_loop_twin(mode, kind, n_images, n_unique, n_labels, seed):
    img, txt, labels = random_batch(n_images, n_unique, n_labels, seed)
    targets = targets_of(kind, n_images, labels)
    scale = torch.tensor(SCALE)
    logits = scale * img @ txt.T
    loss, parts = itm_loss(logits, targets, mode=mode, logit_scale=scale)
    if mode == "paper":
        twin_loss, twin_parts = loop_paper_loss(logits, targets, SCALE)
    else:
        twin_loss, twin_parts = loop_released_loss(logits, targets)
    assert loss.ndim == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(twin_loss, rel=1e-5, abs=1e-6)
    assert set(parts) == set(twin_parts)
    for name, value in twin_parts.items():
        assert not parts[name].requires_grad
        assert parts[name].item() == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_twin_cases_cover_empty_images_and_texts_without_mass():
    zero_row = zero_col = False
    for n_images, n_unique, n_labels in SHAPES:
        for seed in (0, 1):
            _, _, labels = random_batch(n_images, n_unique, n_labels, seed)
            targets = targets_of("identity", n_images, labels)
            zero_row |= bool((targets.sum(1) == 0).any())
            ssm = targets_of("ssm-same-category", n_images, labels)
            zero_col |= bool((ssm.sum(0) == 0).any()) or bool((ssm.sum(1) == 0).any())
    assert zero_row and zero_col


def test_released_equals_torch_modules_computed_independently():
    img, txt, labels = random_batch(6, 7, 15, seed=3)
    targets = targets_of("ssm", 6, labels)
    logits = SCALE * img @ txt.T
    loss, parts = itm_loss(logits, targets, mode="released", logit_scale=torch.tensor(SCALE))
    expected = torch.nn.MSELoss()(logits, targets) + torch.nn.BCEWithLogitsLoss()(logits, targets)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(parts["ce_unused"], torch.nn.CrossEntropyLoss()(logits, targets) / 6)


def test_paper_ce_is_clips_symmetric_loss_for_one_text_per_image():
    img, txt, _ = random_batch(5, 5, 5, seed=2)
    scale = torch.tensor(SCALE)
    logits = scale * img @ txt.T
    arange = torch.arange(5)
    targets = build_targets("identity", torch.randn(5, 4), arange, arange, 5)  # the identity matrix
    _, parts = itm_loss(logits, targets, mode="paper", logit_scale=scale)
    clip = (torch.nn.functional.cross_entropy(logits, arange) + torch.nn.functional.cross_entropy(logits.T, arange)) / 2
    torch.testing.assert_close(parts["ce"], clip)


def test_paper_mse_compares_the_unscaled_cosine():
    targets = torch.tensor([[1.0, 0.25], [0.0, 0.5]])
    for scale in (1.0, SCALE, 100.0):
        _, parts = itm_loss(scale * targets, targets, mode="paper", logit_scale=torch.tensor(scale))
        assert parts["mse"].item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("mode", ["paper", "released"])
def test_zero_rows_columns_and_all_zero_targets_give_no_nan(mode):
    img, txt, _ = random_batch(4, 3, 3, seed=0)
    logits = (SCALE * img @ txt.T).requires_grad_()
    targets = torch.tensor([[1.0, 0.3, 0.0], [0.0, 0.0, 0.0], [0.2, 1.0, 0.0], [0.0, 0.0, 0.0]])
    for t in (targets, torch.zeros_like(targets)):
        loss, parts = itm_loss(logits, t, mode=mode, logit_scale=torch.tensor(SCALE))
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss) and torch.all(torch.isfinite(grad))
        assert all(torch.isfinite(v) for v in parts.values())
    _, parts = itm_loss(logits, torch.zeros_like(targets), mode="paper", logit_scale=torch.tensor(SCALE))
    assert parts["ce"].item() == 0.0


def test_paper_ce_ignores_rows_and_columns_without_targets():
    logits = torch.tensor([[2.0, -1.0, 0.5], [9.0, 9.0, -9.0], [0.0, 1.0, 3.0]])
    targets = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # row 1, column 2 empty
    _, parts = itm_loss(logits, targets, mode="paper", logit_scale=torch.tensor(10.0))
    rows = [0, 2]
    i2t = -(targets[rows] / targets[rows].sum(1, keepdim=True) * logits[rows].log_softmax(1)).sum(1).mean()
    cols = [0, 1]
    t2i = -(targets[:, cols] / targets[:, cols].sum(0) * logits[:, cols].log_softmax(0)).sum(0).mean()
    torch.testing.assert_close(parts["ce_i2t"], i2t)
    torch.testing.assert_close(parts["ce_t2i"], t2i)


@pytest.mark.parametrize("mode", ["paper", "released"])
def test_gradient_flows_to_features_and_scale(mode):
    img, txt, labels = random_batch(6, 5, 12, seed=1)
    img.requires_grad_()
    txt.requires_grad_()
    log_scale = torch.tensor(math.log(SCALE), requires_grad=True)
    scale = log_scale.exp()
    logits = scale * img @ txt.T
    loss, _ = itm_loss(logits, targets_of("ssm", 6, labels), mode=mode, logit_scale=scale)
    loss.backward()
    for grad in (img.grad, txt.grad, log_scale.grad):
        assert grad is not None and torch.all(torch.isfinite(grad)) and grad.abs().sum() > 0


def test_paper_mse_sends_no_gradient_to_the_scale():
    img, txt, _ = random_batch(5, 4, 9, seed=4)
    log_scale = torch.tensor(math.log(SCALE), requires_grad=True)
    scale = log_scale.exp()
    # All-zero targets leave the CE empty (0), so the loss is the MSE alone.
    loss, parts = itm_loss(scale * img @ txt.T, torch.zeros(5, 4), mode="paper", logit_scale=scale)
    assert parts["ce"].item() == 0.0 and parts["mse"].item() > 0
    (grad,) = torch.autograd.grad(loss, log_scale)
    assert abs(grad.item()) < 1e-6


@pytest.mark.parametrize("mode", ["paper", "released"])
def test_bf16_logits_are_computed_in_float32(mode):
    img, txt, labels = random_batch(6, 5, 12, seed=5)
    targets = targets_of("ssm", 6, labels)
    scale = torch.tensor(SCALE)
    logits16 = (scale * img @ txt.T).bfloat16().requires_grad_()
    loss, parts = itm_loss(logits16, targets.bfloat16(), mode=mode, logit_scale=scale)
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in parts.values())
    reference, _ = itm_loss(logits16.detach().float(), targets.bfloat16().float(), mode=mode, logit_scale=scale)
    torch.testing.assert_close(loss.detach(), reference)
    loss.backward()
    assert logits16.grad.dtype == torch.bfloat16 and torch.all(torch.isfinite(logits16.grad.float()))


def test_clear_errors():
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="paper, released"):
        itm_loss(logits, logits, mode="clip", logit_scale=torch.tensor(SCALE))
    with pytest.raises(ValueError, match=r"\(B, U\)"):
        itm_loss(logits, torch.zeros(3, 2), mode="paper", logit_scale=torch.tensor(SCALE))
    with pytest.raises(ValueError, match="at least one image"):
        itm_loss(torch.zeros(0, 3), torch.zeros(0, 3), mode="paper", logit_scale=torch.tensor(SCALE))
    with pytest.raises(ValueError, match="scalar"):
        itm_loss(logits, logits, mode="paper", logit_scale=torch.ones(2))
