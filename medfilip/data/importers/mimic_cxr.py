"""Importer for MIMIC-CXR-JPG v2 (PhysioNet) with the reports of MIMIC-CXR.

``data.root`` is the MIMIC-CXR-JPG folder as downloaded::

    mimic-cxr-2.0.0-metadata.csv.gz   one row per image: dicom_id, subject_id, study_id, ViewPosition, ...
    mimic-cxr-2.0.0-split.csv.gz      dicom_id, study_id, subject_id, split (train / validate / test)
    mimic-cxr-2.0.0-chexpert.csv.gz   subject_id, study_id + the 14 CheXpert labels (1.0 / -1.0 / 0.0 / blank)
    files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg
    files/p10/p10000032/s50414267.txt  the study's report, unzipped from MIMIC-CXR's mimic-cxr-reports.zip
    mimic-cxr-reports.zip             read in place instead when the tree has no report files

A study is its numeric ``study_id`` as text ("50414267"), a patient its ``subject_id``;
an image is its ``dicom_id``. Only frontal images (ViewPosition PA or AP) are kept; a
study with no frontal image, or with no report, is dropped. Every drop is counted in the
import summary. The 377k metadata rows are handled as Arrow columns, never row by row;
the reports (one file per study) are read by a thread pool.
"""

from __future__ import annotations

import logging
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medfilip.config import DataParams
from medfilip.data.importers import DatasetError, ImportedDataset
from medfilip.data.importers.chexpert import CHEXPERT_LABELS, chexpert_reference, read_string_csv
from medfilip.data.labelmap import load_label_map

log = logging.getLogger(__name__)

METADATA = "mimic-cxr-2.0.0-metadata.csv.gz"
SPLIT = "mimic-cxr-2.0.0-split.csv.gz"
LABELS = "mimic-cxr-2.0.0-chexpert.csv.gz"
REPORTS_ZIP = "mimic-cxr-reports.zip"
FRONTAL_VIEWS = ("PA", "AP")
SPLITS = {"train": "train", "validate": "val", "test": "test"}
_READ_THREADS = 16  # reading small files is I/O-bound: a pool hides the latency of network storage
_PROBE = 32  # studies looked up in the tree before trusting the zip alone
T = TypeVar("T")


