"""One module per dataset importer; each turns a dataset on disk into an :class:`ImportedDataset`.

An importer returns the studies (study_id, patient_id, report, optional split the
source ships) and images (image_id, study_id, path, view). Paths are relative to
the project root or absolute. Section parsing and the patient-grouped split are
done once, for every source, by :func:`medfilip.data.ingest.ingest`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa

from medfilip.config import DataParams
from medfilip.errors import UserError


class DatasetError(UserError, ValueError):
    """A dataset that cannot be imported: names the file, column or study."""


@dataclass
class ImportedDataset:
    studies: pa.Table  # study_id, patient_id, report, [split]
    images: pa.Table  # image_id, study_id, path, view
    # Facts about the import a user must see (e.g. one patient per image), merged into reports/ingest.json.
    notes: dict = field(default_factory=dict)


Importer = Callable[[Path, DataParams], ImportedDataset]


def get_importer(source: str) -> Importer:
    """The importer for ``data.source``; a clear error for a source not built yet."""
    from medfilip.data.importers import manifest, phantom

    importers: dict[str, Importer] = {"phantom": phantom.load, "manifest": manifest.load}
    if source not in importers:
        raise DatasetError(
            f"data.source '{source}' has no importer yet (available: {', '.join(sorted(importers))}); "
            "export your dataset as a CSV/Parquet and use data.source: manifest"
        )
    return importers[source]
