"""Importer for any CSV or Parquet manifest: one row per image, with its report.

The escape hatch for private data: ``data.manifest`` names the file and its columns
(image path, report text, optional patient, study, view and split columns).
``data.manifest.path`` is relative to ``data.root``; relative image paths are taken
relative to the manifest's folder.

Ids made up for a manifest without id columns hash the image path *relative to the
manifest*, never a path that contains ``data.root``: moving the dataset folder, or
switching between a relative and an absolute root, keeps every id and so the split.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import posixpath
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from medfilip.config import DataParams
from medfilip.data.importers import DatasetError, ImportedDataset

log = logging.getLogger(__name__)
_ROWS_NAMED = 10  # row numbers quoted in an error about many rows


def read_manifest(path: Path) -> pa.Table:
    """Read a .csv/.tsv/.parquet manifest with every column as text."""
    if not path.exists():
        raise DatasetError(f"{path}: manifest not found (set data.manifest.path)")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        table = pq.read_table(path)
    elif suffix in (".csv", ".tsv", ".txt"):
        delimiter = "\t" if suffix == ".tsv" else ","
        with open(path, newline="") as fh:
            header = next(csv.reader(fh, delimiter=delimiter), [])
        try:
            # Strings everywhere: ids like "00012" must not become integers.
            table = pacsv.read_csv(
                path,
                parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(
                    column_types={name: pa.string() for name in header}, strings_can_be_null=True, auto_dict_encode=False
                ),
                read_options=pacsv.ReadOptions(autogenerate_column_names=False),
            )
        except pa.ArrowInvalid as exc:
            raise DatasetError(f"{path}: cannot parse as CSV: {exc}") from exc
    else:
        raise DatasetError(f"{path}: manifest must be .csv, .tsv or .parquet")
    return table.cast(pa.schema([(name, pa.string()) for name in table.column_names]))


def _stable_id(prefix: str, text: str) -> str:
    return prefix + hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def image_key(cell: str, manifest_dir: Path) -> str:
    """The image as the manifest names it, independent of where the dataset sits: what ids hash.

    A relative cell is already relative to the manifest (normalised, ``/``-separated); an
    absolute one inside the manifest's folder is made relative to it, so a manifest written
    with absolute paths gets the ids of its relative twin. Other absolute paths stay as given.
    """
    text = cell.replace("\\", "/")
    if not os.path.isabs(text):
        return posixpath.normpath(text)
    folder = os.path.abspath(manifest_dir)
    image = os.path.abspath(text)
    if os.path.commonpath([folder, image]) == folder:
        return Path(os.path.relpath(image, folder)).as_posix()
    return Path(image).as_posix()


def _rows_named(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:_ROWS_NAMED]))
    return shown + (f" and {len(numbers) - _ROWS_NAMED} more" if len(numbers) > _ROWS_NAMED else "")


def load(root: Path, params: DataParams) -> ImportedDataset:
    """Turn the manifest into studies and images, validating columns and per-study reports."""
    m = params.manifest
    if m.path is None:
        raise DatasetError("data.source is 'manifest' but data.manifest.path is not set")
    # The manifest lives in the dataset folder, so data.root is the one DVC dependency.
    path = Path(m.path) if Path(m.path).is_absolute() else root / m.path
    table = read_manifest(path)
    wanted = {
        "data.manifest.image_col": m.image_col,
        "data.manifest.report_col": m.report_col,
        "data.manifest.patient_col": m.patient_col,
        "data.manifest.study_col": m.study_col,
        "data.manifest.view_col": m.view_col,
        "data.manifest.split_col": m.split_col,
    }
    for key, col in wanted.items():
        if col is not None and col not in table.column_names:
            raise DatasetError(
                f"{path}: column '{col}' (from {key}) not found; columns are: "
                f"{', '.join(table.column_names)}"
            )
    rows = table.to_pylist()
    first_row = 2 if path.suffix.lower() != ".parquet" else 0  # CSV: line numbers under the header
    notes: dict = {"patient_col_missing": not m.patient_col}
    if m.patient_col:
        no_patient = [i for i, row in enumerate(rows, start=first_row) if not (row[m.patient_col] or "").strip()]
        if no_patient:
            raise DatasetError(
                f"{path}: {len(no_patient)} row(s) have an empty '{m.patient_col}' "
                f"(data.manifest.patient_col): row {_rows_named(no_patient)}. Fill in the patient of "
                "every image; a patient-grouped split cannot place an image without one"
            )
    else:
        warning = (
            f"{path}: data.manifest.patient_col is not set, so every "
            f"{'study' if m.study_col else 'image'} is taken as its own patient; a patient's "
            "studies can then land in different splits (test images leaking into training). "
            "Set data.manifest.patient_col to the patient id column"
        )
        log.warning(warning)
        print(f"warning: {warning}", file=sys.stderr)
        notes["warnings"] = [warning]
    studies: dict[str, dict] = {}
    images: list[dict] = []
    seen_images: set[str] = set()
    for i, row in enumerate(rows, start=first_row):
        img = row[m.image_col]
        if not img:
            raise DatasetError(f"{path}: row {i} has an empty '{m.image_col}'")
        img_path = Path(img) if Path(img).is_absolute() else path.parent / img
        key = image_key(img, path.parent)
        study_id = row[m.study_col] if m.study_col else _stable_id("m", key)
        if not study_id:
            raise DatasetError(f"{path}: row {i} has an empty '{m.study_col}'")
        patient_id = row[m.patient_col] if m.patient_col else study_id
        report = row[m.report_col] or ""
        split = row[m.split_col] if m.split_col else None
        if split is not None and split not in ("train", "val", "test"):
            raise DatasetError(
                f"{path}: row {i}: split '{split}' must be train, val or test"
            )
        prev = studies.get(study_id)
        if prev is None:
            studies[study_id] = {
                "study_id": study_id, "patient_id": patient_id, "report": report, "split": split
            }
        else:
            if prev["report"] and report and prev["report"] != report:
                raise DatasetError(
                    f"{path}: study '{study_id}' has two different reports (rows with the same "
                    f"'{m.study_col}' must share one report)"
                )
            if prev["patient_id"] != patient_id:
                raise DatasetError(
                    f"{path}: study '{study_id}' belongs to two patients "
                    f"('{prev['patient_id']}' and '{patient_id}')"
                )
            prev["report"] = prev["report"] or report
        image_id = _stable_id("i", key)
        if image_id in seen_images:
            raise DatasetError(f"{path}: image '{img}' is listed twice")
        seen_images.add(image_id)
        images.append(
            {
                "image_id": image_id,
                "study_id": study_id,
                "path": str(img_path),
                "view": row[m.view_col] if m.view_col else None,
            }
        )
    study_rows = list(studies.values())
    has_split = m.split_col is not None
    study_table = pa.table(
        {
            "study_id": pa.array([s["study_id"] for s in study_rows], pa.string()),
            "patient_id": pa.array([s["patient_id"] for s in study_rows], pa.string()),
            "report": pa.array([s["report"] for s in study_rows], pa.string()),
            **({"split": pa.array([s["split"] for s in study_rows], pa.string())} if has_split else {}),
        }
    )
    image_table = pa.Table.from_pylist(
        images,
        schema=pa.schema(
            [("image_id", pa.string()), ("study_id", pa.string()), ("path", pa.string()), ("view", pa.string())]
        ),
    )
    return ImportedDataset(studies=study_table, images=image_table, notes=notes)
