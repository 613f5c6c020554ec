"""Importer for the synthetic phantom benchmark written by :mod:`medfilip.data.phantom`."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from medfilip.config import DataParams
from medfilip.data.importers import DatasetError, ImportedDataset


def load(root: Path, params: DataParams) -> ImportedDataset:
    """Read ``root/studies.parquet`` (one image per study); the phantom ships its own split."""
    path = root / "studies.parquet"
    if not path.exists():
        raise DatasetError(
            f"{path}: phantom dataset not found; run `dvc repro synthesize` (or set data.root)"
        )
    table = pq.read_table(path)
    studies = table.select(["study_id", "patient_id", "report", "split"])
    abs_paths = pc.binary_join_element_wise(str(root), table["path"], "/")
    images = pa.table(
        {
            "image_id": table["image_id"],
            "study_id": table["study_id"],
            "path": abs_paths,
            "view": table["view"],
        }
    )
    return ImportedDataset(studies=studies, images=images)
