"""The batch semantic similarity matrix (SSM), paper eq. 4-5: the soft target of the ITM loss.

Image ``i`` of a batch owns the labels ``L(i)`` (indices into the batch's label list of
``M`` labels). Its similarity to label ``j`` is the best match among its own labels::

    S[i, j] = max_{k in L(i)} cos(e_k, e_j),   clamped to [0, 1]

The label vectors ``e`` are precomputed by the ``embed`` stage (:mod:`medfilip.embed`),
so a batch costs one gather, one M x M matmul and one scatter-max.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch


def gather_label_vectors(embedding_table: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
    """Rows ``text_index`` (M,) of the (T, D) embedding table -> (M, D), on the table's device."""
    if embedding_table.ndim != 2:
        raise ValueError(f"embedding_table must be (T, D), got shape {tuple(embedding_table.shape)}")
    if text_index.ndim != 1:
        raise ValueError(f"text_index must be 1-D (M,), got shape {tuple(text_index.shape)}")
    if text_index.device != embedding_table.device:
        raise ValueError(
            f"text_index is on {text_index.device} but the embedding table on {embedding_table.device}: "
            "move the table to the training device once, and the batch's indices with the batch"
        )
    index = text_index.long()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= embedding_table.shape[0]):
        raise IndexError(
            f"text_index out of range for an embedding table of {embedding_table.shape[0]} rows "
            f"(min {int(index.min())}, max {int(index.max())}): labels and embeddings.parquet disagree; "
            "re-run the embed stage"
        )
    return embedding_table.index_select(0, index)


def build_similarity_matrix(
    label_vecs: torch.Tensor,
    label_owner: torch.Tensor,
    n_images: int,
    *,
    label_category: torch.Tensor | None = None,
    same_category_only: bool = False,
) -> torch.Tensor:
    """S (B, M) float32 of eq. 4-5: per image, the max cosine of its own labels to each batch label.

    ``label_owner[j]`` is the image (in ``[0, n_images)``) that owns label ``j``; an image
    without labels gets a zero row. ``same_category_only`` (the released code's variant)
    counts a pair only when both labels share ``label_category``.
    """
    if label_vecs.ndim != 2:
        raise ValueError(f"label_vecs must be (M, D), got shape {tuple(label_vecs.shape)}")
    n_labels = label_vecs.shape[0]
    if label_owner.shape != (n_labels,):
        raise ValueError(f"label_owner must be ({n_labels},) like label_vecs' rows, got {tuple(label_owner.shape)}")
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    device = label_vecs.device
    owner = label_owner.to(device=device, dtype=torch.long)
    if n_labels and (int(owner.min()) < 0 or int(owner.max()) >= n_images):
        raise IndexError(
            f"label_owner must lie in [0, {n_images}) (got min {int(owner.min())}, max {int(owner.max())})"
        )
    sim = torch.zeros((n_images, n_labels), dtype=torch.float32, device=device)
    if n_labels == 0 or n_images == 0:
        return sim

    # float32 whatever the input (fp16/bf16 vectors): a target must not carry rounding from AMP.
    vecs = torch.nn.functional.normalize(label_vecs.detach().float(), dim=-1)
    cos = vecs @ vecs.T  # (M, M) cosine between every pair of batch labels
    cos.fill_diagonal_(1.0)  # cos(e, e) = 1 exactly, not 1 - 1e-7
    if same_category_only:
        if label_category is None:
            raise ValueError(
                "same_category_only=True needs label_category (M,) (the category index of each label)"
            )
        if label_category.shape != (n_labels,):
            raise ValueError(
                f"label_category must be ({n_labels},) like label_vecs' rows, got {tuple(label_category.shape)}"
            )
        category = label_category.to(device)
        cos = cos.masked_fill(category[:, None] != category[None, :], 0.0)

    # Row k of cos goes to image owner[k]; amax over an image's own labels k (eq. 5).
    sim = sim.scatter_reduce(0, owner[:, None].expand(n_labels, n_labels), cos, reduce="amax", include_self=False)
    return sim.clamp_(0.0, 1.0)


