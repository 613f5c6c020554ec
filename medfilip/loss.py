"""The image-text matching (ITM) loss of MedFILIP (paper eq. 9), and the released code's variant.

A batch has ``B`` images and ``U`` unique label texts. The model gives
``logits = logit_scale * img @ txt.T`` (B, U) from L2-normalised features, and
:func:`medfilip.ssm.build_targets` gives the targets ``S`` (B, U) in [0, 1] (the SSM of
eq. 4-5, or a baseline's multi-hot / identity matrix: the loss does not care which).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_MODES = ("paper", "released")


def itm_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    mode: str,
    logit_scale: torch.Tensor | float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""The ITM loss (a scalar) and its parts (detached 0-d tensors, for logging).

    Math is float32 whatever ``logits`` come in (bf16/fp16 under autocast). ``logit_scale``
    is the exp'd scale that multiplied the cosines; ``mode``:

    ``"paper"`` -- eq. 9, ``L_ITM = L_MSE + L_CE``, read as::

        c[i,u]  = logits[i,u] / logit_scale                         (the cosine, unscaled)
        L_MSE   = 1/(B U) * sum_{i,u} (c[i,u] - S[i,u])^2
        q[i,u]  = S[i,u] / sum_v S[i,v]       p[i,u]  = softmax over u of logits[i,:]
        q'[i,u] = S[i,u] / sum_j S[j,u]       p'[i,u] = softmax over i of logits[:,u]
        L_i2t   = -1/|I| * sum_{i in I} sum_u q[i,u]  log p[i,u],    I = {i : sum_u S[i,u] > 0}
        L_t2i   = -1/|T| * sum_{u in T} sum_i q'[i,u] log p'[i,u],   T = {u : sum_i S[i,u] > 0}
        L_CE    = (L_i2t + L_t2i) / 2                                (CLIP's symmetric form)

      The MSE compares the cosine, not the logit, with S: targets in [0, 1] are then
      reachable without fighting the temperature, and the MSE sends no gradient to
      ``logit_scale`` (logits / logit_scale does not depend on it); the temperature is learnt
      by the cross-entropy alone. A row or column of S that sums to 0 (an image without
      labels, a text no image is near) has no target distribution and is left out of its
      CE direction (both sets empty -> L_CE = 0), never NaN; it still counts in the MSE.
      Parts: ``mse``, ``ce``, ``ce_i2t``, ``ce_t2i``.

    ``"released"`` -- what the released code optimises, on the *scaled* logits::

        L = MSE(logits, S) + BCEWithLogits(logits, S)                (both means over B*U)

      It also computes ``CrossEntropy(logits, S) / B`` (soft, unnormalised targets; mean over
      rows, then / B again) but never adds it to the loss; that value is reported as part
      ``ce_unused`` and carries no gradient. Parts: ``mse``, ``bce``, ``ce_unused``.

    ``weights`` (B, U) of 0/1, optional: entries with weight 0 (an image's uncertain labels
    under ``train.uncertain: ignore``, CheXpert's U-Ignore) are left out of every term: the
    means run over the weighted entries, and the softmaxes never see them.
    """
    if mode not in LOSS_MODES:
        raise ValueError(f"loss mode must be one of {', '.join(LOSS_MODES)} (train.loss), got {mode!r}")
    if logits.ndim != 2 or targets.shape != logits.shape:
        raise ValueError(
            f"logits and targets must both be (B, U), got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if logits.numel() == 0:
        raise ValueError(f"itm_loss needs at least one image and one text, got logits of shape {tuple(logits.shape)}")
    logits = logits.float()
    targets = targets.detach().to(device=logits.device, dtype=torch.float32)
    if weights is None:
        weights = torch.ones_like(targets)
    elif weights.shape != logits.shape:
        raise ValueError(f"weights must be (B, U) like logits, got {tuple(weights.shape)}")
    weights = weights.detach().to(device=logits.device, dtype=torch.float32)
    n_weighted = weights.sum().clamp_min(1.0)

    if mode == "released":
        mse = ((logits - targets) ** 2 * weights).sum() / n_weighted
        bce = F.binary_cross_entropy_with_logits(logits, targets, weight=weights, reduction="sum") / n_weighted
        with torch.no_grad():
            ce_unused = F.cross_entropy(logits, targets) / logits.shape[0]
        parts = {"mse": mse.detach(), "bce": bce.detach(), "ce_unused": ce_unused}
        return mse + bce, parts

    scale = torch.as_tensor(logit_scale, device=logits.device).float()
    if scale.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar, got shape {tuple(scale.shape)}")
    mse = ((logits / scale.reshape(()) - targets) ** 2 * weights).sum() / n_weighted
    masked = logits.masked_fill(weights == 0, float("-inf"))
    kept_targets = targets * (weights != 0)
    ce_i2t = _soft_cross_entropy(masked, kept_targets, dim=1)
    ce_t2i = _soft_cross_entropy(masked, kept_targets, dim=0)
    ce = (ce_i2t + ce_t2i) / 2
    parts = {"mse": mse.detach(), "ce": ce.detach(), "ce_i2t": ce_i2t.detach(), "ce_t2i": ce_t2i.detach()}
    return mse + ce, parts


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean over the slices along ``dim`` whose targets sum > 0 of -sum q log softmax(logits), q = S / sum S."""
    mass = targets.sum(dim, keepdim=True)
    has_target = mass.squeeze(dim) > 0
    q = targets / mass.clamp_min(torch.finfo(torch.float32).tiny)  # a zero slice stays all zeros
    log_p = logits.log_softmax(dim)
    # q = 0 where a weight masked the logit to -inf: 0 * -inf must count as 0, not NaN.
    per_slice = -torch.where(q > 0, q * log_p, torch.zeros_like(log_p)).sum(dim)
    per_slice = torch.where(has_target, per_slice, torch.zeros_like(per_slice))
    return per_slice.sum() / has_target.sum().clamp_min(1)


@torch.no_grad()
def target_entropy(targets: torch.Tensor, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """How much the soft cross-entropy of eq. 9 can teach on one batch (detached 0-d tensors).

    ``ce_floor``: the CE of a model that predicts the targets exactly (their entropy, over the
    same rows and columns and in the same symmetric form as ``itm_loss``'s ``ce``);
    ``ce_uniform``: the CE of a model that predicts nothing (a uniform softmax). When the two
    are close (< 0.1 nat), the targets are nearly flat and the CE term cannot tell texts apart.
    """
    targets = targets.detach().float()
    weights = torch.ones_like(targets) if weights is None else weights.detach().float()
    kept = targets * (weights != 0)
    out = {}
    for name, dim in (("i2t", 1), ("t2i", 0)):
        mass = kept.sum(dim, keepdim=True)
        has = mass.squeeze(dim) > 0
        q = kept / mass.clamp_min(torch.finfo(torch.float32).tiny)
        entropy = -torch.where(q > 0, q * q.clamp_min(1e-30).log(), torch.zeros_like(q)).sum(dim)
        n_options = (weights != 0).sum(dim).float().clamp_min(1.0)
        n = has.sum().clamp_min(1)
        out[f"floor_{name}"] = torch.where(has, entropy, torch.zeros_like(entropy)).sum() / n
        out[f"uniform_{name}"] = torch.where(has, n_options.log(), torch.zeros_like(entropy)).sum() / n
    return {"ce_floor": (out["floor_i2t"] + out["floor_t2i"]) / 2,
            "ce_uniform": (out["uniform_i2t"] + out["uniform_t2i"]) / 2}
