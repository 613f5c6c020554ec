"""Importer for the RSNA Pneumonia Detection Challenge (Kaggle) as distributed: images, labels and boxes.

``data.root`` is the folder of the download::

    stage_2_train_labels.csv          patientId,x,y,width,height,Target (a row per box; Target 1 = opacity)
    stage_2_detailed_class_info.csv   patientId,class ("Lung Opacity" / "No Lung Opacity / Not Normal" / "Normal")
    stage_2_train_images/<patientId>.dcm
    stage_2_test_images/              unlabelled: counted, not imported

One image is one study and one patient (``patientId``); there is no source split (ingest
hash-splits). Classes map through ``data/datasets/rsna.yaml``: "Lung Opacity" is pneumonia
(the MedKLIP / CheXzero convention on RSNA) and its boxes become ``masks``; "Normal" is no
finding. "No Lung Opacity / Not Normal" is abnormal without a category of ours: such a study
gets a negated "no finding" row -- the dataset's own statement that the image is not normal --
so evaluation counts it neither as pneumonia nor as normal. The view (PA/AP) is in the DICOM
headers only, which an importer never reads: ``view`` is null.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from medfilip.config import DataParams
from medfilip.data.importers import REFERENCE_SCHEMA, DatasetError, ImportedDataset, mask_table
from medfilip.data.labelmap import LabelMap, load_label_map

LABELS_FILE = "stage_2_train_labels.csv"
CLASS_FILE = "stage_2_detailed_class_info.csv"
TRAIN_IMAGES = "stage_2_train_images"
TEST_IMAGES = "stage_2_test_images"
OPACITY_CLASS = "Lung Opacity"  # the class of every patient with a Target 1 row
NOT_NORMAL_CLASS = "No Lung Opacity / Not Normal"
NORMAL = "no finding"


def _read(path: Path, columns: tuple[str, ...]) -> pa.Table:
    """``columns`` of a CSV, every value as text; a missing file or column is an error naming it."""
    if not path.is_file():
        raise DatasetError(f"{path}: not found; point data.root at the RSNA Pneumonia Detection Challenge download "
                           f"(the folder with {LABELS_FILE}, {CLASS_FILE} and {TRAIN_IMAGES}/)")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        header = [h.strip() for h in next(csv.reader(fh), [])]
    for name in columns:
        if name not in header:
            raise DatasetError(f"{path}: column '{name}' not found (header: {', '.join(header)}); download the "
                               "file again")
    try:
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types={h: pa.string() for h in header}, include_columns=list(columns), strings_can_be_null=True))
    except pa.ArrowInvalid as exc:
        raise DatasetError(f"{path}: cannot be read as CSV ({exc}); download the file again") from exc


def _first(mask: pa.ChunkedArray | pa.Array) -> int:
    """The CSV line of the first True of a row mask (the header is line 1)."""
    return pc.index(mask, True).as_py() + 2


def _listing(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    with os.scandir(folder) as entries:
        return {e.name for e in entries if e.name.lower().endswith(".dcm")}


def _classes(path: Path, patients: pa.Array) -> pa.Table:
    """One (patientId, class) row per patient of ``patients`` from the class file (a row per box there)."""
    table = _read(path, ("patientId", "class"))
    empty = pc.or_kleene(pc.is_null(table["class"]), pc.equal(table["class"], ""))
    if pc.any(empty).as_py():
        raise DatasetError(f"{path}: line {_first(empty)} has an empty 'class'; every patient needs one")
    pairs = table.group_by(["patientId", "class"], use_threads=False).aggregate([])
    counts = pc.value_counts(pairs["patientId"])
    twice = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(twice):
        raise DatasetError(f"{path}: patient '{twice[0]}' has two different classes ({len(twice)} such patients); "
                           "a patient has one class")
    missing = pc.filter(patients, pc.invert(pc.is_in(patients, value_set=pairs["patientId"])))
    if len(missing):
        raise DatasetError(f"{path}: patient '{missing[0]}' of {LABELS_FILE} has no class ({len(missing)} such "
                           "patients); use the two files of one download")
    extra = pc.filter(pairs["patientId"], pc.invert(pc.is_in(pairs["patientId"], value_set=patients)))
    if len(extra):
        raise DatasetError(f"{path}: patient '{extra[0]}' is not in {LABELS_FILE} ({len(extra)} such patients); use "
                           "the two files of one download")
    return pairs


def _boxes(path: Path, labels: pa.Table, category: str | None) -> pa.Table:
    """The Target 1 rows of the labels file as box rows of the masks table."""
    positive = pc.equal(labels["Target"], "1")
    rows = labels.filter(positive)
    coords = {}
    for ours, theirs in (("x", "x"), ("y", "y"), ("w", "width"), ("h", "height")):
        column = rows[theirs]
        if column.null_count:
            line = _first(pc.and_(positive, pc.is_null(labels[theirs])))
            raise DatasetError(f"{path}: line {line} has Target 1 but no '{theirs}'; a positive row is a box")
        try:
            coords[ours] = pc.cast(column, pa.float64())
        except pa.ArrowInvalid as exc:
            raise DatasetError(f"{path}: column '{theirs}' has a value that is not a number ({exc})") from None
    n = rows.num_rows
    # In the pixels of the 1024x1024 DICOMs, whose size is not read here (height/width null).
    return mask_table({"image_id": rows["patientId"].combine_chunks(), "label": pa.array([category] * n, pa.string()),
                       "source_label": pa.array([OPACITY_CLASS] * n, pa.string()),
                       "kind": pa.array(["box"] * n, pa.string()),
                       **{k: v.combine_chunks() for k, v in coords.items()}})


def _reference(pairs: pa.Table, lm: LabelMap) -> tuple[pa.Table, dict[str, int]]:
    """A positive row per mapped class; a negated "no finding" row per "not normal" study."""
    counts = pc.value_counts(pairs["class"])
    unique = counts.field("values").to_pylist()
    targets = [lm.get(c) for c in unique]  # an unknown class: an error naming the label map
    index = pc.index_in(pairs["class"], value_set=pa.array(unique, pa.string()))
    columns = {f: pc.take(pa.array([getattr(t, f) if t else None for t in targets], pa.string()), index)
               for f in ("category", "severity", "location")}
    mapped = pc.is_valid(columns["category"])
    positive = pa.table({"study_id": pc.filter(pairs["patientId"], mapped),
                         **{f: pc.filter(v, mapped) for f, v in columns.items()}})
    not_normal = pc.filter(pairs["patientId"], pc.equal(pairs["class"], NOT_NORMAL_CLASS))
    m, k = positive.num_rows, len(not_normal)
    reference = pa.table({
        "study_id": pa.concat_arrays([positive["study_id"].combine_chunks(), not_normal.combine_chunks()]),
        **{f: pa.concat_arrays([positive[f].combine_chunks(),
                                pa.array([NORMAL if f == "category" else None] * k, pa.string())])
           for f in ("category", "severity", "location")},
        "uncertain": pa.array([False] * (m + k), pa.bool_()),
        "negated": pa.array([False] * m + [True] * k, pa.bool_()),
    }, schema=REFERENCE_SCHEMA)
    unmapped = {c: n for c, n, t in zip(unique, counts.field("counts").to_pylist(), targets, strict=True) if t is None}
    return reference, unmapped


def load(root: Path, params: DataParams) -> ImportedDataset:
    """The labelled training images of the challenge: a study per patientId, its class and boxes."""
    root = Path(root)
    labels_path, class_path = root / LABELS_FILE, root / CLASS_FILE
    labels = _read(labels_path, ("patientId", "x", "y", "width", "height", "Target"))
    empty = pc.or_kleene(pc.is_null(labels["patientId"]), pc.equal(labels["patientId"], ""))
    if pc.any(empty).as_py():
        raise DatasetError(f"{labels_path}: line {_first(empty)} has an empty 'patientId'")
    bad = pc.invert(pc.fill_null(pc.is_in(labels["Target"], value_set=pa.array(["0", "1"])), False))
    if pc.any(bad).as_py():
        raise DatasetError(f"{labels_path}: line {_first(bad)} has a 'Target' that is neither 0 nor 1")
    patients = pc.unique(labels["patientId"])
    pairs = _classes(class_path, patients)
    positive = pc.unique(pc.filter(labels["patientId"], pc.equal(labels["Target"], "1")))
    says_opacity = pc.equal(pairs["class"], OPACITY_CLASS)
    has_box = pc.is_in(pairs["patientId"], value_set=positive)
    disagree = pc.filter(pairs["patientId"], pc.not_equal(says_opacity, has_box))
    if len(disagree):
        raise DatasetError(f"{class_path}: patient '{disagree[0]}' is '{OPACITY_CLASS}' in one file but not in "
                           f"the other ({LABELS_FILE} Target) ({len(disagree)} such patients); use the two files "
                           "of one download")

    lm = load_label_map("rsna")
    reference, unmapped = _reference(pairs, lm)
    opacity = lm.get(OPACITY_CLASS)
    masks = _boxes(labels_path, labels, opacity.category if opacity else None)

    ids = patients.to_pylist()
    folder = root / TRAIN_IMAGES
    on_disk = _listing(folder)
    n = len(ids)
    studies = pa.table({"study_id": patients, "patient_id": patients, "report": pa.array([""] * n, pa.string())})
    images = pa.table({"image_id": patients, "study_id": patients,
                       "path": pa.array([f"{folder}/{pid}.dcm" for pid in ids], pa.string()),
                       "view": pa.nulls(n, pa.string())})
    listed = {f"{pid}.dcm" for pid in ids}
    notes = {
        "one_patient_per_image": True,
        "n_boxes": masks.num_rows,
        "n_images_not_found": len(listed - on_disk),
        "n_train_images_without_labels": len(on_disk - listed),
        "n_test_images_unlabelled": len(_listing(root / TEST_IMAGES)),
        "view": "not in the label files (it is in the DICOM headers, which the importer does not read)",
        "labels_without_counterpart": unmapped,
    }
    return ImportedDataset(studies=studies, images=images, reference=reference, masks=masks, notes=notes)
