"""Importer for SIIM-ACR Pneumothorax Segmentation (Kaggle, 2019) as distributed.

Layout under ``data.root``::

    train-rle.csv                 ImageId, " EncodedPixels" (sic: the header and values start with a space)
    dicom-images-train/<StudyInstanceUID>/<SeriesInstanceUID>/<ImageId>.dcm
    dicom-images-test/<StudyInstanceUID>/<SeriesInstanceUID>/<ImageId>.dcm   (stage 1 test: unlabelled)

or the stage-2 label file ``stage_2_train.csv`` (ImageId,EncodedPixels), which also labels the
stage-1 test images. ``data.metadata`` may name the label file; otherwise ``train-rle.csv`` is
used when present. Each ImageId's file is found by walking the two image folders once.

Labels: an image with at least one run-length-encoded region has a pneumothorax; an image
whose only row is ``-1`` is marked *pneumothorax absent* (a negated reference row), not
"no finding": SIIM grades pneumothorax only, and its negatives carry every other finding.
Every region is kept in ``masks`` (kind ``rle``; see :func:`decode_rle` for the format).
The patient id is inside the DICOM files only, and import never opens images, so each
image is its own patient (SIIM's PatientIDs are anonymised one per image anyway).
"""

from __future__ import annotations

import logging
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from medfilip.config import DataParams
from medfilip.data.importers import DatasetError, ImportedDataset, mask_table, reference_table
from medfilip.data.importers.vindr import read_text_csv
from medfilip.data.labelmap import load_label_map

log = logging.getLogger(__name__)

LABEL_FILES = ("train-rle.csv", "stage_2_train.csv")
IMAGE_DIRS = ("dicom-images-train", "dicom-images-test")
SIIM_LABEL = "Pneumothorax"
NO_REGION = "-1"
_NAMED = 5  # ImageIds quoted in a warning about many


def decode_rle(rle: str, height: int, width: int, rle_format: str = "relative") -> np.ndarray:
    """A SIIM run-length string -> a (height, width) bool mask.

    The string is pairs ``start length`` over the pixels in column-major order (down the
    first column, then the next: ``mask.T.ravel()``), as in the competition's
    ``mask_functions.py``. ``relative`` (train-rle.csv): each start is a 0-based offset from
    the end of the previous run (the first from pixel 0). ``absolute`` (Kaggle's standard
    form): each start is a 1-based pixel number. SIIM images are 1024 x 1024 (the DICOM's
    Rows x Columns).
    """
    numbers = np.asarray(rle.split(), dtype=np.int64)
    starts, lengths = numbers[0::2], numbers[1::2]
    if rle_format == "relative":
        begins = np.cumsum(starts + lengths) - lengths
    elif rle_format == "absolute":
        begins = starts - 1
    else:
        raise ValueError(f"rle_format must be 'relative' or 'absolute', got {rle_format!r}")
    flat = np.zeros(height * width, dtype=bool)
    for begin, length in zip(begins, lengths):
        flat[begin:begin + length] = True
    return flat.reshape((height, width), order="F")


def _runs(rle: str) -> np.ndarray | None:
    """The (n, 2) start/length pairs of a run-length string, or None when it is not one."""
    parts = rle.split()
    if not parts or len(parts) % 2 or not all(p.isdigit() for p in parts):
        return None
    return np.asarray(parts, dtype=np.int64).reshape(-1, 2)


def _rle_format(runs: list[np.ndarray], label_file: str) -> str:
    """train-rle.csv is relative (documented); for another file, absolute only if every string reads as one.

    An absolute string has strictly increasing starts that never fall inside the previous
    run; relative offsets of a lung-shaped mask repeat (about one column apart) and break that.
    """
    if label_file == "train-rle.csv":
        return "relative"
    multi = [r for r in runs if len(r) > 1]
    ordered = all(bool(np.all(r[1:, 0] >= r[:-1, 0] + r[:-1, 1])) for r in multi)
    return "absolute" if multi and ordered else "relative"


def _label_file(root: Path, params: DataParams) -> Path:
    named = root / params.metadata
    if params.metadata not in ("", ".") and named.is_file():
        return named
    for name in LABEL_FILES:
        if (root / name).is_file():
            return root / name
    raise DatasetError(f"{root}: neither {' nor '.join(LABEL_FILES)} found; point data.root at the SIIM-ACR "
                       "folder that holds train-rle.csv and dicom-images-train/ (or set data.metadata to the "
                       "label CSV)")


def _dicom_files(folder: Path) -> Iterator[os.DirEntry]:
    """Every ``*.dcm`` under ``folder`` (os.scandir: one pass, no stat of each file)."""
    stack = [folder]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=True):
                    stack.append(Path(entry.path))
                elif entry.name.lower().endswith(".dcm"):
                    yield entry


