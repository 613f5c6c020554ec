"""Zero-shot evaluation (paper section 4.2.1): multi-label, single-label, fine-grained, unseen class.

An image's score for a class is the cosine of its embedding and the class prompt's
embedding, computed in eval mode one image at a time in effect (BatchNorm uses running
statistics), so no score depends on which images share a batch.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from medfilip.evaluate.metrics import (binary_at_threshold, bootstrap_ci, bootstrap_mean_ci, f1_max,
                                       retrieval_precision_at_k, roc_auc)
from medfilip.evaluate.truth import Truth

SEVERITIES = ("mild", "moderate", "severe")


@torch.no_grad()
def image_embeddings(model, store_array, pixel_rows: np.ndarray, batch_size: int = 128,
                     device: torch.device | str = "cpu") -> np.ndarray:
    """(N, D) unit image embeddings of the store's rows ``pixel_rows`` (model in eval mode)."""
    model.eval()
    out = []
    for start in range(0, len(pixel_rows), batch_size):
        rows = np.asarray(pixel_rows[start:start + batch_size])
        pixels = torch.from_numpy(np.stack([np.asarray(store_array[r]) for r in rows])).to(device)
        out.append(model.encode_image(model.prepare_images(pixels)).float().cpu())
    dim = model.cfg.embed_dim
    return torch.cat(out).numpy() if out else np.zeros((0, dim), dtype=np.float32)


def text_embeddings(model, texts: Sequence[str]) -> np.ndarray:
    """(T, D) unit text embeddings."""
    model.eval()
    return model.embed_texts(list(texts), getattr(model, "tokenizer", None)).numpy()


def _masked_columns(scores: np.ndarray, labels: np.ndarray, known: np.ndarray):
    for c in range(scores.shape[1]):
        keep = known[:, c]
        yield c, scores[keep, c], labels[keep, c]


def multilabel_report(scores: np.ndarray, truth: Truth, rows: np.ndarray, val_scores: np.ndarray,
                      val_rows: np.ndarray, classes: Sequence[str], *, n_boot: int, seed: int, split: str) -> dict:
    """Per class: AUC with a 95 % bootstrap CI, F1-max and accuracy at it (threshold picked on the
    reported split: the paper's protocol), and the honest version (threshold picked on val)."""
    cols = [truth.column(c) for c in classes]
    labels, known = truth.labels[rows][:, cols], truth.known[rows][:, cols]
    val_labels, val_known = truth.labels[val_rows][:, cols], truth.known[val_rows][:, cols]
    per_class, aucs = {}, []
    for c, s, y in _masked_columns(scores, labels, known):
        auc = float(roc_auc(s, y))
        lo, hi = bootstrap_ci(roc_auc, s[:, None], y[:, None], n_boot=n_boot, seed=seed)
        f1, threshold, acc = f1_max(s, y)
        vkeep = val_known[:, c]
        _, val_threshold, _ = f1_max(val_scores[vkeep, c], val_labels[vkeep, c]) if vkeep.any() else (0, np.nan, 0)
        honest = binary_at_threshold(s[:, None], y[:, None], np.array([val_threshold]))
        per_class[classes[c]] = {
            "auc": auc, "auc_ci": [float(lo[0]), float(hi[0])], "f1_max": float(f1),
            "acc_at_f1_max": float(acc), "threshold_f1_max": float(threshold),
            "threshold_val": float(val_threshold), "f1_at_val_threshold": float(honest["f1"][0]),
            "acc_at_val_threshold": float(honest["acc"][0]), "n_pos": int(y.sum()), "n_neg": int((~y).sum()),
        }
        if not np.isnan(auc):
            aucs.append(classes[c])
    # The mean's CI resamples images once for all classes; the known-mask rides along as extra
    # columns so an ignored (uncertain) pair stays out of its class in every replicate.
    scored = [classes.index(c) for c in aucs]
    if scored:
        k = len(scored)
        packed = np.hstack([scores[:, scored], known[:, scored].astype(np.float64)])
        # Each AUC twice: the metric must return one value per (packed) column; the mean is unchanged.
        lo, hi = bootstrap_mean_ci(lambda s, y: np.tile(_masked_auc(s[:, :k], y[:, :k], s[:, k:] > 0.5), 2),
                                   packed, np.hstack([labels[:, scored], known[:, scored]]),
                                   n_boot=n_boot, seed=seed)
    else:
        lo, hi = np.nan, np.nan
    mean = lambda key: float(np.nanmean([per_class[c][key] for c in aucs])) if aucs else float("nan")  # noqa: E731
    return {
        "split": split, "n_images": int(len(rows)), "mean_auc": mean("auc"),
        "mean_auc_ci": [float(np.squeeze(lo)), float(np.squeeze(hi))],
        "mean_f1_max": mean("f1_max"), "mean_acc_at_f1_max": mean("acc_at_f1_max"),
        "mean_f1_at_val_threshold": mean("f1_at_val_threshold"),
        "threshold_protocols": {
            "f1_max": f"threshold maximising F1 on the {split} split itself (the paper's protocol, optimistic)",
            "val_threshold": "threshold maximising F1 on val, applied to the reported split (honest)",
        },
        "classes": per_class,
    }