def load_embedding_table(path: Path, text_ids: list[str] | None = None) -> tuple[torch.Tensor, dict[str, int]]:
    """embeddings.parquet -> (T, D) float32 tensor + ``text_id -> row``.

    ``text_ids``: keep only these rows, in this order (a missing id is an error naming it).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no embeddings here (run the embed stage: dvc repro embed)")
    table = pq.read_table(path, columns=["text_id", "embedding"])
    ids = [str(t) for t in table.column("text_id").to_pylist()]
    column = table.column("embedding").combine_chunks()
    if column.null_count:
        raise ValueError(f"{path}: {column.null_count} null embedding(s); re-run the embed stage")
    if pa.types.is_fixed_size_list(column.type):
        dim = column.type.list_size
        flat = column.flatten()
    elif pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        lengths = set(pc.list_value_length(column).to_pylist())
        if len(lengths) > 1:
            raise ValueError(f"{path}: embeddings of different lengths {sorted(lengths)[:5]}")
        dim = lengths.pop() if lengths else 0
        flat = column.flatten()
    else:
        raise ValueError(f"{path}: column 'embedding' must be a list of float32, got {column.type}")
    # A copy: Arrow's buffers are read-only, and torch tensors must be writable.
    matrix = np.array(flat.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(ids), dim)

    rows = {text_id: i for i, text_id in enumerate(ids)}
    if len(rows) != len(ids):
        raise ValueError(f"{path}: text_id is not unique; re-run the embed stage")
    if text_ids is not None:
        if len(set(text_ids)) != len(text_ids):
            raise ValueError("text_ids must not repeat an id (ask for each text once)")
        missing = [t for t in text_ids if t not in rows]
        if missing:
            raise KeyError(
                f"{path}: {len(missing)} text_id(s) have no embedding (e.g. {', '.join(missing[:5])}); "
                "re-run the embed stage after explain"
            )
        matrix = matrix[[rows[t] for t in text_ids]]
        rows = {text_id: i for i, text_id in enumerate(text_ids)}
    return torch.from_numpy(np.ascontiguousarray(matrix)), rows



TARGET_KINDS = ("ssm", "multihot", "identity")
CALIBRATIONS = ("raw", "rescale", "sharpen")


@dataclass(frozen=True)
class Calibration:
    """How label-text cosines become soft targets (``ssm.calibration``); ``value`` is its floor
    (rescale) or temperature (sharpen), resolved from the data when params leave it null."""

    kind: str = "raw"
    value: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {self.kind!r}")
        if self.kind == "rescale" and (self.value is None or not 0.0 <= self.value < 1.0):
            raise ValueError(f"the rescale floor must lie in [0, 1), got {self.value}")
        if self.kind == "sharpen" and (self.value is None or self.value <= 0.0):
            raise ValueError(f"the sharpening temperature must be > 0, got {self.value}")


def calibrate_similarity(cos: torch.Tensor, calibration: Calibration | None) -> torch.Tensor:
    """Cosines -> targets in [0, 1]. ``raw`` (or None): the cosines themselves (paper eq. 4);
    ``rescale``: ``clamp((cos - floor) / (1 - floor), 0, 1)``; ``sharpen``: ``exp((cos - 1) / T)``.

    A sentence model gives any two chest X-ray findings a cosine of 0.4-0.8, so raw cosines
    put most of a row's target mass on unrelated findings (README "Soft targets"). Rescaling
    removes what lies below the similarity of unrelated texts; sharpening also spreads the
    near-1 cosines of one category's severities and locations apart.
    """
    if calibration is None or calibration.kind == "raw":
        return cos
    if calibration.kind == "rescale":
        floor = calibration.value
        return ((cos - floor) / (1.0 - floor)).clamp(0.0, 1.0)
    return torch.exp((cos.clamp(max=1.0) - 1.0) / calibration.value)


def pair_weights(text_category: np.ndarray, text_count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weights (T, T) of every pair of distinct label texts by how often both occur, and a mask
    of the pairs whose categories differ (texts without a category count as their own)."""
    category = np.asarray(text_category)
    count = np.asarray(text_count, dtype=np.float64)
    weight = np.outer(count, count)
    np.fill_diagonal(weight, 0.0)
    other = (category[:, None] != category[None, :]) | (category[:, None] < 0)
    return weight, other


