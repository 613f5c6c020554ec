"""CheXpert evaluation sets in Stanford's exact layout, for tests.

``write_chexpert(parent)`` writes ``parent/CheXpert-v1.0-small/valid.csv`` (the v1.0
header; ``Path`` relative to ``parent``: ``CheXpert-v1.0-small/valid/patient64541/...``),
the images under ``valid/``, and, when asked, the CheXlocalize test set as its release
ships it: ``test_labels.csv`` (``Path`` + the 14 labels, 0/1 integers; ``Path`` relative
to the dataset folder: ``test/patient64741/...``) with the images under ``test/``.
Images are 8x8 JPEGs; patients, ages and labels are made up.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from medfilip.testing.mimic_layout import tiny_jpeg

LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
)
VALID_HEADER = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *LABELS)
TEST_HEADER = ("Path", *LABELS)


@dataclass(frozen=True)
class CheXpertImage:
    patient: int  # patientNNNNN
    study: int  # studyN
    view: int  # viewN
    frontal: bool
    ap_pa: str = "AP"  # the AP/PA column of a frontal image ("" for a lateral)
    labels: dict[str, str] = field(default_factory=dict)  # label -> cell as the file writes it

    def rel(self, split_folder: str) -> str:
        kind = "frontal" if self.frontal else "lateral"
        return f"{split_folder}/patient{self.patient}/study{self.study}/view{self.view}_{kind}.jpg"

    @property
    def study_id(self) -> str:
        return f"patient{self.patient}/study{self.study}"


def tiny_valid() -> list[CheXpertImage]:
    """valid.csv rows: a frontal+lateral study, an uncertain label, a lateral-only study (float cells)."""
    both = {"Cardiomegaly": "1.0", "Edema": "-1.0", "Pleural Effusion": "0.0", "Support Devices": "1.0"}
    return [
        CheXpertImage(64541, 1, 1, True, "AP", both),
        CheXpertImage(64541, 1, 2, False, "", both),
        CheXpertImage(64542, 1, 1, True, "PA", {"No Finding": "1.0", "Pneumonia": ""}),
        CheXpertImage(64543, 1, 1, False, "", {"Fracture": "1.0"}),
        CheXpertImage(64544, 1, 1, True, "AP", {"Lung Lesion": "1.0", "Pleural Other": "1.0",
                                                "Enlarged Cardiomediastinum": "0.0"}),
    ]


def tiny_test() -> list[CheXpertImage]:
    """test_labels.csv rows (0/1 integer cells, no view columns): one with a lateral beside it."""
    return [
        CheXpertImage(64741, 1, 1, True, "", {"Atelectasis": "1", "Consolidation": "0", "Pneumonia": "1"}),
        CheXpertImage(64742, 1, 1, True, "", {"No Finding": "1"}),
        CheXpertImage(64742, 1, 2, False, "", {"No Finding": "1"}),
    ]


def _write_images(root: Path, rels: list[str], image: bytes) -> None:
    for rel in rels:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image)


def write_chexpert(parent: Path, valid: Optional[list[CheXpertImage]] = None,
                   test: Optional[list[CheXpertImage]] = None, *, folder: str = "CheXpert-v1.0-small",
                   with_test: bool = False) -> Path:
    """Write the dataset folder ``parent/folder`` (valid.csv + valid/, and test_labels.csv + test/
    when ``with_test`` or ``test`` is given); returns the folder (what data.root points at)."""
    root = Path(parent) / folder
    root.mkdir(parents=True, exist_ok=True)
    image = tiny_jpeg()
    valid = tiny_valid() if valid is None else valid
    with open(root / "valid.csv", "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(VALID_HEADER)
        for i, im in enumerate(valid):
            writer.writerow((f"{folder}/{im.rel('valid')}", "Female" if i % 2 else "Male", 40 + i,
                             "Frontal" if im.frontal else "Lateral", im.ap_pa if im.frontal else "",
                             *(im.labels.get(n, "0.0") for n in LABELS)))
    _write_images(root, [im.rel("valid") for im in valid], image)
    if test is None and with_test:
        test = tiny_test()
    if test is not None:
        with open(root / "test_labels.csv", "w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(TEST_HEADER)
            for im in test:
                writer.writerow((im.rel("test"), *(im.labels.get(n, "0") for n in LABELS)))
        _write_images(root, [im.rel("test") for im in test], image)
    return root