def _masked_auc(scores: np.ndarray, labels: np.ndarray, known: np.ndarray) -> np.ndarray:
    """roc_auc per column over its known rows only."""
    if known.all():
        return roc_auc(scores, labels)
    return np.array([roc_auc(scores[known[:, c], c], labels[known[:, c], c]) for c in range(scores.shape[1])])


def single_label_report(scores: np.ndarray, truth: Truth, rows: np.ndarray, classes: Sequence[str]) -> dict:
    """The most similar candidate among ``classes``, on images with exactly one of them present."""
    cols = [truth.column(c) for c in classes]
    labels = truth.labels[rows][:, cols]
    one = labels.sum(axis=1) == 1
    if not one.any():
        return {"n_images": 0, "accuracy": None, "macro_f1": None}
    true = labels[one].argmax(axis=1)
    pred = scores[one].argmax(axis=1)
    f1s = []
    for c in range(len(classes)):
        tp = int(((pred == c) & (true == c)).sum())
        fp, fn = int(((pred == c) & (true != c)).sum()), int(((pred != c) & (true == c)).sum())
        if tp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"n_images": int(one.sum()), "accuracy": float((pred == true).mean()),
            "macro_f1": float(np.mean(f1s)) if f1s else None, "n_classes": len(classes),
            "majority_class_accuracy": float(np.max(np.bincount(true, minlength=len(classes))) / len(true))}


