"""Importer for CheXpert's evaluation sets (Stanford): ``valid.csv`` and the CheXlocalize ``test_labels.csv``.

``data.root`` is the folder holding ``valid.csv`` (``CheXpert-v1.0-small/`` or
``CheXpert-v1.0/``) and, when downloaded, the test set's ``test_labels.csv``. Each CSV
row is one image; ``Path`` is relative to the folder above the dataset
(``CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg``) or to the dataset
itself (``test/patient64741/study1/view1_frontal.jpg``): each file's rows are resolved
by whichever of the two finds the images. Frontal images only; a study is
``patientNNN/studyN`` and has no report (evaluation only).

This module also holds what both CheXpert-labelled sources share: reading a CSV with
every column as text, and turning the 14 CheXpert observation columns
(1 positive, -1 uncertain, 0 negative, blank not mentioned) into reference rows through
``data/datasets/chexpert.yaml`` (used by the ``mimic-cxr`` importer too).
"""

from __future__ import annotations

import csv
import gzip
import os
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from medfilip.config import DataParams
from medfilip.data.importers import REFERENCE_SCHEMA, DatasetError, ImportedDataset
from medfilip.data.labelmap import LabelMap, load_label_map

# The 14 observations of the CheXpert labeler, as its CSVs spell them.
CHEXPERT_LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
# Per (study, label), the strongest statement wins when images of one study disagree.
_BLANK, _NEGATIVE, _UNCERTAIN, _POSITIVE = 0, 1, 2, 3

# valid -> val, test -> test; the first file found of each set is read.
LABEL_FILES = {"val": ("valid.csv", "val_labels.csv"), "test": ("test_labels.csv", "test.csv")}
DATASET_FOLDERS = ("CheXpert-v1.0-small", "CheXpert-v1.0", "CheXpert")
_IMAGE_PATH = re.compile(r"(?:^|/)(patient\d+)/(study\d+)/([^/]+)$")


def csv_header(path: Path) -> list[str]:
    """The column names of a CSV or CSV.gz (first row, stripped)."""
    opener: Callable = gzip.open if Path(path).suffix == ".gz" else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), None)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: cannot be read ({exc}); download the file again") from exc
    if not header:
        raise DatasetError(f"{path}: the file is empty (no header row); download it again")
    return [name.strip() for name in header]


