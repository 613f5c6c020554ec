"""The phantom benchmark re-published in NIH ChestX-ray14's layout: an evaluation set that runs
through the real ``nih14`` importer and ``evaluate-extra`` on any machine.

Real evaluation sets cannot ship with the project, so this stage writes the phantom's images
and ground truth the way NIH distributes ChestX-ray14: ``Data_Entry_2017_v2020.csv`` (its
header, ``|``-separated ``Finding Labels``), ``train_val_list.txt`` / ``test_list.txt`` and
``images_NNN/images/<patient>_<follow-up>.png``. Labels are the phantom's rendered findings
in NIH's names (the inverse of ``data/datasets/nih14.yaml``); findings NIH has no label for
(support devices) are left out as NIH leaves them out, and a study with no NIH label is "No
Finding". Studies with an unseen class (covid-19), which NIH cannot name, are not published.
The phantom's test patients form ``test_list.txt``, so the trained model is scored on images
it never saw.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from medfilip.data.importers import DatasetError

NIH14_MAP = Path(__file__).resolve().parents[2] / "data" / "datasets" / "nih14.yaml"
HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
IMAGES_PER_FOLDER = 10_000  # NIH: images_001 ... images_012, ~10k PNGs each
UNPUBLISHED = frozenset({"covid-19"})


def nih_names(map_path: Path = NIH14_MAP) -> dict[str, str]:
    """Our category -> NIH's label name (the first NIH name mapping to it)."""
    labels = (yaml.safe_load(Path(map_path).read_text()) or {}).get("labels") or {}
    inverse: dict[str, str] = {}
    for nih, target in labels.items():
        category = target.get("category") if isinstance(target, dict) else target
        if category and category != "no finding":
            inverse.setdefault(category, str(nih))
    return inverse


def write_phantom_nih14(phantom_root: Path, out: Path) -> dict:
    """Write the phantom under ``out`` in NIH ChestX-ray14's layout; return counts."""
    phantom_root, out = Path(phantom_root), Path(out)
    studies_path = phantom_root / "studies.parquet"
    if not studies_path.is_file():
        raise DatasetError(f"{studies_path}: phantom dataset not found; run `dvc repro synthesize`")
    studies = pq.read_table(studies_path, columns=["study_id", "patient_id", "split", "path", "view"]).to_pylist()
    truth = pq.read_table(phantom_root / "truth.parquet", columns=["study_id", "category"]).to_pylist()
    names = nih_names()
    categories: dict[str, set[str]] = {}
    for row in truth:
        categories.setdefault(row["study_id"], set()).add(row["category"])

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    patient_number = {p: k + 1 for k, p in enumerate(sorted({s["patient_id"] for s in studies}))}
    follow_up: dict[str, int] = {}
    lines, test, train_val = [HEADER], [], []
    n_left_out = n_no_finding = 0
    for s in sorted(studies, key=lambda r: (patient_number[r["patient_id"]], r["study_id"])):
        found = categories.get(s["study_id"], set())
        if found & UNPUBLISHED:
            n_left_out += 1
            continue
        nih = sorted({names[c] for c in found if c in names})
        n_no_finding += not nih
        number = patient_number[s["patient_id"]]
        k = follow_up[s["patient_id"]] = follow_up.get(s["patient_id"], -1) + 1
        image = f"{number:08d}_{k:03d}.png"
        folder = out / f"images_{1 + (len(lines) - 1) // IMAGES_PER_FOLDER:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(phantom_root / s["path"], folder / image)
        age, sex = 40 + number % 40, "MF"[number % 2]
        lines.append(f"{image},{'|'.join(nih) or 'No Finding'},{k},{number},{age},{sex},{s['view'] or 'PA'},"
                     "256,256,0.143,0.143")
        (test if s["split"] == "test" else train_val).append(image)
    (out / "Data_Entry_2017_v2020.csv").write_text("\n".join(lines) + "\n")
    (out / "test_list.txt").write_text("\n".join(test) + "\n")
    (out / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    return {"n_images": len(lines) - 1, "n_test": len(test), "n_train_val": len(train_val),
            "n_no_finding": n_no_finding, "n_left_out_unseen_class": n_left_out}
