"""A tiny NIH ChestX-ray14 tree in the published layout, for tests and benchmarks.

File names, CSV headers (including their odd splitting) and folder depth follow the NIH Box
download; the images are 8x8 grey PNGs and the rows are made up.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# (Image Index, Finding Labels, Patient ID, View Position): patients 1-8 are in
# train_val_list.txt, 9-12 in test_list.txt, as the official lists keep each patient in one.
NIH14_ROWS = [
    ("00000001_000.png", "Cardiomegaly", "1", "PA"),
    ("00000001_001.png", "Cardiomegaly|Emphysema", "1", "PA"),
    ("00000001_002.png", "Cardiomegaly|Effusion", "1", "AP"),
    ("00000002_000.png", "No Finding", "2", "PA"),
    ("00000003_000.png", "Hernia", "3", "PA"),
    ("00000003_001.png", "Hernia|Infiltration", "3", "AP"),
    ("00000004_000.png", "Mass|Nodule|Pleural_Thickening", "4", "PA"),
    ("00000005_000.png", "Atelectasis|Consolidation|Edema", "5", "AP"),
    ("00000006_000.png", "No Finding", "6", "PA"),
    ("00000007_000.png", "Fibrosis", "7", "PA"),
    ("00000008_000.png", "Pneumothorax", "8", "AP"),
    ("00000009_000.png", "Pneumonia|Infiltration", "9", "AP"),
    ("00000009_001.png", "No Finding", "9", "PA"),
    ("00000010_000.png", "Effusion|Atelectasis", "10", "PA"),
    ("00000011_000.png", "No Finding", "11", "PA"),
    ("00000012_000.png", "Nodule", "12", "PA"),
]
TEST_PATIENTS = {"9", "10", "11", "12"}
# BBox_List_2017.csv rows: (Image Index, Finding Label, x, y, w, h); it says "Infiltrate".
NIH14_BOXES = [
    ("00000001_002.png", "Effusion", 225.084745762712, 547.019216763771, 86.7796610169491, 79.1864406779661),
    ("00000009_000.png", "Infiltrate", 686.101694915254, 131.543498411017, 185.491525423729, 313.491525423729),
    ("00000010_000.png", "Atelectasis", 221.830508474576, 317.053769862288, 155.118644067797, 216.949152542373),
]

_HEADER_2020 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")


def write_nih14(folder: Path, *, revision: str = "2020", flat: bool = False, lists: bool = True,
                bbox: bool = True, rows=NIH14_ROWS) -> Path:
    """Write the tree under ``folder`` and return it (the ``data.root`` to use).

    ``revision`` "2020" writes Data_Entry_2017_v2020.csv (ages in years), "2017" the original
    Data_Entry_2017.csv (ages like "058Y", a trailing empty column). ``flat`` puts every PNG in
    ``images/`` instead of ``images_001/images``, ``images_002/images``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [_HEADER_2020 + ("," if revision == "2017" else "")]
    follow_up: dict[str, int] = {}
    for image, labels, patient, view in rows:
        n = follow_up[patient] = follow_up.get(patient, -1) + 1
        age = 30 + 3 * int(patient or 0)
        cells = [image, labels, str(n), patient, f"{age:03d}Y" if revision == "2017" else str(age),
                 "MF"[int(patient or 0) % 2], view, "2500", "2048", "0.168", "0.168"]
        lines.append(",".join(cells) + ("," if revision == "2017" else ""))
    name = "Data_Entry_2017_v2020.csv" if revision == "2020" else "Data_Entry_2017.csv"
    (folder / name).write_text("\n".join(lines) + "\n")

    if lists:
        test = [r[0] for r in rows if r[2] in TEST_PATIENTS]
        train_val = [r[0] for r in rows if r[2] not in TEST_PATIENTS]
        (folder / "test_list.txt").write_text("\n".join(test) + "\n")
        (folder / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    if bbox:
        box_lines = ["Image Index,Finding Label,Bbox [x,y,w,h],,,"]
        box_lines += [f"{image},{label},{x},{y},{w},{h},,," for image, label, x, y, w, h in NIH14_BOXES]
        (folder / "BBox_List_2017.csv").write_text("\n".join(box_lines) + "\n")

    rng = np.random.default_rng(14)
    half = (len(rows) + 1) // 2
    for i, (image, *_rest) in enumerate(rows):
        sub = folder / "images" if flat else folder / f"images_{1 + (i >= half):03d}" / "images"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(sub / image)
    return folder