def read_string_csv(path: Path, required: Sequence[str], optional: Sequence[str] = (), *,
                    hint: str = "") -> pa.Table:
    """Read the ``required`` (and present ``optional``) columns of a CSV or CSV.gz, every one as text.

    A missing file or column is a sentence naming it; blanks stay ``""`` (never null).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: file not found{'; ' + hint if hint else ''}")
    header = csv_header(path)
    missing = [name for name in required if name not in header]
    if missing:
        raise DatasetError(f"{path}: column '{missing[0]}' not found (its columns are: {', '.join(header)}); "
                           "use the file as distributed, with its header row")
    wanted = list(dict.fromkeys([*required, *(name for name in optional if name in header)]))
    try:
        # Strings everywhere: ids like "02aa804e-..." or "10000032" must stay text, and
        # "1.0" / "1" / "-1" are told apart only by the label parser below.
        return pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=header, skip_rows=1),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                include_columns=wanted, column_types={name: pa.string() for name in wanted},
                strings_can_be_null=False, quoted_strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError(f"{path}: cannot be parsed as CSV ({exc}); download the file again") from exc


def label_codes(column: pa.ChunkedArray | pa.Array, path: Path, name: str) -> np.ndarray:
    """One CheXpert label column -> int8 codes (0 blank, 1 negative, 2 uncertain, 3 positive).

    Accepts ``1``/``1.0``, ``0``/``0.0``, ``-1``/``-1.0`` and blank; anything else names its row.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    text = pc.utf8_trim_whitespace(column.fill_null(""))
    numeric = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
    try:
        values = pc.cast(numeric, pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:  # slow path, only to name the offending cell
        values = []
        for i, cell in enumerate(text.to_pylist()):
            try:
                values.append(float(cell) if cell else np.nan)
            except ValueError:
                raise DatasetError(f"{path}: row {i + 2}, column '{name}': '{cell}' is not a label value "
                                   "(expected 1, 0, -1 or blank)") from None
    values = np.asarray(values, dtype=np.float64)
    codes = np.zeros(len(values), dtype=np.int8)
    codes[values == 1.0] = _POSITIVE
    codes[values == -1.0] = _UNCERTAIN
    codes[values == 0.0] = _NEGATIVE
    bad = np.flatnonzero(~np.isnan(values) & (codes == _BLANK))
    if len(bad):
        raise DatasetError(f"{path}: row {bad[0] + 2}, column '{name}': '{text[int(bad[0])].as_py()}' is not a "
                           "label value (expected 1, 0, -1 or blank)")
    return codes


def chexpert_reference(table: pa.Table, study_ids: pa.Array | pa.ChunkedArray, label_map: LabelMap,
                       path: Path) -> tuple[pa.Table, dict]:
    """CheXpert label columns of ``table`` (one row per image or study) -> reference rows per study.

    1 -> positive, -1 -> ``uncertain``, 0 -> ``negated``, blank -> no row. Rows of one study
    that disagree keep the strongest statement (positive > uncertain > negative) and are counted.
    Returns the :data:`REFERENCE_SCHEMA` table and notes for the import summary.
    """
    ids = study_ids.combine_chunks() if isinstance(study_ids, pa.ChunkedArray) else study_ids
    encoded = pc.dictionary_encode(ids)
    owner = encoded.indices.to_numpy(zero_copy_only=False)
    studies = encoded.dictionary
    n_studies = len(studies)
    strongest = np.zeros((n_studies, len(CHEXPERT_LABELS)), dtype=np.int8)
    weakest = np.full((n_studies, len(CHEXPERT_LABELS)), 127, dtype=np.int8)
    without_counterpart: dict[str, int] = {}
    parts = []
    for j, name in enumerate(CHEXPERT_LABELS):
        codes = label_codes(table.column(name), path, name)
        given = codes > _BLANK
        np.maximum.at(strongest[:, j], owner[given], codes[given])
        np.minimum.at(weakest[:, j], owner[given], codes[given])
        target = label_map.get(name)
        if target is None:
            if given.any():
                without_counterpart[name] = int(given.sum())
            continue
        rows = np.flatnonzero(strongest[:, j] > _BLANK)
        code = strongest[rows, j]
        parts.append(pa.table({
            "study_id": studies.take(pa.array(rows, pa.int64())),
            "category": pa.array([target.category] * len(rows), pa.string()),
            "severity": pa.array([target.severity] * len(rows), pa.string()),
            "location": pa.array([target.location] * len(rows), pa.string()),
            "uncertain": pa.array(code == _UNCERTAIN),
            "negated": pa.array(code == _NEGATIVE),
        }, schema=REFERENCE_SCHEMA))
    reference = pa.concat_tables(parts) if parts else REFERENCE_SCHEMA.empty_table()
    conflicts = int(((strongest > _BLANK) & (weakest != strongest)).sum())
    notes = {"labels_without_counterpart": without_counterpart, "n_label_conflicts": conflicts}
    return reference, notes


def _label_files(root: Path) -> tuple[dict[str, Path], list[str]]:
    """split -> label file found under ``root``, and the files passed over (a CSV without labels)."""
    found, skipped = {}, []
    for split, names in LABEL_FILES.items():
        for name in names:
            if not (root / name).is_file():
                continue
            if "Path" not in (header := csv_header(root / name)) or not set(CHEXPERT_LABELS) & set(header):
                skipped.append(name)  # e.g. a test.csv listing images without labels
                continue
            found[split] = root / name
            break
    if found:
        return found, skipped
    for folder in DATASET_FOLDERS:
        if (root / folder / "valid.csv").is_file():
            raise DatasetError(f"{root}: no valid.csv here, but {root / folder / 'valid.csv'} exists; "
                               f"set data.root to {root / folder}")
    raise DatasetError(f"{root}: no CheXpert label file (valid.csv or test_labels.csv) found; set data.root to "
                       "the dataset folder holding valid.csv (CheXpert-v1.0-small or CheXpert-v1.0)")


def _path_rules(root: Path) -> list[tuple[str, Callable[[str], Path]]]:
    """Where a ``Path`` cell may point: the dataset folder, the folder above it, or the dataset
    folder with the cell's leading dataset-folder name dropped."""
    def strip_first(cell: str) -> Path:
        head, _, rest = cell.partition("/")
        return root / rest if rest else root / head

    return [("data.root/Path", lambda cell: root / cell),
            ("data.root/../Path", lambda cell: root.parent / cell),
            ("data.root/Path without its first folder", strip_first)]


def _resolve(cells: list[str], root: Path, path: Path) -> list[Path]:
    """The image files of ``cells``, by the rule that finds the most of them."""
    best, best_hits = None, -1
    for _, rule in _path_rules(root):
        resolved = [rule(cell) for cell in cells]
        hits = sum(os.path.isfile(p) for p in resolved)
        if hits > best_hits:
            best, best_hits = resolved, hits
        if hits == len(cells):
            break
    if cells and best_hits == 0:
        tried = ", ".join(str(rule(cells[0])) for _, rule in _path_rules(root))
        raise DatasetError(f"{path}: none of its {len(cells)} images was found (the first, '{cells[0]}', is not at "
                           f"{tried}); download the images beside the CSV or set data.root to the folder holding it")
    return best


def _frontal_flags(table: pa.Table, names: list[str]) -> tuple[list[Optional[bool]], list[Optional[str]]]:
    """Per row: frontal (True/False, None when the file does not say) and the view name."""
    if "Frontal/Lateral" in table.column_names:
        kinds = [cell.strip().lower() for cell in table.column("Frontal/Lateral").to_pylist()]
    else:  # the test set's CSV has no view columns; its file names do (view1_frontal.jpg)
        kinds = ["frontal" if "frontal" in n.lower() else "lateral" if "lateral" in n.lower() else "" for n in names]
    appa = (table.column("AP/PA").to_pylist() if "AP/PA" in table.column_names else [""] * table.num_rows)
    frontal = [True if k == "frontal" else False if k == "lateral" else None for k in kinds]
    views = [(v.strip().upper() or None) if f is not False else "LATERAL" for f, v in zip(frontal, appa)]
    return frontal, views


def load(root: Path, params: DataParams) -> ImportedDataset:
    """Read CheXpert's valid (-> val) and test (-> test) label files: frontal images, per-study labels."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: data.root not found; set it to the CheXpert folder holding valid.csv")
    files, skipped = _label_files(root)
    label_map = load_label_map("chexpert")
    study_rows: dict[str, dict] = {}
    image_rows: list[dict] = []
    label_parts: list[pa.Table] = []
    seen_images: set[str] = set()
    n_lateral = n_view_unknown = 0
    all_studies: set[str] = set()
    for split, path in files.items():
        table = read_string_csv(path, ["Path", *CHEXPERT_LABELS], optional=["Frontal/Lateral", "AP/PA"])
        cells = [cell.strip().replace("\\", "/") for cell in table.column("Path").to_pylist()]
        parsed = []
        for i, cell in enumerate(cells):
            match = _IMAGE_PATH.search(cell)
            if not match:
                raise DatasetError(f"{path}: row {i + 2}, column 'Path': '{cell}' is not "
                                   "<...>/patientNNN/studyN/<view>.jpg")
            parsed.append(match.groups())
        for name in CHEXPERT_LABELS:  # row numbers of bad cells are the file's own
            label_codes(table.column(name), path, name)
        frontal, views = _frontal_flags(table, [name for _, _, name in parsed])
        files_on_disk = _resolve(cells, root, path)
        keep = []
        for i, ((patient, study, name), is_frontal) in enumerate(zip(parsed, frontal)):
            study_id = f"{patient}/{study}"
            all_studies.add(study_id)
            if is_frontal is False:
                n_lateral += 1
                continue
            n_view_unknown += is_frontal is None
            image_id = f"{study_id}/{name.rsplit('.', 1)[0]}"
            if image_id in seen_images:
                raise DatasetError(f"{path}: row {i + 2}: image '{cells[i]}' is listed twice")
            seen_images.add(image_id)
            previous = study_rows.setdefault(study_id, {"study_id": study_id, "patient_id": patient, "report": "",
                                                        "split": split})
            if previous["split"] != split:
                raise DatasetError(f"{path}: study '{study_id}' is in both the {previous['split']} and the {split} "
                                   "label file; keep each study in one")
            image_rows.append({"image_id": image_id, "study_id": study_id, "path": str(files_on_disk[i]),
                               "view": views[i]})
            keep.append(i)
        kept = table.take(pa.array(keep, pa.int64()))
        label_parts.append(kept.select(list(CHEXPERT_LABELS)).append_column(
            "study_id", pa.array([f"{parsed[i][0]}/{parsed[i][1]}" for i in keep], pa.string())))
    labels = pa.concat_tables(label_parts)
    # Labels are per image in these files; one reference row per study and finding.
    first_file = next(iter(files.values()))  # every cell was checked above, per file
    reference, label_notes = chexpert_reference(labels, labels.column("study_id"), label_map, first_file)
    rows = list(study_rows.values())
    # Both sets: the files' own split. One set: leave it to ingest's patient-grouped split.
    source_split = len(files) > 1
    studies = pa.table({
        "study_id": pa.array([r["study_id"] for r in rows], pa.string()),
        "patient_id": pa.array([r["patient_id"] for r in rows], pa.string()),
        "report": pa.array([""] * len(rows), pa.string()),
        **({"split": pa.array([r["split"] for r in rows], pa.string())} if source_split else {}),
    })
    images = pa.Table.from_pylist(image_rows, schema=pa.schema(
        [("image_id", pa.string()), ("study_id", pa.string()), ("path", pa.string()), ("view", pa.string())]))
    notes = {
        "label_files": {split: path.name for split, path in files.items()},
        "files_without_labels_ignored": skipped,
        "split_from_label_files": source_split,
        "n_lateral_images_dropped": n_lateral,
        "n_images_view_unknown": n_view_unknown,
        "n_studies_without_frontal_image": len(all_studies - set(study_rows)),
        **label_notes,
    }
    return ImportedDataset(studies=studies, images=images, reference=reference, notes=notes)
