"""The ingest stage: any source -> canonical ``studies.parquet`` + ``images.parquet``.

Besides the two canonical tables it writes ``reference.parquet`` (the dataset's own labels,
empty when it has none) and ``image_files.parquet``: path, size and mtime of every image
file, stat'ed, never read. That fingerprint is what the ``pixels`` stage depends on, so DVC
never hashes the raw image tree (550 GB for MIMIC-CXR-JPG).
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from medfilip.config import DataParams
from medfilip.data.importers import REFERENCE_SCHEMA, DatasetError, ImportedDataset, get_importer
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
# One row per image, in images.parquet order; bytes/mtime_ns null for a missing file.
FILE_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("path", pa.string()), ("bytes", pa.int64()), ("mtime_ns", pa.int64())]
)
_STAT_THREADS = 16  # stat() is I/O-bound: on network storage a pool hides its latency


_STAT_BATCH = 2048  # paths per pool task: a future per file would cost more than its stat


def _stat_batch(paths: list[str]) -> list[tuple[int, int] | tuple[None, None]]:
    out: list = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append((None, None))
        else:
            out.append((st.st_size, st.st_mtime_ns))
    return out


def image_files(images: pa.Table, threads: int = _STAT_THREADS) -> pa.Table:
    """The cheap fingerprint of the image files: (image_id, path, bytes, mtime_ns), one stat each."""
    paths = images.column("path").to_pylist()
    batches = [paths[i:i + _STAT_BATCH] for i in range(0, len(paths), _STAT_BATCH)]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        stats = [st for batch in pool.map(_stat_batch, batches) for st in batch]
    return pa.table(
        {
            "image_id": images.column("image_id"),
            "path": images.column("path"),
            "bytes": pa.array([b for b, _ in stats], pa.int64()),
            "mtime_ns": pa.array([m for _, m in stats], pa.int64()),
        },
        schema=FILE_SCHEMA,
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
        **ds.notes,
    }
    return study_table, image_table, summary


def canonical_reference(ds: ImportedDataset, study_ids: set[str]) -> pa.Table:
    """The dataset's labels in :data:`REFERENCE_SCHEMA`, sorted; a label of an unknown study is an error."""
    if ds.reference is None:
        return REFERENCE_SCHEMA.empty_table()
    missing = sorted(set(ds.reference.column("study_id").to_pylist()) - study_ids)
    if missing:
        raise DatasetError(f"the dataset's labels name study '{missing[0]}', which has no report or image "
                           f"({len(missing)} such studies)")
    table = ds.reference.select(REFERENCE_SCHEMA.names).cast(REFERENCE_SCHEMA)
    return table.sort_by([("study_id", "ascending"), ("category", "ascending")])


def ingest(params: DataParams, out_dir: Path) -> dict:
    """Import ``params.source`` from ``params.root`` and write the canonical tables to ``out_dir``."""
    importer = get_importer(params.source)
    dataset = importer(Path(params.root), params)
    studies, images, summary = canonicalize(dataset, params)
    reference = canonical_reference(dataset, set(studies.column("study_id").to_pylist()))
    files = image_files(images)
    # The pixels stage decides (pixels.on_error) whether a missing file fails the run.
    summary["n_missing_image_files"] = files.column("bytes").null_count
    summary["n_reference_rows"] = reference.num_rows
    summary["n_reference_studies"] = len(set(reference.column("study_id").to_pylist()))
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(studies, out_dir / "studies.parquet")
    pq.write_table(images, out_dir / "images.parquet")
    pq.write_table(reference, out_dir / "reference.parquet")
    pq.write_table(files, out_dir / "image_files.parquet")
    if dataset.masks is not None:
        pq.write_table(dataset.masks, out_dir / "masks.parquet")
        summary["n_mask_rows"] = dataset.masks.num_rows
    return summary
