"""Importer for the Indiana University chest X-ray collection (Open-i), as NLM distributes it.

``data.root`` holds the two archives unpacked::

    ecgen-radiology/<n>.xml   one report per file (NLMCXR_reports.tgz, 3,955 files)
    NLMCXR_png/<id>.png       the radiographs (NLMCXR_png.tgz), named by the report's
                              <parentImage id="CXR1_1_IM-0001-3001"> ids

A study is one XML file (study_id: its ``<uId>``, e.g. ``CXR1``); its images are its
parentImage ids (104 reports have none: they stay, text only). Open-i has no patient ids,
so each study is its own patient. The report is its COMPARISON, INDICATION, FINDINGS and
IMPRESSION sections under their headings. The reference labels are the indexers' MeSH
``major`` tags mapped through ``data/knowledge/mesh_map.yaml`` (:mod:`medfilip.data.mesh`):
one positive row per mapped tag, a single ``no finding`` row for a study tagged ``normal``,
no row for a study that was not indexed or none of whose tags maps (both counted in notes).

Where ``ecgen-radiology/`` is absent, the reports are read straight from
``NLMCXR_reports.tgz`` in ``data.root`` (then set ``data.metadata: NLMCXR_reports.tgz``).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa

from medfilip.config import DataParams
from medfilip.data.importers import DatasetError, ImportedDataset, reference_table
from medfilip.data.mesh import NO_FINDING, load_mesh_map, map_study_terms
from medfilip.data.openi import ARCHIVE_NAME, OpenIError, OpenIReport, iter_openi_folder, read_openi_reports
from medfilip.vocab import load_vocabulary

log = logging.getLogger(__name__)

REPORTS_DIR = "ecgen-radiology"
IMAGES_DIR = "NLMCXR_png"
IMAGE_SUFFIX = ".png"
_TOP_TERMS = 25  # unmapped MeSH tags listed in the notes

# Captions name the examination ("Radiograph chest PA and lateral"), shared by all its images, so a
# view is only taken from a caption that names exactly one view and no second image.
_VIEW_NAMES = {
    "PA": re.compile(r"\bpa\b|\bpostero-?anterior\b"),
    "AP": re.compile(r"\bap\b|\bantero-?posterior\b"),
    "LATERAL": re.compile(r"\blat(?:eral)?\b"),
    "frontal": re.compile(r"\bfrontal\b"),  # PA or AP, the caption does not say which
}
_MORE_THAN_ONE = re.compile(r"\b(?:and|2|two|both|multiple|views|2v)\b|/")


def view_from_caption(caption: str | None) -> str | None:
    """PA, AP or LATERAL when the caption names that one view only ("AP portable chest"), else None."""
    if not caption:
        return None
    text = caption.lower()
    named = [view for view, pattern in _VIEW_NAMES.items() if pattern.search(text)]
    if len(named) != 1 or named[0] == "frontal" or _MORE_THAN_ONE.search(text):
        return None
    return named[0]


def _read_reports(root: Path) -> tuple[list[tuple[str, OpenIReport]], Path]:
    """(where, report) pairs, ``where`` naming the report's file for error messages."""
    folder, archive = root / REPORTS_DIR, root / ARCHIVE_NAME
    try:
        if folder.is_dir():
            return [(str(path), report) for path, report in iter_openi_folder(folder)], folder
        if archive.is_file():
            return [(f"{archive}: report {r.id}", r) for r in read_openi_reports(archive)], archive
    except OpenIError as exc:
        raise DatasetError(f"{exc}; re-extract NLMCXR_reports.tgz from NLM's Open-i download") from None
    if not root.is_dir():
        raise DatasetError(f"{root}: Open-i folder not found; set data.root to the folder holding "
                           f"{REPORTS_DIR}/ (unpacked NLMCXR_reports.tgz) and {IMAGES_DIR}/ (unpacked NLMCXR_png.tgz)")
    raise DatasetError(f"{folder}: Open-i reports not found; unpack NLMCXR_reports.tgz in {root} "
                       f"(it creates {REPORTS_DIR}/) and set data.metadata: {REPORTS_DIR}")


