"""The ingest stage: any source -> canonical ``studies.parquet`` + ``images.parquet``."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from medfilip.config import DataParams
from medfilip.data.importers import DatasetError, ImportedDataset, get_importer
from medfilip.data.sections import findings_and_impression
from medfilip.data.split import assign_split

STUDY_SCHEMA = pa.schema(
    [
        ("study_id", pa.string()),
        ("patient_id", pa.string()),
        ("split", pa.string()),
        ("report", pa.string()),
        ("findings", pa.string()),
        ("impression", pa.string()),
    ]
)
IMAGE_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("study_id", pa.string()), ("path", pa.string()), ("view", pa.string())]
)


def canonicalize(ds: ImportedDataset, params: DataParams) -> tuple[pa.Table, pa.Table, dict]:
    """Validate ids, assign the patient-grouped split and parse report sections."""
    studies = ds.studies.to_pylist()
    ids = Counter(s["study_id"] for s in studies)
    dup = [k for k, n in ids.items() if n > 1]
    if dup:
        raise DatasetError(f"study_id '{dup[0]}' occurs {ids[dup[0]]} times ({len(dup)} duplicated ids)")
    images = ds.images.to_pylist()
    orphans = [im["image_id"] for im in images if im["study_id"] not in ids]
    if orphans:
        raise DatasetError(f"image '{orphans[0]}' refers to a study that has no report ({len(orphans)} such images)")

    use_source = params.split.use_source_split and "split" in ds.studies.column_names
    patient_split: dict[str, str] = {}
    rows = []
    for s in studies:
        pid = str(s["patient_id"])
        split = s["split"] if use_source and s.get("split") else assign_split(pid, params.split)
        if patient_split.setdefault(pid, split) != split:
            raise DatasetError(
                f"patient '{pid}' has studies in both '{patient_split[pid]}' and '{split}' "
                f"(study '{s['study_id']}'): a patient must stay in one split"
            )
        report = s["report"] or ""
        findings, impression = findings_and_impression(report)
        rows.append(
            {
                "study_id": str(s["study_id"]),
                "patient_id": pid,
                "split": split,
                "report": report,
                "findings": findings,
                "impression": impression,
            }
        )
    rows.sort(key=lambda r: r["study_id"])
    images.sort(key=lambda im: (im["study_id"], im["image_id"]))
    study_table = pa.Table.from_pylist(rows, schema=STUDY_SCHEMA)
    image_table = pa.Table.from_pylist(images, schema=IMAGE_SCHEMA)

    split_counts = Counter(r["split"] for r in rows)
    summary = {
        "source": params.source,
        "n_studies": len(rows),
        "n_patients": len(patient_split),
        "n_images": len(images),
        "studies_per_split": {k: split_counts.get(k, 0) for k in ("train", "val", "test")},
        "patients_per_split": dict(sorted(Counter(patient_split.values()).items())),
        "split_from_source": bool(use_source),
        "n_empty_reports": sum(1 for r in rows if not r["report"].strip()),
        "n_with_findings": sum(1 for r in rows if r["findings"]),
        "n_with_impression": sum(1 for r in rows if r["impression"]),
        "n_studies_without_image": len(set(ids) - {im["study_id"] for im in images}),
        # The pixels stage decides (pixels.on_error) whether a missing file fails the run.
        "n_missing_image_files": sum(1 for im in images if not os.path.exists(im["path"])),
        **ds.notes,
    }
    return study_table, image_table, summary


def ingest(params: DataParams, out_dir: Path) -> dict:
    """Import ``params.source`` from ``params.root`` and write the canonical tables to ``out_dir``."""
    importer = get_importer(params.source)
    dataset = importer(Path(params.root), params)
    studies, images, summary = canonicalize(dataset, params)
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(studies, out_dir / "studies.parquet")
    pq.write_table(images, out_dir / "images.parquet")
    return summary
