"""Importer for VinDr-CXR (PhysioNet release): 18,000 PA radiographs as DICOM, labels by radiologists.

Layout under ``data.root``::

    annotations/image_labels_train.csv   image_id, rad_id, one 0/1 column per label (28 labels)
    annotations/image_labels_test.csv    the same columns, one consensus row per image (rad_id optional)
    annotations/annotations_train.csv    image_id, rad_id, class_name, x_min, y_min, x_max, y_max
    annotations/annotations_test.csv     the same, consensus boxes (rad_id optional)
    train/<image_id>.dicom               15,000 images, 3 radiologists each
    test/<image_id>.dicom                3,000 images, consensus of 5 radiologists

Labels per image (the reference evaluation scores against): a test image has the published
consensus row; a training image has a label when a strict majority of its radiologists marked
it (2 of its 3). A training image whose readers agree on nothing has no positive label, which
evaluation counts as "no finding". Label names map to our vocabulary through
``data/datasets/vindr.yaml``. Boxes (every radiologist's, in pixels of the original DICOM) are
kept in ``masks`` with the radiologist's id.

VinDr-CXR publishes no patient ids, so every image is its own study and patient; the split
keeps the published test set as ``test`` and divides the training images into train/val by
``data.split``'s train:val ratio (patient-hashed, as everywhere).
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from medfilip.config import DataParams
from medfilip.data.importers import DatasetError, ImportedDataset, mask_table, reference_table
from medfilip.data.labelmap import LabelMap, load_label_map
from medfilip.data.split import assign_split

ANNOTATIONS = "annotations"
NO_FINDING = "No finding"
ID_COLUMNS = ("image_id", "rad_id")
BOX_COLUMNS = ("x_min", "y_min", "x_max", "y_max")

def read_text_csv(path: Path) -> pa.Table:
    """A CSV with every column as text (ids like "000434..." stay strings) and header names stripped."""
    with open(path, newline="") as fh:
        header = next(csv.reader(fh), [])
    if not header:
        raise DatasetError(f"{path}: empty file (expected a CSV with a header row)")
    try:
        table = pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(column_types={name: pa.string() for name in header},
                                                 strings_can_be_null=True, auto_dict_encode=False),
        )
    except pa.ArrowInvalid as exc:
        raise DatasetError(f"{path}: cannot parse as CSV: {exc}") from exc
    return table.rename_columns([name.strip() for name in table.column_names])


def _require_columns(table: pa.Table, path: Path, names) -> None:
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise DatasetError(f"{path}: column '{missing[0]}' not found; columns are: {', '.join(table.column_names)} "
                           "(expected the VinDr-CXR PhysioNet layout)")


def _first_row(mask: np.ndarray) -> int:
    """The CSV line number (header = line 1) of the first True in ``mask``."""
    return int(np.flatnonzero(mask)[0]) + 2


def _label_votes(path: Path, lm: LabelMap) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Image-level labels: (image ids, label names, (images, labels) votes, readers per image)."""
    table = read_text_csv(path)
    _require_columns(table, path, ["image_id"])
    labels = [c for c in table.column_names if c not in ID_COLUMNS]
    if not labels:
        raise DatasetError(f"{path}: no label columns after image_id/rad_id")
    for label in labels:
        lm.get(label)  # an unknown label is an error naming the label map
    ids = table.column("image_id").to_numpy(zero_copy_only=False)
    empty = np.array([not (v or "").strip() for v in ids])
    if empty.any():
        raise DatasetError(f"{path}: line {_first_row(empty)} has an empty image_id")
    image_ids, inverse = np.unique(ids.astype(str), return_inverse=True)
    marks = np.zeros((table.num_rows, len(labels)), dtype=np.int64)
    for j, label in enumerate(labels):
        text = pc.utf8_trim_whitespace(table.column(label).fill_null("")).to_numpy(zero_copy_only=False)
        one, zero = np.isin(text, ("1", "1.0")), np.isin(text, ("0", "0.0"))
        bad = ~(one | zero)
        if bad.any():
            raise DatasetError(f"{path}: line {_first_row(bad)}, column '{label}': "
                               f"'{text[bad][0]}' is not 0 or 1")
        marks[:, j] = one
    votes = np.zeros((len(image_ids), len(labels)), dtype=np.int64)
    np.add.at(votes, inverse, marks)
    readers = np.bincount(inverse, minlength=len(image_ids))
    return [str(i) for i in image_ids], labels, votes, readers