def weighted_pair_quantile(table: torch.Tensor, text_category: np.ndarray, text_count: np.ndarray,
                           quantile: float, *, same_category: bool) -> float | None:
    """The ``quantile`` of the cosines between distinct label texts of the same (or of different)
    categories, each pair weighted by how often both texts occur in training; None: no such pair."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"the quantile must lie in (0, 1), got {quantile}")
    vecs = torch.nn.functional.normalize(table.detach().float(), dim=-1)
    cos = (vecs @ vecs.T).cpu().numpy().astype(np.float64)
    weight, other = pair_weights(text_category, text_count)
    mask = (~other if same_category else other) & (weight > 0)
    values, w = cos[mask], weight[mask]
    if not len(values):
        return None
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(w[order]) / w.sum()
    return float(values[order][min(len(values) - 1, np.searchsorted(cumulative, quantile))])


def similarity_floor(table: torch.Tensor, text_category: np.ndarray, text_count: np.ndarray,
                     quantile: float) -> float:
    """``rescale``'s measured floor: the ``quantile`` of cross-category cosines (frequency-weighted)."""
    floor = weighted_pair_quantile(table, text_category, text_count, quantile, same_category=False)
    return 0.0 if floor is None else min(max(floor, 0.0), 0.99)  # one category only: keep the cosines


def sharpen_temperature(table: torch.Tensor, text_category: np.ndarray, text_count: np.ndarray,
                        quantile: float = 0.5) -> float:
    """``sharpen``'s measured temperature: the one that gives the same-category pair at the
    ``quantile`` of their cosines (frequency-weighted) the target 0.5, T = (1 - cos_q) / ln 2.

    At 0.5 the median pair gets 0.5; at 0.8 only the 20 % most alike do (on the demo those differ
    in one word: a severity or a side), so a label's other severities get less than 0.5."""
    cos_q = weighted_pair_quantile(table, text_category, text_count, quantile, same_category=True)
    if cos_q is None or cos_q >= 1.0:
        return 1.0
    return float((1.0 - cos_q) / np.log(2.0))


def similarity_summary(table: torch.Tensor, text_category: np.ndarray, text_count: np.ndarray,
                       calibration: Calibration | None) -> dict:
    """Frequency-weighted cosines between label texts of the same and of other categories,
    raw and after :func:`calibrate_similarity` (``reports/diagnostics.json``)."""
    vecs = torch.nn.functional.normalize(table.detach().float(), dim=-1)
    raw = (vecs @ vecs.T).cpu().numpy().astype(np.float64)
    calibrated = calibrate_similarity(torch.from_numpy(raw), calibration).numpy()
    weight, other = pair_weights(text_category, text_count)
    same = ~other & (weight > 0)
    out = {}
    for name, cos in (("raw", raw), ("calibrated", calibrated)):
        entry = {}
        for group, mask in (("same_category", same), ("other_category", other & (weight > 0))):
            v, w = cos[mask], weight[mask]
            if not len(v):
                entry[group] = None
                continue
            order = np.argsort(v, kind="stable")
            cum = np.cumsum(w[order]) / w.sum()
            entry[group] = {"mean": float(np.average(v, weights=w)),
                            "median": float(v[order][np.searchsorted(cum, 0.5)]), "n_pairs": int(mask.sum())}
        out[name] = entry
    return out