def fine_grained_report(image_emb: np.ndarray, truth: Truth, rows: np.ndarray, classes: Sequence[str],
                        prompt_emb: Mapping[tuple[str, str], np.ndarray], *, n_boot: int = 0,
                        seed: int = 0) -> dict:
    """Severity + category (like MIMIC-FG): for each present finding with a severity, is the most
    similar of its category's severity prompts ("mild/moderate/severe <category>") the true one?
    Also the joint task: among every (severity, category) prompt, is the best one a true finding?"""
    keys = list(prompt_emb)
    matrix = np.stack([prompt_emb[k] for k in keys]) if keys else np.zeros((0, image_emb.shape[1]))
    sims = image_emb @ matrix.T if keys else np.zeros((len(image_emb), 0))
    index = {k: i for i, k in enumerate(keys)}
    per_class: dict[str, list[bool]] = {}
    per_image: list[list[bool]] = []  # hits of each scored image (the bootstrap resamples images)
    true_severities: list[str] = []
    joint_hits, joint_n = 0, 0
    for local, r in enumerate(rows):
        image_hits: list[bool] = []
        findings = {(sev, c) for (rr, c), sev in truth.severity.items() if rr == r and c in classes}
        for sev, c in findings:
            options = [(s, c) for s in SEVERITIES if (s, c) in index]
            if len(options) < 2:
                continue
            best = max(options, key=lambda k: sims[local, index[k]])
            per_class.setdefault(c, []).append(best[0] == sev)
            image_hits.append(best[0] == sev)
            true_severities.append(sev)
        if image_hits:
            per_image.append(image_hits)
        if findings and keys:
            joint_n += 1
            joint_hits += keys[int(np.argmax(sims[local]))] in findings
    per = {c: {"severity_accuracy": float(np.mean(v)), "n": len(v)} for c, v in sorted(per_class.items())}
    all_hits = [h for v in per_class.values() for h in v]
    majority, majority_share = None, None
    if true_severities:
        values, counts = np.unique(np.array(true_severities), return_counts=True)
        majority, majority_share = str(values[np.argmax(counts)]), float(counts.max() / counts.sum())
    return {
        "severity_accuracy": float(np.mean(all_hits)) if all_hits else None,
        "severity_accuracy_ci": _image_bootstrap_ci(per_image, n_boot, seed),
        "severity_chance": 1 / len(SEVERITIES),
        "severity_majority": majority, "severity_majority_baseline": majority_share,
        "n_findings": len(all_hits),
        "joint_accuracy": joint_hits / joint_n if joint_n else None, "joint_n_images": joint_n,
        "joint_n_candidates": len(keys), "classes": per,
    }


def _image_bootstrap_ci(per_image: Sequence[Sequence[bool]], n_boot: int, seed: int) -> list[float] | None:
    """95 % interval of the pooled accuracy, resampling images (their findings move together)."""
    if not per_image or n_boot <= 0:
        return None
    hits = np.array([sum(h) for h in per_image], dtype=np.float64)
    counts = np.array([len(h) for h in per_image], dtype=np.float64)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(per_image), size=(n_boot, len(per_image)))
    values = hits[pick].sum(1) / counts[pick].sum(1)
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def unseen_report(scores_by_prompt: Mapping[str, np.ndarray], truth: Truth, rows: np.ndarray,
                  unseen: Sequence[str]) -> dict:
    """AUC of each unseen class with its name alone vs its explanation as the prompt."""
    out = {}
    for j, name in enumerate(unseen):
        if name not in truth.classes:
            continue
        col = truth.column(name)
        y, keep = truth.labels[rows, col], truth.known[rows, col]
        entry = {"n_pos": int(y[keep].sum()), "n_neg": int((~y[keep]).sum())}
        for kind, scores in scores_by_prompt.items():
            entry[f"auc_{kind}"] = float(roc_auc(scores[keep, j], y[keep]))
        if "auc_name" in entry and "auc_explanation" in entry:
            entry["explanation_wins"] = bool(entry["auc_explanation"] > entry["auc_name"])
        out[name] = entry
    return out


def retrieval_report(image_emb: np.ndarray, image_labels: np.ndarray, text_emb: np.ndarray,
                     text_labels: np.ndarray, ks: Sequence[int] = (1, 3, 10)) -> dict:
    """Image->text and text->image P@K; a hit is a text whose class is among the image's labels."""
    relevant = (image_labels.astype(np.int64) @ text_labels.T.astype(np.int64)) > 0
    sims = image_emb @ text_emb.T
    # A random ranking's expected P@K: the share of relevant candidates, averaged over queries.
    chance = {"i2t": float(relevant.mean(axis=1).mean()) if relevant.size else float("nan"),
              "t2i": float(relevant.mean(axis=0).mean()) if relevant.size else float("nan")}
    return {"i2t": retrieval_precision_at_k(sims, relevant, ks),
            "t2i": retrieval_precision_at_k(sims.T, relevant.T, ks), "chance": chance,
            "n_images": int(len(image_emb)), "n_texts": int(len(text_emb)),
            "hit": "a text whose class is one of the image's labels (all of them, not only the first)"}
