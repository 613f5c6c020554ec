"""The training index, built once per run: images -> pixel rows, split, labels as integer ids.

The training loop never joins strings. For every usable image the index holds its row in
the pixel store, its split, and its labels in CSR form (``offsets``; ``text`` = row in the
embedding table, ``category`` = category index), plus the texts ``train.uncertain: ignore``
masks out of its loss row. Images that cannot be trained on are excluded and counted by
reason, never turned into all-zero SSM rows (whose soft targets would be NaN).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from medfilip.ssm import load_embedding_table

SPLITS = ("train", "val", "test")


@dataclass
class TrainingIndex:
    """Integer arrays describing every usable image; rows of all per-image arrays align."""

    image_id: np.ndarray  # (N,) object: for reports and predictions only
    pixel_row: np.ndarray  # (N,) int64 row in the PixelStore
    split: np.ndarray  # (N,) object: train / val / test
    offsets: np.ndarray  # (N+1,) int64: labels of image n are text[offsets[n]:offsets[n+1]]
    text: np.ndarray  # (nnz,) int64 row of the embedding table
    category: np.ndarray  # (nnz,) int64 index into categories (-1: no category, report mode)
    ignore_offsets: np.ndarray  # (N+1,) int64 CSR of the texts masked out of each image's loss row
    ignore_text: np.ndarray  # (nnz_ignore,) int64
    unseen: np.ndarray  # (N,) bool: the image has a label of a held-out (unseen) class
    categories: list[str]
    text_ids: list[str]  # embedding-table order
    texts: list[str]  # the label text of each text_id
    text_category: np.ndarray  # (T,) int64 category index of each text (-1: none)
    text_negated: np.ndarray  # (T,) bool: a negated label's text ("no pneumothorax")
    excluded: dict = field(default_factory=dict)  # reason -> count

    def __len__(self) -> int:
        return len(self.pixel_row)

    def positions(self, split: str, *, include_unseen: bool = False) -> np.ndarray:
        """Indices (into this index) of the images of one split."""
        mask = self.split == split
        if not include_unseen:
            mask &= ~self.unseen
        return np.flatnonzero(mask)

    def labels_of(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(owner, text) of the labels of ``positions``: owner is the position's place in the list."""
        return _csr_gather(self.offsets, self.text, positions)

    def ignored_of(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(owner, text) of the masked (uncertain, ``ignore``) texts of ``positions``."""
        return _csr_gather(self.ignore_offsets, self.ignore_text, positions)

    def summary(self) -> dict:
        counts = {s: int((self.split == s).sum()) for s in SPLITS}
        return {
            "n_images": len(self),
            "n_images_by_split": counts,
            "n_labels": int(len(self.text)),
            "n_texts": len(self.text_ids),
            "n_categories": len(self.categories),
            "n_unseen_images": int(self.unseen.sum()),
            "excluded_by_reason": dict(self.excluded),
        }


def _csr_gather(offsets: np.ndarray, values: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    positions = np.asarray(positions, dtype=np.int64)
    starts, ends = offsets[positions], offsets[positions + 1]
    lengths = ends - starts
    owner = np.repeat(np.arange(len(positions), dtype=np.int64), lengths)
    # Index of every label: start of its image + its rank within the image.
    within = np.arange(lengths.sum(), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return owner, values[np.repeat(starts, lengths) + within]


def _csr(image_of: np.ndarray, values: np.ndarray, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((values, image_of))
    counts = np.bincount(image_of, minlength=n_images)
    offsets = np.zeros(n_images + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets, values[order].astype(np.int64)


def build_training_index(
    images: pa.Table,
    studies: pa.Table,
    labels: pa.Table,
    texts: pa.Table,
    embeddings_path: Path,
    pixel_ok: np.ndarray,
    *,
    uncertain: str = "positive",
    unseen_classes: Sequence[str] = (),
) -> TrainingIndex:
    """Join images, studies, labels and the embedding table once into integer arrays.

    ``pixel_ok`` is the PixelStore's per-row ok flag, aligned with ``images``. ``uncertain``
    is ``train.uncertain``: positive keeps uncertain labels, negative drops them, ignore drops
    them and records them to be masked out of the image's loss row.
    """
    if len(pixel_ok) != images.num_rows:
        raise ValueError(
            f"the pixel store has {len(pixel_ok)} rows but images.parquet {images.num_rows}: "
            "rebuild it (dvc repro pixels)"
        )
    _, text_rows = load_embedding_table(embeddings_path)
    text_ids = list(text_rows)
    text_ids_arr = pa.array(text_ids, pa.string())

    # --- per-label arrays
    if "uncertain" in labels.column_names:
        is_uncertain = pc.fill_null(labels.column("uncertain"), False).to_numpy(zero_copy_only=False).astype(bool)
    else:
        is_uncertain = np.zeros(labels.num_rows, dtype=bool)
    label_text = pc.index_in(labels.column("text_id"), value_set=text_ids_arr)
    if label_text.null_count:
        missing = pc.filter(labels.column("text_id"), pc.is_null(label_text)).to_pylist()[:3]
        raise KeyError(f"labels.parquet has text_id(s) with no embedding (e.g. {missing}): re-run the embed stage")
    label_text = label_text.to_numpy(zero_copy_only=False).astype(np.int64)

    text_table_ids = texts.column("text_id")
    text_pos = pc.index_in(text_ids_arr, value_set=text_table_ids)
    if text_pos.null_count:
        missing = pc.filter(text_ids_arr, pc.is_null(text_pos)).to_pylist()[:3]
        raise KeyError(f"embeddings.parquet has text_id(s) missing from texts.parquet (e.g. {missing}): "
                       "re-run the embed stage")
    text_pos = text_pos.to_numpy(zero_copy_only=False)
    all_texts = texts.column("text").to_pylist()
    all_cats = texts.column("category_norm").to_pylist()
    text_strings = [all_texts[int(p)] for p in text_pos]
    # A negated label ("no pneumothorax", explain.include_negated) is its own category, so
    # multi-hot targets and val positives never count it as the finding.
    negated_ids = set(pc.filter(labels.column("text_id"), pc.fill_null(labels.column("negated"), False)).to_pylist())
    text_negated = np.array([t in negated_ids for t in text_ids], dtype=bool)
    text_cat_names = [None if all_cats[int(p)] is None else ("no " if neg else "") + all_cats[int(p)]
                      for p, neg in zip(text_pos, text_negated)]
    categories = sorted({c for c in text_cat_names if c is not None})
    cat_index = {c: i for i, c in enumerate(categories)}
    text_category = np.array([cat_index.get(c, -1) if c is not None else -1 for c in text_cat_names], dtype=np.int64)
    unseen_set = {cat_index[c] for c in unseen_classes if c in cat_index}

    # --- per-image arrays
    study_split = dict(zip(studies.column("study_id").to_pylist(), studies.column("split").to_pylist()))
    image_study = images.column("study_id").to_pylist()
    n_all = images.num_rows
    split_all = np.array([study_split.get(s) for s in image_study], dtype=object)
    # A study's labels belong to each of its images: CSR of the images of each unique study.
    study_ids_unique = images.column("study_id").unique()
    image_study_pos = pc.index_in(images.column("study_id"), value_set=study_ids_unique).to_numpy(
        zero_copy_only=False).astype(np.int64)
    label_study_pos = pc.fill_null(pc.index_in(labels.column("study_id"), value_set=study_ids_unique), -1)
    label_study_pos = label_study_pos.to_numpy(zero_copy_only=False).astype(np.int64)

    # images of each study, CSR over unique studies
    img_order = np.argsort(image_study_pos, kind="stable")
    study_img_counts = np.bincount(image_study_pos, minlength=len(study_ids_unique))
    study_img_offsets = np.concatenate([[0], np.cumsum(study_img_counts)])

    keep_label = label_study_pos >= 0
    masked_label = np.zeros(labels.num_rows, dtype=bool)
    if uncertain in ("negative", "ignore"):
        keep_label &= ~is_uncertain
        if uncertain == "ignore":
            masked_label = is_uncertain & (label_study_pos >= 0)

    def expand(select: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(image row, text) for every (label of a study) x (image of that study)."""
        owner, image_rows = _csr_gather(study_img_offsets, img_order, label_study_pos[select])
        return image_rows, label_text[select][owner]

    img_of_label, text_of_label = expand(keep_label)
    img_of_masked, text_of_masked = expand(masked_label)
    n_labels_all = np.bincount(img_of_label, minlength=n_all)

    usable = np.ones(n_all, dtype=bool)
    excluded: dict[str, int] = {}

    def exclude(mask: np.ndarray, reason: str) -> None:
        nonlocal usable
        hit = usable & mask
        excluded[reason] = int(hit.sum())
        usable &= ~mask

    exclude(~np.asarray(pixel_ok, dtype=bool), "pixels_failed")
    exclude(np.array([s not in SPLITS for s in split_all], dtype=bool), "no_split")
    exclude(n_labels_all == 0, "no_label")

    keep_rows = np.flatnonzero(usable)
    new_pos = np.full(n_all, -1, dtype=np.int64)
    new_pos[keep_rows] = np.arange(len(keep_rows))
    sel = usable[img_of_label]
    offsets, text = _csr(new_pos[img_of_label[sel]], text_of_label[sel], len(keep_rows))
    msel = usable[img_of_masked]
    ignore_offsets, ignore_text = _csr(new_pos[img_of_masked[msel]], text_of_masked[msel], len(keep_rows))
    category = text_category[text]

    has_unseen = np.zeros(len(keep_rows), dtype=bool)
    if unseen_set:
        owner = np.repeat(np.arange(len(keep_rows)), np.diff(offsets))
        hit = np.isin(category, list(unseen_set))
        has_unseen[owner[hit]] = True
    split = split_all[keep_rows]
    # Held-out classes stay out of training: an unseen-class image in train/val is excluded there.
    excluded["unseen_class_in_train_or_val"] = int((has_unseen & (split != "test")).sum())

    return TrainingIndex(
        image_id=np.array(images.column("image_id").to_pylist(), dtype=object)[keep_rows],
        pixel_row=keep_rows.astype(np.int64),
        split=split,
        offsets=offsets,
        text=text,
        category=category,
        ignore_offsets=ignore_offsets,
        ignore_text=ignore_text,
        unseen=has_unseen,
        categories=categories,
        text_ids=text_ids,
        texts=text_strings,
        text_category=text_category,
        text_negated=text_negated,
        excluded=excluded,
    )


def load_training_index(processed: Path, interim: Path, pixel_ok: np.ndarray, *, uncertain: str,
                        unseen_classes: Sequence[str]) -> TrainingIndex:
    """Read the pipeline's Parquet files and build the index (see :func:`build_training_index`)."""
    def read(path: Path) -> pa.Table:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the stages before train (dvc repro train)")
        return pq.read_table(path)

    return build_training_index(
        read(interim / "images.parquet"), read(interim / "studies.parquet"), read(processed / "labels.parquet"),
        read(processed / "texts.parquet"), processed / "embeddings.parquet", pixel_ok,
        uncertain=uncertain, unseen_classes=unseen_classes,
    )


# --------------------------------------------------------------------------- tokens


class TokenTable:
    """Every label text tokenised once; a batch gathers its unique texts' rows and trims padding."""

    def __init__(self, tokenizer, texts: Sequence[str], max_length: int, chunk: int = 4096) -> None:
        ids = np.zeros((len(texts), max_length), dtype=np.int32)
        lengths = np.zeros(len(texts), dtype=np.int64)
        pad = tokenizer.pad_token_id or 0
        ids.fill(pad)
        for start in range(0, len(texts), chunk):
            tok = tokenizer(list(texts[start:start + chunk]), padding="max_length", truncation=True,
                            max_length=max_length, return_tensors="np")
            ids[start:start + chunk] = tok["input_ids"]
            lengths[start:start + chunk] = tok["attention_mask"].sum(axis=1)
        self.input_ids = torch.from_numpy(ids)
        self.lengths = torch.from_numpy(lengths)
        # Right padding is assumed when trimming; CLIP and BERT tokenizers pad right.
        self.padding_side = getattr(tokenizer, "padding_side", "right")

    def batch(self, text_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of the texts ``text_index`` (U,), padded to their longest."""
        idx = text_index.cpu().long()
        lengths = self.lengths[idx]
        width = int(lengths.max()) if len(idx) else 1
        ids = self.input_ids[idx, :width].long()
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return ids, mask


# --------------------------------------------------------------------------- loading


class PixelDataset(torch.utils.data.Dataset):
    """Item k: the uint8 pixels of image ``positions[k]`` and that position (labels come in collate)."""

    def __init__(self, store, index: TrainingIndex) -> None:
        self.store = store
        self.pixel_row = index.pixel_row

    def __len__(self) -> int:
        return len(self.pixel_row)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.array(self.store.array[self.pixel_row[position]])), position

    def __getitems__(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # One fancy-indexed read per batch from the memmap, sorted for locality.
        positions = np.asarray(positions, dtype=np.int64)
        rows = self.pixel_row[positions]
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows),) + self.store.array.shape[1:], dtype=np.uint8)
        out[order] = self.store.array[rows[order]]
        return torch.from_numpy(out), torch.from_numpy(positions)


def collate_batch(batch):
    """``__getitems__`` already returns the whole batch."""
    return batch


class EpochBatchSampler(torch.utils.data.Sampler):
    """Deterministic batches of ``positions``: a fresh permutation per (seed, epoch), same on every rank.

    Global batch k is ``perm[k*B*W:(k+1)*B*W]``; rank r takes its r-th slice of B, so the
    ranks together see exactly the batch one process with batch B*W would see. The last
    incomplete global batch is dropped (every rank must step the same number of times).
    """

    def __init__(self, positions: np.ndarray, batch_size: int, seed: int, *, rank: int = 0, world: int = 1,
                 shuffle: bool = True) -> None:
        self.positions = np.asarray(positions, dtype=np.int64)
        self.batch_size, self.seed, self.rank, self.world, self.shuffle = batch_size, seed, rank, world, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.positions) // (self.batch_size * self.world)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            perm = self.positions[rng.permutation(len(self.positions))]
        else:
            perm = self.positions
        global_batch = self.batch_size * self.world
        for k in range(len(self)):
            start = k * global_batch + self.rank * self.batch_size
            yield perm[start:start + self.batch_size].tolist()


def chunks(positions: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Consecutive slices of ``positions`` for evaluation (order kept, nothing dropped)."""
    for start in range(0, len(positions), size):
        yield positions[start:start + size]


def batch_labels(index: TrainingIndex, positions: np.ndarray, rank_offset: int = 0,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(label owner, label text, ignored owner, ignored text) of a batch; owners offset by ``rank_offset``."""
    owner, text = index.labels_of(positions)
    iowner, itext = index.ignored_of(positions)
    return owner + rank_offset, text, iowner + rank_offset, itext

