"""One module per dataset importer; each turns a dataset on disk into an :class:`ImportedDataset`.

An importer returns the studies (study_id, patient_id, report, optional split the
source ships), images (image_id, study_id, path, view) and, where the dataset has
its own labels, a reference table (:data:`REFERENCE_SCHEMA`: one row per study and
finding, categories in our vocabulary) that evaluation scores against. Paths are
relative to the project root or absolute. Section parsing and the patient-grouped split are
done once, for every source, by :func:`medfilip.data.ingest.ingest`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pyarrow as pa

from medfilip.config import DataParams
from medfilip.errors import UserError


class DatasetError(UserError, ValueError):
    """A dataset that cannot be imported: names the file, column or study."""


# The dataset's own labels (data/interim/reference.parquet): what a positive study has, in
# vocabulary categories; a negated row says the dataset marks the finding absent.
REFERENCE_SCHEMA = pa.schema([
    ("study_id", pa.string()),
    ("category", pa.string()),
    ("severity", pa.string()),
    ("location", pa.string()),
    ("uncertain", pa.bool_()),
    ("negated", pa.bool_()),
])


def reference_table(rows: list[dict]) -> pa.Table:
    """Rows with at least study_id and category -> a :data:`REFERENCE_SCHEMA` table."""
    full = [{"severity": None, "location": None, "uncertain": False, "negated": False, **r} for r in rows]
    return pa.Table.from_pylist(full, schema=REFERENCE_SCHEMA)


# Region annotations of an image (ImportedDataset.masks), one row per region: a box (x, y, w, h in
# pixels of the original image) or a run-length-encoded mask (rle over height x width, in the
# rle_format the source documents). ``label`` is our vocabulary category (null where the dataset's
# label has none), ``source_label`` the dataset's own name; ``rad_id`` the reader, where known.
MASK_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("label", pa.string()),
    ("source_label", pa.string()),
    ("kind", pa.string()),  # box | rle
    ("x", pa.float64()),
    ("y", pa.float64()),
    ("w", pa.float64()),
    ("h", pa.float64()),
    ("rle", pa.string()),
    ("rle_format", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("rad_id", pa.string()),
])


def mask_table(columns: dict) -> pa.Table:
    """Columns (a subset of :data:`MASK_SCHEMA`, equal lengths) -> a masks table; the rest are null."""
    n = len(next(iter(columns.values()))) if columns else 0
    return pa.table({f.name: columns[f.name] if f.name in columns else pa.nulls(n, f.type) for f in MASK_SCHEMA},
                    schema=MASK_SCHEMA)


@dataclass
class ImportedDataset:
    studies: pa.Table  # study_id, patient_id, report, [split]
    images: pa.Table  # image_id, study_id, path, view
    reference: Optional[pa.Table] = None  # REFERENCE_SCHEMA; None: the dataset has no labels of its own
    # Region annotations kept for segmentation/localisation (SIIM RLE masks, boxes): written as
    # masks.parquet beside the tables, one row per (image, region); None: the dataset has none.
    masks: Optional[pa.Table] = None
    # Facts about the import a user must see (e.g. one patient per image), merged into reports/ingest.json.
    notes: dict = field(default_factory=dict)


Importer = Callable[[Path, DataParams], ImportedDataset]


# data.source -> module under medfilip.data.importers; each module has ``load(root, params)``.
SOURCES = {
    "phantom": "phantom",
    "manifest": "manifest",
    "mimic-cxr": "mimic_cxr",
    "openi": "openi",
    "chexpert": "chexpert",
    "nih14": "nih14",
    "rsna": "rsna",
    "vindr": "vindr",
    "covid": "covid",
    "siim": "siim",
}


def get_importer(source: str) -> Importer:
    """The importer for ``data.source``; a clear error for a source there is no importer for."""
    import importlib

    if source not in SOURCES:
        raise DatasetError(
            f"data.source '{source}' has no importer (available: {', '.join(sorted(SOURCES))}); "
            "export your dataset as a CSV/Parquet and use data.source: manifest"
        )
    return importlib.import_module(f"medfilip.data.importers.{SOURCES[source]}").load
