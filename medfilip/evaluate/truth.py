"""Ground truth for evaluation: per image, which classes are present (never from a negation).

It comes from the dataset's own labels, which ingest writes to ``reference.parquet``
(the phantom: what was rendered, not what the extractor read; Open-i: its MeSH tags;
evaluation sets: their label files). There "no finding" is a label like any other: a study
is normal only where the dataset says so (an explicit "no finding" row), because many sets
label one finding only (SIIM: pneumothorax or not) and "no pneumothorax" is not "normal".
A set that never says "no finding" is not scored on it. A dataset without labels of its own
is scored against ``labels.parquet`` (the extractor), where a study with no positive
finding is "no finding", and the reports say so. ``train.uncertain`` applies to uncertain truth: positive counts it,
negative does not, ignore leaves the (image, class) pair out of that class's metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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
                uncertain: str = "positive", source: str = "reference.parquet",
                derive_normal: bool = True) -> Truth:
    """Labels per image from per-study finding rows (``study_id, category[, severity, uncertain, negated]``).

    ``derive_normal``: a study without a positive finding row is labelled "no finding" (when that is
    a class). Without it only an explicit "no finding" row makes a study normal.
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
        rows = rows_of_study.get(row["study_id"], [])
        if not rows:
            continue
        if row.get("negated") if "negated" in names else False:
            if row["category"] == NORMAL:
                has_finding[rows] = True  # the dataset says "not normal" without naming a finding (RSNA)
            continue  # a negated finding is never a positive
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
    if NORMAL in col and derive_normal:
        labels[~has_finding, col[NORMAL]] = True
    if not derive_normal:
        # A dataset that states "no finding" labels every study it read; a study with no row at
        # all was not read (Open-i "No Indexing", an unmapped tag): unknown, never a negative.
        labelled = set(findings.column("study_id").to_pylist())
        for s, rows in rows_of_study.items():
            if s not in labelled:
                known[rows, :] = False
    labels &= known
    return Truth(image_ids=image_ids, study_ids=image_study,
                 split=np.array([study_split.get(s) for s in image_study], dtype=object),
                 classes=classes, labels=labels, known=known, severity=severity, source=source)


def reference(interim: Path) -> Optional[pa.Table]:
    """The dataset's own labels (ingest's ``reference.parquet``), or None when it has none."""
    path = Path(interim) / "reference.parquet"
    if not path.is_file():
        return None
    table = pq.read_table(path)
    return table if table.num_rows else None


def load_truth(interim: Path, processed: Path, classes: Sequence[str], *, uncertain: str) -> Truth:
    """Truth for an ingested dataset: its reference labels if it has any, else the extractor's labels."""
    images, studies = pq.read_table(interim / "images.parquet"), pq.read_table(interim / "studies.parquet")
    ref = reference(interim)
    if ref is not None:
        return build_truth(images, studies, ref, classes, uncertain=uncertain, derive_normal=False)
    labels = pq.read_table(processed / "labels.parquet")
    findings = labels.rename_columns(["category" if n == "category_norm" else
                                      "severity" if n == "severity_norm" else n for n in labels.column_names])
    return build_truth(images, studies, findings, classes, uncertain=uncertain,
                       source="labels.parquet (extractor)")


def truth_classes(interim: Path, seen: Sequence[str]) -> Optional[list[str]]:
    """The seen classes a dataset's reference labels can score: its positive categories that are seen
    ("no finding" only where the dataset says it)."""
    ref = reference(interim)
    if ref is None:
        return None
    positive = ref.filter(pc.invert(ref["negated"])) if "negated" in ref.column_names else ref
    present = set(positive.column("category").to_pylist())
    return [c for c in seen if c in present]
