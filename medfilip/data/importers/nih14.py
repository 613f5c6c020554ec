"""Importer for NIH ChestX-ray14 as distributed (an evaluation set: images and labels, no reports).

``data.root`` is the folder that holds::

    Data_Entry_2017_v2020.csv     (or the older Data_Entry_2017.csv)
    train_val_list.txt  test_list.txt      one image file name per line (optional)
    BBox_List_2017.csv                     boxes of 984 images (optional)
    images_001/images/00000001_000.png ... images_012/images/...   (or a flat images/ folder)

One image is one study (study_id = the image index without ``.png``); the patient is
``Patient ID``. The labels of ``Finding Labels`` ('|'-separated) become reference rows
through ``data/datasets/nih14.yaml``. Split: ``test_list.txt`` images are test; the rest are
split into train/val by patient with ``data.split``'s train:val ratio, so a patient never
straddles two splits. Without the list files there is no source split (ingest hash-splits).

The CSV headers are not well-formed (``OriginalImage[Width,Height]`` is one name with a comma
in it, so it spans two fields; the 2017 file adds a trailing empty column), so columns are
taken by their position in the header, which every data row shares.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from medfilip.config import DataParams, SplitParams
from medfilip.data.importers import REFERENCE_SCHEMA, DatasetError, ImportedDataset, mask_table
from medfilip.data.labelmap import LabelMap, load_label_map
from medfilip.data.split import assign_split

DATA_ENTRY_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")  # preferred first
TEST_LIST = "test_list.txt"
TRAIN_VAL_LIST = "train_val_list.txt"
BBOX_FILE = "BBox_List_2017.csv"
_REQUIRED = ("Image Index", "Finding Labels", "Patient ID", "View Position")


def _header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return [name.strip() for name in next(csv.reader(fh), [])]


def read_positional(path: Path, positions: dict[str, int]) -> dict[str, pa.ChunkedArray]:
    """Columns of a CSV taken by position (every value as text), named as ``positions`` says."""
    wanted = sorted(set(positions.values()))
    options = pacsv.ConvertOptions(
        column_types={f"f{i}": pa.string() for i in range(max(wanted) + 1)},
        include_columns=[f"f{i}" for i in wanted],
        strings_can_be_null=True,
    )
    try:
        table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(skip_rows=1, autogenerate_column_names=True),
                               convert_options=options)
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):
            raise DatasetError(f"{path}: has a header but no rows; download the complete file") from None
        raise DatasetError(f"{path}: cannot be read as CSV ({exc}); download the file again") from exc
    return {name: table.column(f"f{i}") for name, i in positions.items()}


def data_entry_path(root: Path) -> Path:
    """The image table: the 2020 revision when present, else the 2017 original."""
    for name in DATA_ENTRY_FILES:
        if (root / name).is_file():
            return root / name
    raise DatasetError(
        f"{root}: neither {' nor '.join(DATA_ENTRY_FILES)} found; point data.root at the ChestX-ray14 "
        "folder that holds them (downloaded from the NIH Box share)"
    )


def _read_data_entry(path: Path) -> dict[str, pa.ChunkedArray]:
    header = _header(path)
    positions = {}
    for name in _REQUIRED:
        if name not in header:
            raise DatasetError(f"{path}: column '{name}' not found in the header; is this the ChestX-ray14 "
                               f"Data_Entry file? (header: {', '.join(h for h in header if h)})")
        positions[name] = header.index(name)
    columns = read_positional(path, positions)
    for name in ("Image Index", "Finding Labels", "Patient ID"):
        empty = pc.or_kleene(pc.is_null(columns[name]), pc.equal(pc.utf8_trim_whitespace(columns[name]), ""))
        if pc.any(empty).as_py():
            row = pc.index(empty, True).as_py() + 2  # a line number: the header is line 1
            raise DatasetError(f"{path}: line {row} has an empty '{name}'; every image needs one")
    return columns


def _image_folders(root: Path) -> list[Path]:
    """The folders the PNGs are in: images_001/images ... images_012/images, or a flat images/."""
    folders = sorted(p / "images" for p in root.glob("images_*") if (p / "images").is_dir())
    if (root / "images").is_dir():
        folders.append(root / "images")
    return folders


def _locate(names: list[str], root: Path) -> tuple[list[str], int]:
    """Each image's path (folder listings only, no file is opened) and how many were not found.

    An image on no listing keeps the flat-layout path, so ingest's file fingerprint and the
    pixels stage (``pixels.on_error``) report it like any other missing file.
    """
    folder_of: dict[str, str] = {}
    for folder in _image_folders(root):
        with os.scandir(folder) as entries:
            for entry in entries:
                folder_of.setdefault(entry.name, str(folder))
    flat = str(root / "images")
    paths = [f"{folder_of.get(n, flat)}/{n}" for n in names]
    return paths, sum(1 for n in names if n not in folder_of)


def _read_list(path: Path) -> Optional[pa.Array]:
    if not path.is_file():
        return None
    return pa.array(sorted({line.strip() for line in path.read_text().splitlines() if line.strip()}), pa.string())


def train_val_params(split: SplitParams) -> SplitParams:
    """``data.split`` with its train and val fractions renormalised to sum to 1 (no test)."""
    total = split.train + split.val
    train = split.train / total if total > 0 else 1.0
    return SplitParams(train=train, val=1.0 - train, test=0.0, seed=split.seed)


def _splits(names: pa.ChunkedArray, patients: pa.ChunkedArray, root: Path, split: SplitParams
            ) -> tuple[Optional[pa.Array], dict]:
    """Split per image from the source lists; None when neither list file is there."""
    test, train_val = _read_list(root / TEST_LIST), _read_list(root / TRAIN_VAL_LIST)
    if test is None and train_val is None:
        return None, {"split": f"no {TEST_LIST} / {TRAIN_VAL_LIST}: patient-grouped hash split (data.split)"}
    test = test if test is not None else pa.array([], pa.string())
    train_val = train_val if train_val is not None else pa.array([], pa.string())
    both = pc.filter(test, pc.is_in(test, value_set=train_val))
    if len(both):
        raise DatasetError(f"{root / TEST_LIST}: image '{both[0]}' is also in {TRAIN_VAL_LIST} "
                           f"({len(both)} such images); an image belongs to one list")
    in_test = pc.is_in(names, value_set=test)
    test_patients = pc.unique(pc.filter(patients, in_test))
    other_patients = pc.unique(pc.filter(patients, pc.invert(in_test)))
    straddle = pc.filter(test_patients, pc.is_in(test_patients, value_set=other_patients))
    if len(straddle):
        raise DatasetError(f"{root / TEST_LIST}: patient '{straddle[0]}' has images in it and images not in it "
                           f"({len(straddle)} such patients); the official lists keep each patient in one, "
                           "download them again")
    renorm = train_val_params(split)
    split_of = pa.array([assign_split(p, renorm) for p in other_patients.to_pylist()], pa.string())
    where = pc.index_in(patients, value_set=other_patients)
    splits = pc.if_else(in_test, "test", pc.take(split_of, where))
    listed = pc.or_(in_test, pc.is_in(names, value_set=train_val))
    notes = {"split": f"test from {TEST_LIST}; the other images split into train/val by patient "
                      f"({renorm.train:.3f}:{renorm.val:.3f}, data.split's train:val)",
             "n_images_in_no_list": len(names) - pc.sum(listed.cast(pa.int64())).as_py()}
    return splits.combine_chunks(), notes


def _targets(labels: pa.Array, lm: LabelMap) -> tuple[dict[str, pa.Array], dict[str, int]]:
    """Category/severity/location per label (null where the map has none) and the unmapped counts."""
    counts = pc.value_counts(labels)
    unique = counts.field("values").to_pylist()
    targets = [lm.get(label) for label in unique]  # an unknown label: error naming the label map
    index = pc.index_in(labels, value_set=pa.array(unique, pa.string()))
    columns = {
        field: pc.take(pa.array([getattr(t, field) if t else None for t in targets], pa.string()), index)
        for field in ("category", "severity", "location")
    }
    seen = zip(unique, counts.field("counts").to_pylist(), targets, strict=True)
    unmapped = {label: n for label, n, t in seen if t is None}
    return columns, unmapped


def _reference(study_ids: pa.ChunkedArray, finding_labels: pa.ChunkedArray, lm: LabelMap
               ) -> tuple[pa.Table, dict[str, int]]:
    """One reference row per (image, label): 'Cardiomegaly|Effusion' gives two."""
    lists = pc.split_pattern(finding_labels.combine_chunks(), "|")
    labels = pc.utf8_trim_whitespace(pc.list_flatten(lists))
    owner = pc.take(study_ids.combine_chunks(), pc.list_parent_indices(lists))
    keep = pc.not_equal(labels, "")
    labels, owner = pc.filter(labels, keep), pc.filter(owner, keep)
    columns, unmapped = _targets(labels, lm)
    mapped = pc.is_valid(columns["category"])
    n = pc.sum(mapped.cast(pa.int64())).as_py() or 0
    table = pa.table({
        "study_id": pc.filter(owner, mapped),
        **{k: pc.filter(v, mapped) for k, v in columns.items()},
        "uncertain": pa.array([False] * n, pa.bool_()),
        "negated": pa.array([False] * n, pa.bool_()),
    }, schema=REFERENCE_SCHEMA)
    return table, unmapped


def _boxes(path: Path, image_ids: pa.Array, lm: LabelMap) -> tuple[pa.Table, dict[str, int]]:
    """BBox_List_2017.csv (Image Index, Finding Label, Bbox [x,y,w,h]) as box rows of the masks table."""
    header = _header(path)
    if header[:2] != ["Image Index", "Finding Label"] or len(header) < 6 or not header[2].startswith("Bbox"):
        raise DatasetError(f"{path}: expected the columns 'Image Index', 'Finding Label', 'Bbox [x', 'y', 'w', 'h]' "
                           f"first, found {', '.join(header[:6])}; download the file again")
    columns = read_positional(path, {"image": 0, "label": 1, "x": 2, "y": 3, "w": 4, "h": 5})
    image = pc.replace_substring_regex(columns["image"], r"\.png$", "")
    unknown = pc.filter(image, pc.invert(pc.is_in(image, value_set=image_ids)))
    if len(unknown):
        raise DatasetError(f"{path}: image '{unknown[0]}.png' is not in the Data_Entry file "
                           f"({len(unknown)} such boxes); use the files of one ChestX-ray14 download")
    coords = {}
    for name in ("x", "y", "w", "h"):
        try:
            coords[name] = pc.cast(columns[name], pa.float64())
        except pa.ArrowInvalid as exc:
            raise DatasetError(f"{path}: the box column '{name}' has a value that is not a number ({exc})") from None
    labels = pc.utf8_trim_whitespace(columns["label"]).combine_chunks()
    targets, unmapped = _targets(labels, lm)
    # The boxes are in the pixels of the distributed PNGs, whose size is not read here (height/width null).
    table = mask_table({"image_id": image.combine_chunks(), "label": targets["category"], "source_label": labels,
                        "kind": pa.array(["box"] * len(labels), pa.string()),
                        **{k: v.combine_chunks() for k, v in coords.items()}})
    return table, unmapped


def load(root: Path, params: DataParams) -> ImportedDataset:
    """Images, patients, the official split and the 14 labels (plus boxes) of ChestX-ray14 under ``root``."""
    root = Path(root)
    path = data_entry_path(root)
    columns = _read_data_entry(path)
    names = pc.utf8_trim_whitespace(columns["Image Index"])
    counts = pc.value_counts(names)
    duplicate = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(duplicate):
        raise DatasetError(f"{path}: image '{duplicate[0]}' has more than one row ({len(duplicate)} such images); "
                           "each image has one row")
    study_ids = pc.replace_substring_regex(names, r"\.png$", "")
    patients = pc.utf8_trim_whitespace(columns["Patient ID"])
    lm = load_label_map("nih14")
    reference, unmapped = _reference(study_ids, columns["Finding Labels"], lm)
    splits, split_notes = _splits(names, patients, root, params.split)

    paths, n_not_found = _locate(names.to_pylist(), root)
    view = pc.utf8_upper(pc.utf8_trim_whitespace(columns["View Position"]))
    view = pc.if_else(pc.equal(view, ""), pa.scalar(None, pa.string()), view)
    n = len(names)
    studies = pa.table({
        "study_id": study_ids, "patient_id": patients, "report": pa.array([""] * n, pa.string()),
        **({"split": splits} if splits is not None else {}),
    })
    images = pa.table({"image_id": study_ids, "study_id": study_ids, "path": pa.array(paths, pa.string()),
                       "view": view})

    notes: dict = {"data_entry_file": path.name, **split_notes,
                   "one_study_per_image": "each ChestX-ray14 image is its own study (no reports)",
                   "n_images_not_found": n_not_found}
    masks = None
    if (root / BBOX_FILE).is_file():
        masks, box_unmapped = _boxes(root / BBOX_FILE, study_ids.combine_chunks(), lm)
        for label, count in box_unmapped.items():
            unmapped[label] = unmapped.get(label, 0) + count
        notes["n_boxes"] = masks.num_rows
    if n_not_found:
        notes["warnings"] = [f"{n_not_found} of {n} images of {path.name} are in none of images_*/images or "
                             f"images/ under {root}; the pixels stage reports them (pixels.on_error)"]
    notes["labels_without_counterpart"] = unmapped
    return ImportedDataset(studies=studies, images=images, reference=reference, masks=masks, notes=notes)