def _flat(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _ids(table: pa.Table, column: str, prefix: str, path: Path) -> pa.Array:
    """A numeric id column as text without its optional letter ("s50414267" -> "50414267")."""
    ids = pc.utf8_ltrim(pc.utf8_trim_whitespace(_flat(table.column(column))), characters=prefix)
    ok = pc.match_substring_regex(ids, r"^[0-9]+$")
    if not pc.all(ok).as_py() and table.num_rows:
        row = pc.index(ok, False).as_py()
        raise DatasetError(f"{path}: row {row + 2}, column '{column}': '{table.column(column)[row].as_py()}' is not "
                           "a numeric id; use the file as distributed")
    return ids


def _first_duplicate(values: pa.Array) -> str | None:
    counts = pc.value_counts(values)
    dup = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    return dup[0].as_py() if len(dup) else None


def _report_paths(subjects: pa.ChunkedArray | pa.Array, studies: pa.ChunkedArray | pa.Array) -> pa.Array:
    """files/pXX/pNNNNNNNN/sNNNNNNNN.txt, relative to data.root (XX: the subject's first two digits)."""
    group = pc.utf8_slice_codeunits(subjects, 0, 2)
    return pc.binary_join_element_wise("files/p", group, "/p", subjects, "/s", studies, ".txt", "")


def _map_chunked(fn: Callable[[str], T], items: list[str], chunk: int = 512) -> list[T]:
    """``[fn(x) for x in items]`` on a thread pool, one task per ``chunk`` items (a future per file
    would cost more than reading a small file)."""
    def run(batch: list[str]) -> list[T]:
        return [fn(x) for x in batch]

    batches = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        return [y for done in pool.map(run, batches) for y in done]


def _scan_tree(root: Path) -> list[str]:
    """Every files/pXX/pNNNNNNNN/*.txt under ``root``: one directory listing per patient, no image touched."""
    files = root / "files"
    if not files.is_dir():
        return []
    patients = []
    for group in sorted(os.scandir(files), key=lambda e: e.name):
        if group.is_dir():
            patients.extend(e.path for e in os.scandir(group.path) if e.is_dir())

    def reports_of(patient: str) -> list[str]:
        with os.scandir(patient) as entries:
            return [e.path for e in entries if e.name.endswith(".txt")]

    found = [p for batch in _map_chunked(reports_of, patients, chunk=64) for p in batch]
    prefix = len(str(root)) + 1
    return [p[prefix:].replace(os.sep, "/") for p in found]


def _zip_members(path: Path) -> dict[str, str]:
    """Report members of mimic-cxr-reports.zip: 'files/pXX/pN/sN.txt' -> member name (any folder above kept)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{path}: cannot be opened as a zip ({exc}); download it again or unzip it into data.root")
    members = {}
    for name in names:
        at = name.find("files/")
        if at >= 0 and name.endswith(".txt"):
            members[name[at:]] = name
    return members


def _read_file(path: str) -> str:
    with open(path, "rb") as fh:
        return fh.read().decode("utf-8", errors="replace").strip()


def _read_reports(root: Path, rel_paths: list[str], in_tree: np.ndarray, zip_path: Path,
                  zip_members: dict[str, str]) -> list[str]:
    """The report of every study: from the unzipped tree where it has one, else from the zip (opened once)."""
    texts: list[str] = [""] * len(rel_paths)
    tree_rows = np.flatnonzero(in_tree)
    folder = str(root) + "/"
    for row, text in zip(tree_rows, _map_chunked(_read_file, [folder + rel_paths[i] for i in tree_rows])):
        texts[row] = text
    zip_rows = np.flatnonzero(~in_tree)
    if len(zip_rows):
        with zipfile.ZipFile(zip_path) as zf:
            for i in zip_rows:
                texts[i] = zf.read(zip_members[rel_paths[i]]).decode("utf-8", errors="replace").strip()
    return texts


def _study_splits(images: pa.Table, root: Path) -> pa.Table:
    """study_id -> our split name, from the official split file (joined on dicom_id)."""
    path = root / SPLIT
    table = read_string_csv(path, ["dicom_id", "split"], hint="download it with the images, or set "
                            "data.split.use_source_split: false to split by patient instead")
    table = pa.table({"dicom_id": pc.utf8_trim_whitespace(table.column("dicom_id")),
                      "split": pc.utf8_trim_whitespace(table.column("split"))})
    known = pc.is_in(table.column("split"), value_set=pa.array(list(SPLITS)))
    if not pc.all(known).as_py() and table.num_rows:
        row = pc.index(known, False).as_py()
        raise DatasetError(f"{path}: row {row + 2}, column 'split': '{table.column('split')[row].as_py()}' is not "
                           f"one of {', '.join(SPLITS)}")
    joined = images.select(["dicom_id", "study_id"]).join(table, "dicom_id", join_type="left outer")
    missing = pc.is_null(joined.column("split"))
    if pc.any(missing).as_py():
        first = pc.filter(joined.column("dicom_id"), missing)[0].as_py()
        raise DatasetError(f"{path}: image '{first}' has no row ({pc.sum(missing).as_py()} such images); use the "
                           "split file of the same release, or set data.split.use_source_split: false")
    per_study = joined.group_by("study_id", use_threads=False).aggregate([("split", "min"), ("split", "max")])
    mixed = pc.not_equal(per_study.column("split_min"), per_study.column("split_max"))
    if pc.any(mixed).as_py():
        study = pc.filter(per_study.column("study_id"), mixed)[0].as_py()
        raise DatasetError(f"{path}: the images of study '{study}' are in different splits; a study must stay in one")
    ours = pc.replace_substring_regex(per_study.column("split_min"), "^validate$", "val")
    return pa.table({"study_id": per_study.column("study_id"), "split": ours})


def load(root: Path, params: DataParams) -> ImportedDataset:
    """Frontal images, their studies' reports, the official split and the CheXpert labels of MIMIC-CXR-JPG."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: data.root not found; set it to the MIMIC-CXR-JPG folder holding {METADATA}")
    meta_path = root / METADATA
    meta = read_string_csv(meta_path, ["dicom_id", "subject_id", "study_id", "ViewPosition"],
                           hint=f"set data.root to the MIMIC-CXR-JPG folder holding {METADATA} and files/")
    dicom = pc.utf8_trim_whitespace(_flat(meta.column("dicom_id")))
    subject = _ids(meta, "subject_id", "p", meta_path)
    study = _ids(meta, "study_id", "s", meta_path)
    view = pc.utf8_upper(pc.utf8_trim_whitespace(_flat(meta.column("ViewPosition"))))
    if (dup := _first_duplicate(dicom)) is not None:
        raise DatasetError(f"{meta_path}: dicom_id '{dup}' occurs in more than one row; use the file as distributed")
    owners = pa.table({"study_id": study, "subject_id": subject}).group_by("study_id", use_threads=False).aggregate(
        [("subject_id", "min"), ("subject_id", "max")])
    shared = pc.not_equal(owners.column("subject_id_min"), owners.column("subject_id_max"))
    if pc.any(shared).as_py():
        bad = pc.filter(owners, shared)
        raise DatasetError(f"{meta_path}: study '{bad.column('study_id')[0].as_py()}' belongs to two subjects "
                           f"('{bad.column('subject_id_min')[0].as_py()}' and "
                           f"'{bad.column('subject_id_max')[0].as_py()}')")

    # Frontal views only: the lateral (and any other) view is counted by its ViewPosition.
    frontal = pc.is_in(view, value_set=pa.array(FRONTAL_VIEWS))
    dropped = pc.value_counts(pc.filter(view, pc.invert(frontal)))
    dropped_by_view = {(v or "(blank)"): int(n) for v, n in zip(dropped.field("values").to_pylist(),
                                                                  dropped.field("counts").to_pylist())}
    images = pa.table({"dicom_id": dicom, "study_id": study, "subject_id": subject, "view": view}).filter(frontal)
    if meta.num_rows and not images.num_rows:
        raise DatasetError(f"{meta_path}: no image has ViewPosition PA or AP ({meta.num_rows} rows, none frontal); "
                           "use the file as distributed")
    per_study = images.group_by("study_id", use_threads=False).aggregate([("subject_id", "min")])
    study_ids = _flat(per_study.column("study_id"))
    subject_ids = _flat(per_study.column("subject_id_min"))

    # Reports: the unzipped tree where it has them, else mimic-cxr-reports.zip.
    rel = _report_paths(subject_ids, study_ids)
    rel_list = rel.to_pylist()
    zip_path = root / REPORTS_ZIP
    has_zip = zip_path.is_file()
    tree_used = not has_zip or any((root / p).is_file() for p in rel_list[:_PROBE])
    tree_reports = pa.array(_scan_tree(root) if tree_used else [], pa.string())
    zip_members = _zip_members(zip_path) if has_zip else {}
    zip_reports = pa.array(list(zip_members), pa.string())
    in_tree = pc.is_in(rel, value_set=tree_reports).to_numpy(zero_copy_only=False)
    in_zip = pc.is_in(rel, value_set=zip_reports).to_numpy(zero_copy_only=False)
    has_report = in_tree | in_zip
    if len(rel_list) and not has_report.any():
        raise DatasetError(f"{root}: none of the {len(rel_list)} studies has a report (looked for "
                           f"{root / rel_list[0]} and {zip_path}); unzip MIMIC-CXR's {REPORTS_ZIP} into data.root "
                           "or place the zip there")
    keep = pa.array(has_report)
    kept_rel = [p for p, k in zip(rel_list, has_report) if k]
    reports = _read_reports(root, kept_rel, in_tree[has_report], zip_path, zip_members)
    study_ids, subject_ids = pc.filter(study_ids, keep), pc.filter(subject_ids, keep)
    all_rel = _report_paths(subject, study)
    zip_only = pc.filter(zip_reports, pc.invert(pc.is_in(zip_reports, value_set=tree_reports)))
    available = pa.concat_arrays([tree_reports, zip_only])
    orphans = pc.sum(pc.invert(pc.is_in(available, value_set=pc.unique(all_rel)))).as_py() or 0

    studies = {"study_id": study_ids, "patient_id": subject_ids, "report": pa.array(reports, pa.string())}
    images = images.filter(pc.is_in(images.column("study_id"), value_set=study_ids))
    if params.split.use_source_split:
        splits = _study_splits(images, root)
        order = pc.index_in(study_ids, value_set=_flat(splits.column("study_id")))
        studies["split"] = splits.column("split").take(order)
    group = pc.utf8_slice_codeunits(images.column("subject_id"), 0, 2)
    image_paths = pc.binary_join_element_wise(str(root), "/files/p", group, "/p", images.column("subject_id"), "/s",
                                              images.column("study_id"), "/", images.column("dicom_id"), ".jpg", "")
    image_table = pa.table({"image_id": images.column("dicom_id"), "study_id": images.column("study_id"),
                            "path": image_paths, "view": images.column("view")})

    n_metadata_studies = len(pc.unique(study))
    notes = {
        "n_metadata_images": meta.num_rows,
        "n_metadata_studies": n_metadata_studies,
        "images_dropped_by_view": dropped_by_view,
        "n_non_frontal_images_dropped": sum(dropped_by_view.values()),
        "n_studies_without_frontal_image": n_metadata_studies - len(rel_list),
        "n_studies_without_report": int((~has_report).sum()),
        "n_reports_without_metadata": int(orphans),
        "reports_from": {"tree": int((in_tree & has_report).sum()), "zip": int((~in_tree & in_zip).sum())},
    }
    reference = None
    labels_path = root / LABELS
    if labels_path.is_file():
        labels = read_string_csv(labels_path, ["study_id", *CHEXPERT_LABELS])
        label_study = _ids(labels, "study_id", "s", labels_path)
        # Every row is parsed (so a bad cell names its own line); rows of dropped studies are left out after.
        reference, label_notes = chexpert_reference(labels, label_study, load_label_map("chexpert"), labels_path)
        reference = reference.filter(pc.is_in(reference.column("study_id"), value_set=study_ids))
        known = pc.is_in(label_study, value_set=study_ids)
        notes["n_label_rows_without_study"] = int(labels.num_rows - (pc.sum(known).as_py() or 0))
        notes["n_studies_without_labels"] = int(len(study_ids) - len(pc.unique(pc.filter(label_study, known))))
        notes.update(label_notes)
    else:
        warning = f"{labels_path}: not found, so the import has no reference labels (evaluation falls back to " \
                  "the extractor's labels); download it with the images"
        log.warning(warning)
        notes["reference_labels"] = f"{LABELS} not found in data.root: no reference labels"
        notes["warnings"] = [warning]
    return ImportedDataset(studies=pa.table(studies), images=image_table, reference=reference, notes=notes)
