"""Why a soft-target run learns or does not: measurements of the label texts and of the targets
the trainer will see, written beside the run (``reports/diagnostics.json`` and a figure).

Everything here depends on the labels and the label vectors only (targets do not depend on the
model), so it is computed before training, by replaying the sampler's batches without images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from medfilip.loss import target_entropy
from medfilip.ssm import Calibration, build_targets, pair_weights
from medfilip.trainset import EpochBatchSampler, TrainingIndex

# A soft-target run whose uniform prediction scores within this of the targets' own entropy has
# nearly flat targets: its cross-entropy term can teach almost nothing.
FLAT_TARGETS_NATS = 0.1


def text_counts(index: TrainingIndex, split: str = "train") -> np.ndarray:
    """(T,) how many training images carry each label text."""
    _, text = index.labels_of(index.positions(split))
    return np.bincount(text, minlength=len(index.text_ids)).astype(np.int64)


@torch.no_grad()
def replay_targets(index: TrainingIndex, embeddings: torch.Tensor, *, kind: str, batch_size: int, seed: int,
                   calibration: Optional[Calibration], same_category_only: bool, n_batches: Optional[int] = None) -> dict:
    """The targets of the first epoch's batches, as the trainer builds them, summarised:
    ``ce_floor`` and ``ce_uniform`` (:func:`medfilip.loss.target_entropy`), the share of target
    mass on texts of a category the image does not have, and the total-variation distance of
    each image's target distribution from uniform (0: flat, near 1: one-hot)."""
    sampler = EpochBatchSampler(index.positions("train"), batch_size, seed)
    sampler.set_epoch(0)
    category_all = torch.as_tensor(index.text_category)
    sums = {"ce_floor": 0.0, "ce_uniform": 0.0, "other_category_mass": 0.0, "tv_from_uniform": 0.0}
    n = 0
    for k, batch in enumerate(sampler):
        if n_batches is not None and k >= n_batches:
            break
        owner, text = index.labels_of(np.asarray(batch))
        text_t = torch.as_tensor(text)
        unique, label_unique = torch.unique(text_t, sorted=True, return_inverse=True)
        vecs = embeddings.index_select(0, unique)
        category = category_all.index_select(0, unique)
        owner_t = torch.as_tensor(owner)
        targets = build_targets(kind, vecs, owner_t, label_unique, len(batch), unique_category=category,
                                same_category_only=same_category_only and kind == "ssm",
                                calibration=calibration if kind == "ssm" else None)
        same = build_targets("multihot", vecs, owner_t, label_unique, len(batch), unique_category=category)
        stats = target_entropy(targets)
        mass = targets.sum()
        rows = targets.sum(1) > 0
        q = targets[rows] / targets[rows].sum(1, keepdim=True)
        sums["ce_floor"] += float(stats["ce_floor"])
        sums["ce_uniform"] += float(stats["ce_uniform"])
        sums["other_category_mass"] += float((targets * (1 - same)).sum() / mass) if mass > 0 else 0.0
        sums["tv_from_uniform"] += float(0.5 * (q - 1.0 / targets.shape[1]).abs().sum(1).mean()) if rows.any() else 0.0
        n += 1
    out = {key: value / max(n, 1) for key, value in sums.items()}
    out["ce_headroom"] = out["ce_uniform"] - out["ce_floor"]
    out["n_batches"] = n
    return out


def text_lengths(tokenizer, texts: Sequence[str], max_length: int) -> dict:
    """Token counts of the label texts, and how many the text tower cuts at ``train.text_max_length``."""
    if not texts:
        return {"max_tokens": 0, "mean_tokens": 0.0, "text_max_length": max_length, "n_truncated": 0, "n_texts": 0}
    lengths = np.array([len(ids) for ids in tokenizer(list(texts), truncation=False)["input_ids"]])
    return {"max_tokens": int(lengths.max()), "mean_tokens": float(lengths.mean()), "text_max_length": max_length,
            "n_truncated": int((lengths > max_length).sum()), "n_texts": int(len(lengths))}


def flags(epochs: Sequence[dict], replay: dict, soft: bool) -> list[str]:
    """Sentences about what would make this run's result meaningless (empty: nothing found)."""
    out = []
    if soft and replay["ce_headroom"] < FLAT_TARGETS_NATS:
        out.append(f"flat targets: a uniform prediction scores only {replay['ce_headroom']:.3f} nat above the "
                   f"targets' own entropy (< {FLAT_TARGETS_NATS}); the cross-entropy cannot tell texts apart "
                   "(try ssm.calibration: rescale)")
    if soft and epochs:
        last = epochs[-1]
        if "ce_minus_floor" in last and last["ce_headroom"] < FLAT_TARGETS_NATS:
            out.append(f"the last epoch's CE is {last['ce_minus_floor']:.3f} nat above its floor, with only "
                       f"{last['ce_headroom']:.3f} nat between the floor and a uniform prediction")
    return out


def similarity_figure(path: Path, embeddings: torch.Tensor, text_category: np.ndarray, counts: np.ndarray,
                      floor: Optional[float], bins: int = 40) -> None:
    """Histograms (frequency-weighted) of label-text cosines, same category (top) vs other
    categories (bottom), with ``floor`` (the cosine whose target is 0, or 0.5 when sharpening) drawn."""
    vecs = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    cos = (vecs @ vecs.T).numpy().astype(np.float64)
    weight, other = pair_weights(text_category, counts)
    width, height, pad = 480, 150, 24
    image = Image.new("RGB", (width, 2 * height + 3 * pad), "white")
    draw = ImageDraw.Draw(image)
    edges = np.linspace(-0.2, 1.0, bins + 1)
    for panel, (label, mask, colour) in enumerate((("same category", ~other & (weight > 0), (31, 119, 180)),
                                                   ("other categories", other & (weight > 0), (214, 39, 40)))):
        top = pad + panel * (height + pad)
        hist, _ = np.histogram(cos[mask], bins=edges, weights=weight[mask])
        hist = hist / hist.max() if hist.max() > 0 else hist
        bar = (width - 2 * pad) / bins
        for b, h in enumerate(hist):
            x0 = pad + b * bar
            draw.rectangle([x0, top + height * (1 - h), x0 + bar - 1, top + height], fill=colour)
        draw.line([pad, top + height, width - pad, top + height], fill="black")
        draw.text((pad, top - 14), f"cosine of label texts, {label} (weighted by frequency)", fill="black")
        if floor is not None:
            x = pad + (floor - edges[0]) / (edges[-1] - edges[0]) * (width - 2 * pad)
            draw.line([x, top, x, top + height], fill="black", width=2)
            draw.text((x + 3, top), f"{floor:.2f}", fill="black")
        for tick in (0.0, 0.5, 1.0):
            x = pad + (tick - edges[0]) / (edges[-1] - edges[0]) * (width - 2 * pad)
            draw.text((x - 6, top + height + 2), f"{tick:.1f}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
