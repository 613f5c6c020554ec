"""Ground truth for evaluation: per image, which classes are present (never from a negation).

On the phantom it comes from ``truth.parquet`` (what was rendered), not from the
extractor; a study with no rendered finding is "no finding". On other datasets it comes
from their own labels; without any, from ``labels.parquet`` (the extractor), and the
reports say so. ``train.uncertain`` applies to uncertain truth: positive counts it,
negative does not, ignore leaves the (image, class) pair out of that class's metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

NORMAL = "no finding"


@dataclass
class Truth:
    """(N, C) labels of ``image_ids`` over ``classes``; ``known`` False marks ignored pairs."""

    image_ids: list[str]
    study_ids: list[str]
    split: np.ndarray  # (N,) object
    classes: list[str]
    labels: np.ndarray  # (N, C) bool
    known: np.ndarray  # (N, C) bool
    severity: dict  # (image index, class) -> severity of that finding (fine-grained task)
    source: str  # "truth.parquet" | "labels.parquet (extractor)"

    def select(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def column(self, name: str) -> int:
        return self.classes.index(name)


def build_truth(images: pa.Table, studies: pa.Table, findings: pa.Table, classes: Sequence[str], *,
                uncertain: str = "positive", source: str = "truth.parquet") -> Truth:
    """Labels per image from per-study finding rows (``study_id, category[, severity, uncertain, negated]``).

    A study without a positive finding row is labelled "no finding" (when that is a class).
    """
    classes = list(classes)
    col = {c: i for i, c in enumerate(classes)}
    study_split = dict(zip(studies.column("study_id").to_pylist(), studies.column("split").to_pylist()))
    image_ids = images.column("image_id").to_pylist()
    image_study = images.column("study_id").to_pylist()
    rows_of_study: dict[str, list[int]] = {}
    for i, s in enumerate(image_study):
        rows_of_study.setdefault(s, []).append(i)

    n, c = len(image_ids), len(classes)
    labels = np.zeros((n, c), dtype=bool)
    known = np.ones((n, c), dtype=bool)
    severity: dict = {}
    has_finding = np.zeros(n, dtype=bool)
    names = findings.column_names
    for row in findings.to_pylist():
        if row.get("negated") if "negated" in names else False:
            continue  # a negated finding is never a positive
        rows = rows_of_study.get(row["study_id"], [])
        if not rows:
            continue
        has_finding[rows] = True
        j = col.get(row["category"])
        if j is None:
            continue
        if row.get("uncertain") if "uncertain" in names else False:
            if uncertain == "negative":
                continue
            if uncertain == "ignore":
                known[rows, j] = False
                continue
        labels[rows, j] = True
        if row.get("severity"):
            for r in rows:
                severity[(r, classes[j])] = row["severity"]
    if NORMAL in col:
        labels[~has_finding, col[NORMAL]] = True
    labels &= known
    return Truth(image_ids=image_ids, study_ids=image_study,
                 split=np.array([study_split.get(s) for s in image_study], dtype=object),
                 classes=classes, labels=labels, known=known, severity=severity, source=source)


def load_truth(data_root: Path, interim: Path, processed: Path, classes: Sequence[str], *,
               uncertain: str) -> Truth:
    """Truth for the pipeline's dataset: ``<data.root>/truth.parquet`` if the dataset has one,
    else the extractor's labels (``labels.parquet``)."""
    images, studies = pq.read_table(interim / "images.parquet"), pq.read_table(interim / "studies.parquet")
    truth_file = Path(data_root) / "truth.parquet"
    if truth_file.is_file():
        return build_truth(images, studies, pq.read_table(truth_file), classes, uncertain=uncertain)
    labels = pq.read_table(processed / "labels.parquet")
    findings = labels.rename_columns(["category" if n == "category_norm" else
                                      "severity" if n == "severity_norm" else n for n in labels.column_names])
    return build_truth(images, studies, findings, classes, uncertain=uncertain,
                       source="labels.parquet (extractor)")


def truth_classes(data_root: Path, seen: Sequence[str]) -> Optional[list[str]]:
    """The seen classes a dataset's truth can score: the truth's categories that are seen classes, plus normal."""
    truth_file = Path(data_root) / "truth.parquet"
    if not truth_file.is_file():
        return None
    present = set(pq.read_table(truth_file, columns=["category"]).column("category").to_pylist())
    return [c for c in seen if c in present or c == NORMAL]
