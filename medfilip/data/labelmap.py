"""A dataset's label names -> our vocabulary, read from a data file (``data/datasets/<source>.yaml``).

Each evaluation set names its findings its own way (CheXpert "Support Devices", NIH
"Effusion", VinDr "Aortic enlargement", the COVID set's folder "Viral Pneumonia"). The
mapping is data, not code, so a researcher can read and change it::

    labels:
      Effusion: pleural effusion           # one category
      Nodule: {category: nodule}           # the same, spelled out (severity / location optional)
      Hernia: hiatal hernia
      Other lesion: null                   # no counterpart: rows with it are dropped and counted

Every category must be a vocabulary category or an unseen class of the knowledge
dictionary; an unknown label in the data is an error naming the file and the label.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from medfilip.data.importers import DatasetError

LABEL_MAP_DIR = Path(__file__).resolve().parents[2] / "data" / "datasets"
DICTIONARY = Path(__file__).resolve().parents[2] / "data" / "knowledge" / "dictionary.yaml"
VOCABULARY = Path(__file__).resolve().parents[2] / "data" / "knowledge" / "vocabulary.yaml"


@dataclass(frozen=True)
class Target:
    """What one dataset label means in our terms."""

    category: str
    severity: Optional[str] = None
    location: Optional[str] = None


@dataclass
class LabelMap:
    path: Path
    targets: dict[str, Optional[Target]]
    unmapped: Counter = field(default_factory=Counter)  # labels with no counterpart (null), as met

    def get(self, label: str) -> Optional[Target]:
        """The target of ``label`` (None for a label mapped to null); an unknown label is an error."""
        key = label.strip()
        if key not in self.targets:
            raise DatasetError(
                f"{self.path}: the dataset has a label '{key}' that this file does not map; add it under "
                "'labels:' (a vocabulary category, or null to leave it out)"
            )
        target = self.targets[key]
        if target is None:
            self.unmapped[key] += 1
        return target


def known_categories(vocabulary: Path = VOCABULARY, dictionary: Path = DICTIONARY) -> set[str]:
    """Vocabulary categories plus the dictionary's unseen classes: what a label may map to."""
    vocab = yaml.safe_load(Path(vocabulary).read_text()) or {}
    know = yaml.safe_load(Path(dictionary).read_text()) or {}
    return set(vocab.get("categories") or {}) | set(know.get("unseen") or {})


def load_label_map(name_or_path: str | Path, *, categories: Optional[set[str]] = None) -> LabelMap:
    """Read ``data/datasets/<name>.yaml`` (or a path) and check every target against the vocabulary."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = LABEL_MAP_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise DatasetError(f"{path}: label map not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path}: not valid YAML: {exc}") from exc
    labels = raw.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise DatasetError(f"{path}: needs a non-empty 'labels:' mapping of dataset label -> category")
    allowed = known_categories() if categories is None else categories
    targets: dict[str, Optional[Target]] = {}
    for label, value in labels.items():
        where = f"{path}: labels.{label}"
        if value is None:
            targets[str(label).strip()] = None
            continue
        if isinstance(value, str):
            value = {"category": value}
        if not isinstance(value, dict) or set(value) - {"category", "severity", "location"} or "category" not in value:
            raise DatasetError(f"{where} must be a category, null, or {{category, severity?, location?}}")
        if value["category"] not in allowed:
            raise DatasetError(f"{where}: '{value['category']}' is not a vocabulary category or unseen class "
                               "(data/knowledge/vocabulary.yaml, dictionary.yaml)")
        targets[str(label).strip()] = Target(value["category"], value.get("severity"), value.get("location"))
    return LabelMap(path=path, targets=targets)
