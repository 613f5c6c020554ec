"""MIMIC-CXR-JPG v2 trees in PhysioNet's exact layout, for tests and the import benchmark.

Everything written is synthetic: ids are made up, images are 8x8 JPEGs (or zero-byte
placeholders), and the report text is assembled from a few sentences written for this
module. The layout is the distributed one: the three ``mimic-cxr-2.0.0-*.csv.gz`` files
with their headers, ``files/pXX/pNNNNNNNN/sNNNNNNNN/<dicom_id>.jpg`` and the reports of
MIMIC-CXR beside each study folder (``.../sNNNNNNNN.txt``) and/or in ``mimic-cxr-reports.zip``.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import random
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Optional

METADATA_HEADER = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
    "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
SPLIT_HEADER = ("dicom_id", "study_id", "subject_id", "split")
CHEXPERT_HEADER = (
    "subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)
_VIEW_MEANING = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral", "LL": "left lateral"}
# Synthetic sentences (written for these fixtures) per CheXpert label, used when a label is positive.
_SENTENCES = {
    "Atelectasis": "Streaky opacity at the left base likely reflects atelectasis.",
    "Cardiomegaly": "The cardiac silhouette is enlarged.",
    "Consolidation": "Dense consolidation is present in the right lower lobe.",
    "Edema": "Vascular congestion with mild interstitial edema.",
    "Enlarged Cardiomediastinum": "The cardiomediastinal contour is widened.",
    "Fracture": "An old healed fracture of a left rib is seen.",
    "Lung Lesion": "A rounded lesion projects over the right upper zone.",
    "Lung Opacity": "Patchy opacity in the left mid lung.",
    "Pleural Effusion": "Small right pleural effusion.",
    "Pleural Other": "Mild pleural thickening along the left apex.",
    "Pneumonia": "Findings could represent pneumonia in the appropriate clinical setting.",
    "Pneumothorax": "A small apical pneumothorax is present on the right.",
    "Support Devices": "A central venous catheter ends in the lower superior vena cava.",
}


@dataclass(frozen=True)
class MimicImage:
    dicom_id: str
    view: str  # ViewPosition as the metadata spells it: PA, AP, LATERAL, LL, or "" (not recorded)


@dataclass
class MimicStudy:
    subject_id: int  # 8 digits, 10000000-19999999
    study_id: int  # 8 digits
    images: tuple[MimicImage, ...]
    split: str = "train"  # the split file's value: train / validate / test
    report: Optional[str] = ""  # "" builds one from the labels; None: the study has no report file
    labels: dict[str, str] = field(default_factory=dict)  # CheXpert column -> cell ("1.0", "-1.0", "0.0")
    label_row: bool = True  # False: the study has no row in the CheXpert label file

    @property
    def report_path(self) -> str:
        s = str(self.subject_id)
        return f"files/p{s[:2]}/p{s}/s{self.study_id}.txt"

    def image_path(self, image: MimicImage) -> str:
        s = str(self.subject_id)
        return f"files/p{s[:2]}/p{s}/s{self.study_id}/{image.dicom_id}.jpg"

    def report_text(self) -> Optional[str]:
        if self.report is None:
            return None
        return self.report or synthetic_report(self.labels)


def dicom_id(*key: object) -> str:
    """A made-up dicom_id in MIMIC-CXR-JPG's shape: five dash-separated 8-hex-digit groups."""
    h = hashlib.blake2b(repr(key).encode(), digest_size=20).hexdigest()
    return "-".join(h[i:i + 8] for i in range(0, 40, 8))


