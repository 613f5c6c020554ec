"""Plot data and figures of the evaluate stage: ROC/PR curves and P@K as CSV for ``dvc plots``,
the image-text similarity heatmap and the Fig. 5 case study as PNG (PIL only)."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _write_csv(path: Path, header: Sequence[str], rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def roc_pr_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, ...]:
    """(fpr, tpr, recall, precision) at every distinct score threshold, highest first."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order].astype(np.int64)
    last_of_run = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(y)[last_of_run]
    fp = np.cumsum(1 - y)[last_of_run]
    n_pos, n_neg = max(int(y.sum()), 1), max(int((1 - y).sum()), 1)
    tpr, fpr = np.r_[0, tp / n_pos], np.r_[0, fp / n_neg]
    precision = np.r_[1.0, tp / np.maximum(tp + fp, 1)]
    return fpr, tpr, tpr, precision


def write_curves(out: Path, scores: np.ndarray, labels: np.ndarray, known: np.ndarray,
                 classes: Sequence[str]) -> None:
    """One ROC and one PR CSV per class (classes with both labels only)."""
    for c, name in enumerate(classes):
        keep = known[:, c]
        y = labels[keep, c]
        if y.all() or not y.any():
            continue
        fpr, tpr, recall, precision = roc_pr_points(scores[keep, c], y)
        _write_csv(out / "roc" / f"{_slug(name)}.csv", ["fpr", "tpr"], zip(fpr.round(5), tpr.round(5)))
        _write_csv(out / "pr" / f"{_slug(name)}.csv", ["recall", "precision"],
                   zip(recall.round(5), precision.round(5)))


def write_precision_curves(folder: Path, curves: dict[str, Sequence[float]]) -> None:
    """P@K for k = 1..K, one CSV per direction (``i2t.csv``, ``t2i.csv``)."""
    for name, values in curves.items():
        _write_csv(folder / f"{name}.csv", ["k", "precision"],
                   [[k + 1, round(float(v), 5)] for k, v in enumerate(values)])


_STOPS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def _colour(values: np.ndarray) -> np.ndarray:
    """A viridis-like colour ramp for values in [0, 1]."""
    x = np.clip(values, 0, 1) * (len(_STOPS) - 1)
    low = np.floor(x).astype(int).clip(0, len(_STOPS) - 2)
    frac = (x - low)[..., None]
    return (_STOPS[low] * (1 - frac) + _STOPS[low + 1] * frac).astype(np.uint8)


def similarity_heatmap(path: Path, sims: np.ndarray, cell: int = 12) -> None:
    """PNG of an (images x texts) similarity matrix, min-max scaled, ``cell`` pixels per entry."""
    if sims.size == 0:
        sims = np.zeros((1, 1))
    lo, hi = float(sims.min()), float(sims.max())
    scaled = (sims - lo) / (hi - lo) if hi > lo else np.zeros_like(sims)
    rgb = _colour(scaled).repeat(cell, axis=0).repeat(cell, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def case_study(path: Path, images: Sequence[np.ndarray], captions: Sequence[str],
               bars: Sequence[dict[str, float]], size: int = 160, note: str = "") -> None:
    """Fig. 5-style panel: each image beside its similarity to the three prompt kinds of its class."""
    width, row_h = size + 360, size + 8
    canvas = Image.new("RGB", (width, row_h * len(images) + 4 + (20 if note else 0)), "white")
    draw = ImageDraw.Draw(canvas)
    if note:
        draw.text((4, row_h * len(images) + 6), note, fill="black")
    for i, (img, caption, values) in enumerate(zip(images, captions, bars)):
        top = 4 + i * row_h
        canvas.paste(Image.fromarray(np.asarray(img)).convert("RGB").resize((size, size)), (4, top))
        draw.text((size + 12, top), caption[:48], fill="black")
        for j, (kind, value) in enumerate(values.items()):
            y = top + 22 + j * 28
            length = int(max(0.0, min(1.0, (value + 1) / 2)) * 220)
            draw.rectangle([size + 12, y, size + 12 + length, y + 16], fill=tuple(int(v) for v in _STOPS[1 + j]))
            draw.text((size + 240, y + 2), f"{kind}: {value:+.3f}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