def _boxes(path: Path, lm: LabelMap, known: set[str]) -> tuple[pa.Table, dict]:
    """Every box of ``path`` as masks rows; "No finding" rows carry no box and are skipped."""
    table = read_text_csv(path)
    _require_columns(table, path, ["image_id", "class_name", *BOX_COLUMNS])
    names = pc.utf8_trim_whitespace(table.column("class_name").fill_null("")).to_numpy(zero_copy_only=False)
    if (names == "").any():
        raise DatasetError(f"{path}: line {_first_row(names == '')} has an empty class_name")
    category = {name: lm.get(name) for name in set(names.tolist())}  # an unknown name is an error
    is_box = names != NO_FINDING
    coords = {}
    for col in BOX_COLUMNS:
        text = pc.utf8_trim_whitespace(table.column(col).fill_null(""))
        try:
            blank_is_null = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
            coords[col] = pc.cast(blank_is_null, pa.float64()).to_numpy(zero_copy_only=False)
        except pa.ArrowInvalid:
            bad = [i for i, v in enumerate(text.to_pylist()) if v and not _is_number(v)]
            raise DatasetError(f"{path}: line {bad[0] + 2}, column '{col}': '{text[bad[0]]}' is not a number") \
                from None
    x0, y0, x1, y1 = (coords[c] for c in BOX_COLUMNS)
    missing = is_box & (np.isnan(x0) | np.isnan(y0) | np.isnan(x1) | np.isnan(y1))
    if missing.any():
        raise DatasetError(f"{path}: line {_first_row(missing)} ('{names[missing][0]}') has no box; only "
                           f"'{NO_FINDING}' rows may leave x_min..y_max empty")
    inverted = is_box & ((x1 < x0) | (y1 < y0))
    if inverted.any():
        raise DatasetError(f"{path}: line {_first_row(inverted)} has x_max < x_min or y_max < y_min")
    image_ids = table.column("image_id").to_numpy(zero_copy_only=False).astype(str)
    listed = np.isin(image_ids, list(known))
    keep = is_box & listed
    rad = (table.column("rad_id").to_numpy(zero_copy_only=False) if "rad_id" in table.column_names
           else np.full(table.num_rows, None, dtype=object))
    rad = np.array([r.strip() if isinstance(r, str) and r.strip() else None for r in rad], dtype=object)
    kept_names = names[keep]
    boxes = mask_table({
        "image_id": pa.array(image_ids[keep], pa.string()),
        "label": pa.array([category[n].category if category.get(n) else None for n in kept_names], pa.string()),
        "source_label": pa.array(kept_names, pa.string()),
        "kind": pa.array(["box"] * int(keep.sum()), pa.string()),
        "x": pa.array(x0[keep]), "y": pa.array(y0[keep]),
        "w": pa.array(x1[keep] - x0[keep]), "h": pa.array(y1[keep] - y0[keep]),
        "rad_id": pa.array(rad[keep], pa.string()),
    })
    counts = {"n_boxes": int(keep.sum()),
              "n_boxes_of_unlisted_images": int((is_box & ~listed).sum())}
    return boxes, counts


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _train_val(params: DataParams) -> DataParams:
    """data.split restricted to train/val (fractions renormalised): the test split is VinDr's own."""
    s = params.split
    if s.train + s.val <= 0:
        raise DatasetError("data.split.train and data.split.val are both 0, so VinDr-CXR's training images have "
                           "no split to go to; give them a train:val ratio")
    total = s.train + s.val
    return replace(params, split=replace(s, train=s.train / total, val=s.val / total, test=0.0))