def load(root: Path, params: DataParams) -> ImportedDataset:
    """Images with their pneumothorax label (positive or negated) and every region's RLE mask."""
    path = _label_file(root, params)
    table = read_text_csv(path)
    for col in ("ImageId", "EncodedPixels"):
        if col not in table.column_names:
            raise DatasetError(f"{path}: column '{col}' not found; columns are: {', '.join(table.column_names)} "
                               "(expected ImageId,EncodedPixels as in train-rle.csv)")
    target = load_label_map("siim").get(SIIM_LABEL)
    if target is None:
        raise DatasetError(f"data/datasets/siim.yaml maps '{SIIM_LABEL}' to null; SIIM has no other label")

    folders = [root / d for d in IMAGE_DIRS if (root / d).is_dir()]
    if not folders:
        raise DatasetError(f"{root}: no {' or '.join(IMAGE_DIRS)} folder; download the DICOMs beside {path.name}")
    files: dict[str, tuple[str, str]] = {}  # ImageId -> (path, folder)
    for folder in folders:
        for entry in _dicom_files(folder):
            image_id = entry.name[:-4]
            if image_id in files:
                raise DatasetError(f"{entry.path}: ImageId '{image_id}' also at {files[image_id][0]}; "
                                   "remove the duplicate")
            files[image_id] = (entry.path, folder.name)

    regions: dict[str, list[str]] = {}  # ImageId -> its RLE strings (empty: only -1 rows)
    runs: list[np.ndarray] = []
    ids = table.column("ImageId").to_pylist()
    rles = table.column("EncodedPixels").to_pylist()
    for line, (image_id, rle) in enumerate(zip(ids, rles), start=2):
        image_id, rle = (image_id or "").strip(), (rle or "").strip()
        if not image_id:
            raise DatasetError(f"{path}: line {line} has an empty ImageId")
        strings = regions.setdefault(image_id, [])
        if rle == NO_REGION:
            continue
        pairs = _runs(rle)
        if pairs is None:
            raise DatasetError(f"{path}: line {line} (ImageId {image_id}): EncodedPixels must be -1 or pairs of "
                               f"non-negative integers 'start length ...', got '{rle[:40]}'")
        strings.append(rle)
        runs.append(pairs)
    rle_format = _rle_format(runs, path.name)

    missing = sorted(i for i in regions if i not in files)
    if len(missing) == len(regions):
        raise DatasetError(f"{path}: none of its {len(regions)} ImageIds has a DICOM under "
                           f"{', '.join(f.name for f in folders)}; check that data.root holds the image folders")
    notes: dict = {}
    if missing:
        warning = (f"{path}: {len(missing)} labelled ImageId(s) have no .dcm file under {root} and are left out "
                   f"({', '.join(missing[:_NAMED])}{' ...' if len(missing) > _NAMED else ''})")
        log.warning(warning)
        print(f"warning: {warning}", file=sys.stderr)
        notes["warnings"] = [warning]

    labelled = [i for i in sorted(regions) if i in files]
    rows, mask_ids, mask_rles = [], [], []
    for image_id in labelled:
        strings = regions[image_id]
        rows.append({"study_id": image_id, "category": target.category, "severity": target.severity,
                     "location": target.location, "negated": not strings})
        mask_ids += [image_id] * len(strings)
        mask_rles += strings
    n = len(mask_ids)
    masks = mask_table({
        "image_id": pa.array(mask_ids, pa.string()),
        "label": pa.array([target.category] * n, pa.string()),
        "source_label": pa.array([SIIM_LABEL] * n, pa.string()),
        "kind": pa.array(["rle"] * n, pa.string()),
        "rle": pa.array(mask_rles, pa.string()),
        "rle_format": pa.array([rle_format] * n, pa.string()),
    })
    unlabelled = Counter(folder for image_id, (_, folder) in files.items() if image_id not in regions)
    n_positive = sum(1 for i in labelled if regions[i])
    notes.update({
        "label_file": path.name,
        "n_images_pneumothorax": n_positive,
        "n_images_pneumothorax_absent": len(labelled) - n_positive,
        "n_mask_regions": n,
        "n_labelled_without_file": len(missing),
        "n_unlabelled_files": {folder: unlabelled.get(folder, 0) for folder in (f.name for f in folders)},
        "labels": "SIIM grades pneumothorax only: an image without one has a negated pneumothorax row, not "
                  "'no finding' (it may have any other finding)",
        "patients": "the patient id is only inside the DICOM files, so each ImageId is its own patient",
        "rle_format": rle_format,
        "rle": "masks.rle: 'start length' pairs over the DICOM's Rows x Columns (1024 x 1024) in column-major "
               "order; relative: starts are 0-based offsets from the previous run's end (SIIM's "
               "mask_functions.py); absolute: 1-based pixel numbers; decode with "
               "medfilip.data.importers.siim.decode_rle",
    })
    studies = pa.table({
        "study_id": pa.array(labelled, pa.string()),
        "patient_id": pa.array(labelled, pa.string()),
        "report": pa.array([""] * len(labelled), pa.string()),
    })
    images = pa.table({
        "image_id": pa.array(labelled, pa.string()),
        "study_id": pa.array(labelled, pa.string()),
        "path": pa.array([files[i][0] for i in labelled], pa.string()),
        "view": pa.nulls(len(labelled), pa.string()),
    })
    return ImportedDataset(studies=studies, images=images, reference=reference_table(rows), masks=masks,
                           notes=notes)
