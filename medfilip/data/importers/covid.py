"""Importer for the COVID-19 Radiography Database (Kaggle, v4+): an evaluation set, images and labels only.

``data.root`` is ``COVID-19_Radiography_Dataset/`` (the folder that holds the class folders)::

    COVID/images/COVID-1.png            COVID/masks/COVID-1.png (lung masks: counted, not used)
    Normal/images/Normal-1.png          Lung_Opacity/images/...     Viral Pneumonia/images/...
    COVID.metadata.xlsx ...             (source URLs per image: not needed, not read)

The older flat layout (``COVID/COVID-1.png``, v1-v3 folder names such as ``COVID-19``,
``NORMAL``) is read too. The class folder is the label, mapped by ``data/datasets/covid.yaml``
(COVID -> covid-19, an unseen class: the point of this set). The folder listing is the whole
metadata: one image is one study and one patient (the database ships no patient ids), and
there is no source split.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pyarrow as pa

from medfilip.config import DataParams
from medfilip.data.importers import DatasetError, ImportedDataset, reference_table
from medfilip.data.labelmap import load_label_map

DATASET_FOLDER = "COVID-19_Radiography_Dataset"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def _files(folder: Path) -> list[str]:
    """Image file names in ``folder`` (a listing only; no file is opened), sorted."""
    if not folder.is_dir():
        return []
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES)


def image_id(file_name: str) -> str:
    """``Viral Pneumonia-12.png`` -> ``Viral_Pneumonia-12``: the file stem with whitespace made ``_``."""
    return re.sub(r"\s+", "_", Path(file_name).stem.strip())


def dataset_root(root: Path) -> Path:
    """``root`` itself, or its ``COVID-19_Radiography_Dataset/`` when pointed at the unpacked archive."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: folder not found; point data.root at {DATASET_FOLDER}/ of the COVID-19 "
                           "Radiography Database (Kaggle)")
    inner = root / DATASET_FOLDER
    return inner if inner.is_dir() else root


def load(root: Path, params: DataParams) -> ImportedDataset:
    """One study per image of every class folder under ``root``, labelled by its folder."""
    root = dataset_root(root)
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"{root}: no class folders (COVID/, Normal/, Lung_Opacity/, Viral Pneumonia/); point "
                           f"data.root at {DATASET_FOLDER}/")
    lm = load_label_map("covid")
    studies, images, reference = [], [], []
    seen: dict[str, Path] = {}
    per_class, masks_per_class, unmapped = {}, {}, {}
    for folder in classes:
        target = lm.get(folder.name)  # an unknown folder: an error naming the label map
        image_dir = folder / "images" if (folder / "images").is_dir() else folder
        names = _files(image_dir)
        per_class[folder.name] = len(names)
        masks_per_class[folder.name] = len(_files(folder / "masks"))
        if target is None:
            unmapped[folder.name] = len(names)
        for name in names:
            iid = image_id(name)
            if iid in seen:
                raise DatasetError(f"{image_dir / name}: its id '{iid}' is also the id of {seen[iid]}; rename one "
                                   "of the two files")
            seen[iid] = image_dir / name
            studies.append({"study_id": iid, "patient_id": iid, "report": ""})
            images.append({"image_id": iid, "study_id": iid, "path": str(image_dir / name), "view": None})
            if target is not None:
                reference.append({"study_id": iid, "category": target.category, "severity": target.severity,
                                  "location": target.location})
    if not images:
        raise DatasetError(f"{root}: the class folders hold no .png/.jpg images (expected e.g. COVID/images/"
                           "COVID-1.png); is the download complete?")
    warning = ("the COVID-19 Radiography Database ships no patient ids: every image is its own study and "
               "patient, so images of one patient can land in different splits")
    notes = {
        "images_per_class": per_class,
        "lung_masks_per_class": masks_per_class,
        "one_patient_per_image": True,
        "warnings": [warning],
        "labels_without_counterpart": unmapped,
    }
    image_schema = pa.schema([("image_id", pa.string()), ("study_id", pa.string()), ("path", pa.string()),
                              ("view", pa.string())])
    return ImportedDataset(
        studies=pa.Table.from_pylist(studies, schema=pa.schema([("study_id", pa.string()),
                                                                 ("patient_id", pa.string()),
                                                                 ("report", pa.string())])),
        images=pa.Table.from_pylist(images, schema=image_schema),
        reference=reference_table(reference),
        notes=notes,
    )