def load(root: Path, params: DataParams) -> ImportedDataset:
    """Images, per-image labels (majority of readers on train, consensus on test) and boxes of VinDr-CXR."""
    ann = root / ANNOTATIONS
    train_labels = ann / "image_labels_train.csv"
    if not train_labels.is_file():
        raise DatasetError(f"{train_labels}: not found; point data.root at the VinDr-CXR folder that holds "
                           "annotations/, train/ and test/ (PhysioNet vindr-cxr/1.0.0)")
    lm = load_label_map("vindr")
    parts = {"train": train_labels}
    if (ann / "image_labels_test.csv").is_file():
        parts["test"] = ann / "image_labels_test.csv"

    split_params = _train_val(params) if "test" in parts else None
    studies: dict[str, list] = {"study_id": [], "patient_id": [], "report": [], "split": []}
    images: dict[str, list] = {"image_id": [], "study_id": [], "path": [], "view": []}
    rows: list[dict] = []
    dropped: Counter = Counter()
    notes: dict = {}
    part_of: dict[str, str] = {}
    for part, path in parts.items():
        image_ids, labels, votes, readers = _label_votes(path, lm)
        positive = 2 * votes > readers[:, None]  # strict majority: 2 of 3 readers; a consensus row is 1 of 1
        for image_id in image_ids:
            if image_id in part_of:
                raise DatasetError(f"{path}: image '{image_id}' is also in image_labels_{part_of[image_id]}.csv; "
                                   "an image belongs to one part")
            part_of[image_id] = part
            studies["study_id"].append(image_id)
            studies["patient_id"].append(image_id)
            studies["report"].append("")
            studies["split"].append("test" if part == "test" else
                                    assign_split(image_id, split_params.split) if split_params else None)
            images["image_id"].append(image_id)
            images["study_id"].append(image_id)
            images["path"].append(str(root / part / f"{image_id}.dicom"))
            images["view"].append(None)
        seen: set = set()
        for i, j in zip(*np.nonzero(positive)):
            target = lm.get(labels[j])
            if target is None:
                dropped[labels[j]] += 1
                continue
            key = (image_ids[i], target.category, target.severity, target.location)
            if key not in seen:
                seen.add(key)
                rows.append({"study_id": key[0], "category": key[1], "severity": key[2], "location": key[3]})
        notes[f"readers_per_{part}_image"] = {str(k): int(v) for k, v in sorted(Counter(readers.tolist()).items())}
        notes[f"n_{part}_images_without_label"] = int((~positive.any(axis=1)).sum())  # no majority on anything

    boxes = []
    for part in parts:
        path = ann / f"annotations_{part}.csv"
        if path.is_file():
            table, counts = _boxes(path, lm, {i for i, p in part_of.items() if p == part})
            boxes.append(table)
            notes.update({f"{k}_{part}": v for k, v in counts.items()})
    masks = pa.concat_tables(boxes) if boxes else None

    notes.update({
        "patients": "VinDr-CXR has no patient ids: every image is its own study and patient",
        "train_labels": "a training image has a label when a strict majority of its radiologists (2 of 3) marked "
                        "it; test labels are the published consensus",
        "split": ("test: VinDr-CXR's test set; its training images split into train/val by data.split's "
                  "train:val ratio" if split_params else
                  "no annotations/image_labels_test.csv: every image is split by data.split"),
        "labels_without_counterpart": dict(sorted(dropped.items())),
    })
    study_table = pa.table({k: pa.array(v, pa.string()) for k, v in studies.items()
                            if k != "split" or split_params is not None})
    image_table = pa.table({k: pa.array(v, pa.string()) for k, v in images.items()})
    return ImportedDataset(studies=study_table, images=image_table, reference=reference_table(rows),
                           masks=masks, notes=notes)