def load(root: Path, params: DataParams) -> ImportedDataset:
    """Studies, images and MeSH reference labels of the Open-i collection under ``root``."""
    reports, source = _read_reports(root)
    if not reports:
        raise DatasetError(f"{source}: no Open-i report (*.xml) in it; unpack NLMCXR_reports.tgz in {root}")
    image_dir = root / IMAGES_DIR
    if not image_dir.is_dir():
        raise DatasetError(f"{image_dir}: Open-i image folder not found; unpack NLMCXR_png.tgz into "
                           f"{image_dir} (the PNGs named by each report's parentImage id)")
    vocabulary = load_vocabulary()
    mesh_map = load_mesh_map(vocabulary=vocabulary)

    study_file: dict[str, str] = {}
    image_study: dict[str, str] = {}
    studies: list[dict] = []
    images: list[dict] = []
    rows: list[dict] = []
    statuses: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    unmapped: Counter[str] = Counter()
    ignored: Counter[str] = Counter()
    views: Counter[str] = Counter()
    for where, report in reports:
        if report.uid in study_file:
            raise DatasetError(f"{where}: study '{report.uid}' is also the uId of {study_file[report.uid]}; "
                               "each report must have its own uId (re-extract NLMCXR_reports.tgz)")
        study_file[report.uid] = where
        studies.append({"study_id": report.uid, "patient_id": report.uid, "report": report.full_text})
        captions = report.image_captions or (None,) * len(report.image_ids)
        for image_id, caption in zip(report.image_ids, captions):
            if image_id in image_study:
                raise DatasetError(f"{where}: image '{image_id}' is also listed by study '{image_study[image_id]}'; "
                                   "an image must belong to one report")
            image_study[image_id] = report.uid
            view = view_from_caption(caption)
            views[view or "unknown"] += 1
            images.append({"image_id": image_id, "study_id": report.uid,
                           "path": str(image_dir / f"{image_id}{IMAGE_SUFFIX}"), "view": view})

        study = map_study_terms(report.mesh_major, mesh_map, vocabulary)
        statuses[study.status] += 1
        for term, m in study.terms:
            kinds[m.kind] += 1
            if m.kind == "unmapped":
                unmapped[term] += 1
            elif m.kind == "ignored":
                ignored[term] += 1
        if study.status == "findings":
            rows.extend({"study_id": report.uid, "category": m.category, "severity": m.severity,
                         "location": m.location} for _, m in study.findings)
        elif study.status == "normal":
            rows.append({"study_id": report.uid, "category": NO_FINDING})

    warning = ("Open-i has no patient ids: every study is taken as its own patient, so one patient's "
               "studies may land in different splits")
    log.warning(warning)
    notes = {
        "warnings": [warning],
        "one_patient_per_study": True,
        "reports_from": str(source),
        "image_views": dict(sorted(views.items())),
        "mesh_map": str(mesh_map.path),
        "mesh_terms": dict(sorted(kinds.items())),
        "n_studies_with_mesh_findings": statuses["findings"],
        "n_studies_mesh_normal": statuses["normal"],
        # No reference row: evaluation would read these studies as "no finding".
        "n_studies_not_indexed": statuses["not_indexed"],
        "n_studies_no_mapped_mesh": statuses["no_mapped_tag"],
        "mesh_unmapped_terms": dict(sorted(unmapped.items(), key=lambda kv: (-kv[1], kv[0]))[:_TOP_TERMS]),
        "n_mesh_unmapped_distinct": len(unmapped),
        "labels_without_counterpart": dict(sorted(ignored.items(), key=lambda kv: (-kv[1], kv[0]))[:_TOP_TERMS]),
    }
    string = pa.string()
    study_table = pa.Table.from_pylist(
        studies, schema=pa.schema([("study_id", string), ("patient_id", string), ("report", string)]))
    image_table = pa.Table.from_pylist(
        images, schema=pa.schema([("image_id", string), ("study_id", string), ("path", string), ("view", string)]))
    return ImportedDataset(studies=study_table, images=image_table, reference=reference_table(rows), notes=notes)