def synthetic_report(labels: dict[str, str]) -> str:
    """A report in the sectioned free-text shape of the reports, naming the positive labels."""
    positive = [name for name, cell in labels.items() if cell.strip() in ("1", "1.0") and name in _SENTENCES]
    uncertain = [name for name, cell in labels.items() if cell.strip() in ("-1", "-1.0") and name in _SENTENCES]
    findings = " ".join(_SENTENCES[n] for n in positive) or "Lungs are clear. Heart size is normal."
    if uncertain:
        findings += " Possible " + ", ".join(n.lower() for n in uncertain) + " cannot be excluded."
    impression = "No acute cardiopulmonary process." if not positive else f"{positive[0]}, as described above."
    return ("                                 FINAL REPORT\n"
            " EXAMINATION:  CHEST RADIOGRAPH\n \n"
            " INDICATION:  Synthetic study written for software tests.\n \n"
            f" FINDINGS:  {findings}\n \n"
            f" IMPRESSION:  {impression}\n")


def tiny_jpeg() -> bytes:
    """An 8x8 grayscale JPEG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8), 96).save(buf, format="JPEG")
    return buf.getvalue()


def tiny_mimic_studies() -> list[MimicStudy]:
    """A handful of studies covering every case the importer distinguishes (see the comments)."""
    d = dicom_id
    return [
        # PA + lateral; No Finding positive
        MimicStudy(10000032, 50414267, (MimicImage(d(1), "PA"), MimicImage(d(2), "LATERAL")),
                   labels={"No Finding": "1.0"}),
        # AP only, same patient; positive, uncertain and negative cells
        MimicStudy(10000032, 53189527, (MimicImage(d(3), "AP"),),
                   labels={"Pleural Effusion": "1.0", "Edema": "-1.0", "Pneumothorax": "0.0"}),
        # lateral only: dropped (no frontal image), its label row left out
        MimicStudy(10000764, 57375967, (MimicImage(d(4), "LATERAL"),), split="validate",
                   labels={"Pneumonia": "1.0"}),
        # PA + LL in the validate split; uncertain consolidation, a support device
        MimicStudy(10000764, 50771383, (MimicImage(d(5), "PA"), MimicImage(d(6), "LL")), split="validate",
                   labels={"Consolidation": "-1.0", "Support Devices": "1.0"}),
        # no report file: dropped
        MimicStudy(10000898, 50771384, (MimicImage(d(7), "PA"),), split="test", report=None,
                   labels={"Fracture": "1.0"}),
        # two frontal images, a lateral and one without a ViewPosition, in the test split
        MimicStudy(11000011, 51234567, (MimicImage(d(8), "PA"), MimicImage(d(9), "AP"), MimicImage(d(10), "LATERAL"),
                                        MimicImage(d(11), "")), split="test",
                   labels={"Atelectasis": "1.0", "Lung Opacity": "0.0"}),
        # no row in the label file
        MimicStudy(12000002, 52000001, (MimicImage(d(12), "AP"),), label_row=False),
    ]


def synthetic_mimic_studies(n_studies: int, seed: int = 0) -> list[MimicStudy]:
    """``n_studies`` studies shaped like MIMIC-CXR-JPG: ~3.5 studies per patient, ~1.7 images per study
    (a frontal view, often a lateral, sometimes two frontals), about 5 % lateral-only, split by patient."""
    rng = random.Random(seed)
    labels = [h for h in CHEXPERT_HEADER[2:]]
    n_subjects = max(1, round(n_studies / 3.5))
    step = max(1, 9_000_000 // n_subjects)
    studies = []
    for i in range(n_studies):
        k = i * n_subjects // n_studies
        subject = 10_000_000 + k * step
        h = hashlib.blake2b(str(subject).encode(), digest_size=2).digest()[0]
        split = "test" if h < 5 else "validate" if h < 8 else "train"  # ~2 % / ~1 % like the official split
        roll = rng.random()
        if roll < 0.05:
            views = ["LATERAL"]
        elif roll < 0.65:
            views = [rng.choice(("PA", "AP")), rng.choice(("LATERAL", "LATERAL", "LL"))]
        elif roll < 0.72:
            views = ["AP", "AP"]
        else:
            views = [rng.choice(("PA", "AP", "AP"))]
        cells = {}
        for name in rng.sample(labels, rng.randint(0, 4)):
            cells[name] = rng.choice(("1.0", "1.0", "0.0", "-1.0"))
        images = tuple(MimicImage(dicom_id(seed, i, j), v) for j, v in enumerate(views))
        studies.append(MimicStudy(subject, 50_000_000 + i, images, split=split, labels=cells))
    return studies


def _gz_csv(path: Path, header: Iterable[str], rows: Iterable[Iterable[object]]) -> None:
    # mtime=0: the same studies give the same bytes
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        with io.TextIOWrapper(gz, encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)


def write_mimic_cxr(root: Path, studies: Optional[list[MimicStudy]] = None, *,
                    reports: Literal["tree", "zip", "both", "none"] = "tree",
                    orphan_reports: Iterable[tuple[int, int]] = ((19999999, 59999999),),
                    image_bytes: Optional[bytes] = None, threads: int = 8) -> Path:
    """Write a MIMIC-CXR-JPG tree under ``root`` and return it.

    ``reports``: unzipped beside the study folders, in ``mimic-cxr-reports.zip``, both, or not at
    all. ``orphan_reports``: (subject, study) pairs given a report file but no metadata row.
    ``image_bytes``: the bytes of every image (default an 8x8 JPEG; ``b""`` writes zero-byte
    placeholders, enough for an importer that never opens them).
    """
    root = Path(root)
    studies = tiny_mimic_studies() if studies is None else studies
    image = tiny_jpeg() if image_bytes is None else image_bytes
    root.mkdir(parents=True, exist_ok=True)
    meta_rows, split_rows, label_rows = [], [], []
    for st in studies:
        for im in st.images:
            meta_rows.append((im.dicom_id, st.subject_id, st.study_id, "CHEST (PA AND LAT)", im.view, 3056, 2544,
                              21800506, "213014.531", "CHEST (PA AND LAT)", _VIEW_MEANING.get(im.view, ""), "Erect"))
            split_rows.append((im.dicom_id, st.study_id, st.subject_id, st.split))
        if st.label_row:
            label_rows.append((st.subject_id, st.study_id, *(st.labels.get(n, "") for n in CHEXPERT_HEADER[2:])))
    label_rows.sort(key=lambda r: (r[0], r[1]))
    _gz_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", METADATA_HEADER, meta_rows)
    _gz_csv(root / "mimic-cxr-2.0.0-split.csv.gz", SPLIT_HEADER, split_rows)
    _gz_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", CHEXPERT_HEADER, label_rows)

    texts = [(st.report_path, st.report_text()) for st in studies]
    texts = [(p, t) for p, t in texts if t is not None]
    for subject, study in orphan_reports:
        orphan = MimicStudy(subject, study, ())
        texts.append((orphan.report_path, synthetic_report({})))

    def write_study(st: MimicStudy) -> None:
        folder = root / st.report_path[:-4]
        folder.mkdir(parents=True, exist_ok=True)
        for im in st.images:
            (folder / f"{im.dicom_id}.jpg").write_bytes(image)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(pool.map(write_study, studies, chunksize=64))
        if reports in ("tree", "both"):
            def write_report(item: tuple[str, str]) -> None:
                path = root / item[0]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(item[1])

            list(pool.map(write_report, texts, chunksize=64))
    if reports in ("zip", "both"):
        with zipfile.ZipFile(root / "mimic-cxr-reports.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for rel, text in sorted(texts):
                zf.writestr(zipfile.ZipInfo(rel, date_time=(2019, 1, 1, 0, 0, 0)), text,
                            compress_type=zipfile.ZIP_DEFLATED)
    return root


def remove_tree_reports(root: Path) -> int:
    """Delete the unzipped report files (keeping the zip): the zip-only layout. Returns how many."""
    n = 0
    for dirpath, _, names in os.walk(Path(root) / "files"):
        for name in names:
            if name.endswith(".txt"):
                os.remove(os.path.join(dirpath, name))
                n += 1
    return n
