"""Importer for the synthetic phantom benchmark written by :mod:`medfilip.data.phantom`."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from medfilip.config import DataParams
from medfilip.data.importers import REFERENCE_SCHEMA, DatasetError, ImportedDataset, reference_table


def load(root: Path, params: DataParams) -> ImportedDataset:
    """Read ``root/studies.parquet`` (one image per study); the phantom ships its own split, and
    ``root/truth.parquet`` (what was rendered) is its reference."""
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
    truth_path = root / "truth.parquet"
    reference = None
    if truth_path.exists():
        truth = pq.read_table(truth_path)
        n = truth.num_rows
        columns = {name: truth[name] if name in truth.column_names else pa.nulls(n, field.type)
                   for name, field in zip(REFERENCE_SCHEMA.names, REFERENCE_SCHEMA)}
        for flag in ("uncertain", "negated"):
            columns[flag] = pc.fill_null(columns[flag].cast(pa.bool_()), False)
        reference = pa.table(columns, schema=REFERENCE_SCHEMA)
        # A phantom study with nothing rendered is normal by construction: say so explicitly
        # (the evaluation scores "no finding" only where a dataset states it).
        normal = sorted(set(studies.column("study_id").to_pylist()) - set(truth.column("study_id").to_pylist()))
        reference = pa.concat_tables([reference, reference_table([{"study_id": s, "category": "no finding"}
                                                                  for s in normal])])
    return ImportedDataset(studies=studies, images=images, reference=reference)