def build_targets(
    kind: str,
    unique_vecs: torch.Tensor,
    label_owner: torch.Tensor,
    label_unique: torch.Tensor,
    n_images: int,
    *,
    unique_category: torch.Tensor | None = None,
    same_category_only: bool = False,
    calibration: Calibration | None = None,
) -> torch.Tensor:
    """Targets (B, U) float32 of the ITM loss over a batch's ``U`` unique label texts.

    Label ``k`` (of ``L``) belongs to image ``label_owner[k]`` and reads text ``label_unique[k]``
    (a row of ``unique_vecs`` (U, D)). ``kind``:

    * ``ssm`` -- eq. 4-5 with equal columns merged: ``S[i, u] = max_{k in L(i)} cos(e_{unique(k)}, e_u)``
      clamped to [0, 1]; ``calibration`` maps each cosine as :func:`calibrate_similarity` does
      (``ssm.calibration``; ``None``: the paper's raw cosines); ``same_category_only``
      (the released code's variant) zeroes pairs whose ``unique_category`` differ.
    * ``multihot`` (MedCLIP-style) -- 1 where image ``i`` has a label of text ``u``'s category.
    * ``identity`` (CLIP / ConVIRT) -- 1 where image ``i`` owns text ``u``.

    An image without labels gets a zero row; the trainer leaves such images out of the batch.
    """
    if kind not in TARGET_KINDS:
        raise ValueError(f"target kind must be one of {', '.join(TARGET_KINDS)} (train.targets), got {kind!r}")
    if unique_vecs.ndim != 2:
        raise ValueError(f"unique_vecs must be (U, D), got shape {tuple(unique_vecs.shape)}")
    n_unique = unique_vecs.shape[0]
    n_labels = label_owner.shape[0] if label_owner.ndim == 1 else -1
    if label_owner.ndim != 1 or label_unique.shape != (n_labels,):
        raise ValueError(
            f"label_owner and label_unique must both be (L,), got {tuple(label_owner.shape)} and "
            f"{tuple(label_unique.shape)}"
        )
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    device = unique_vecs.device
    owner = label_owner.to(device=device, dtype=torch.long)
    unique = label_unique.to(device=device, dtype=torch.long)
    if n_labels and (int(owner.min()) < 0 or int(owner.max()) >= n_images):
        raise IndexError(
            f"label_owner must lie in [0, {n_images}) (got min {int(owner.min())}, max {int(owner.max())})"
        )
    if n_labels and (int(unique.min()) < 0 or int(unique.max()) >= n_unique):
        raise IndexError(
            f"label_unique must lie in [0, {n_unique}) like unique_vecs' rows "
            f"(got min {int(unique.min())}, max {int(unique.max())})"
        )
    if same_category_only and kind != "ssm":
        raise ValueError(f"same_category_only applies to kind='ssm' only, not {kind!r}")
    if calibration is not None and calibration.kind != "raw" and kind != "ssm":
        raise ValueError(f"a calibration applies to kind='ssm' only, not {kind!r}")
    needs_category = kind == "multihot" or same_category_only
    category = None
    if needs_category:
        if unique_category is None:
            why = "kind='multihot'" if kind == "multihot" else "same_category_only=True"
            raise ValueError(f"{why} needs unique_category (U,) (the category index of each unique text)")
        if unique_category.shape != (n_unique,):
            raise ValueError(
                f"unique_category must be ({n_unique},) like unique_vecs' rows, got {tuple(unique_category.shape)}"
            )
        category = unique_category.to(device)

    targets = torch.zeros((n_images, n_unique), dtype=torch.float32, device=device)
    if n_labels == 0 or n_images == 0 or n_unique == 0:
        return targets
    if kind == "identity":
        return targets.index_put_((owner, unique), torch.ones((), device=device))

    if kind == "multihot":
        pair = (category[:, None] == category[None, :]).float()  # (U, U): texts of one category
    else:
        # float32 whatever the input (fp16/bf16 vectors): a target must not carry rounding from AMP.
        vecs = torch.nn.functional.normalize(unique_vecs.detach().float(), dim=-1)
        pair = vecs @ vecs.T  # (U, U) cosine between every pair of unique texts
        pair.fill_diagonal_(1.0)  # a text is fully similar to itself, not 1 - 1e-7
        pair = calibrate_similarity(pair, calibration)
        if same_category_only:
            pair = pair.masked_fill(category[:, None] != category[None, :], 0.0)
    # Label k contributes the row of its text to its image; amax over an image's own labels (eq. 5).
    rows = pair.index_select(0, unique)  # (L, U)
    index = owner[:, None].expand(n_labels, n_unique)
    targets = targets.scatter_reduce(0, index, rows, reduce="amax", include_self=False)
    return targets.clamp_(0.0, 1.0)
