"""A tiny VinDr-CXR tree in the PhysioNet layout (annotations/*.csv, train|test/<image_id>.dicom).

The images are 8x8 DICOMs as VinDr ships them: 16-bit words holding 12-14 stored bits,
MONOCHROME1 and MONOCHROME2, one RLE Lossless-compressed, so the ``pixels`` stage decodes
them through the same path as the real files. :func:`write_dicom` is reused by the DICOM
decoding tests.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

# Column order of image_labels_*.csv in the release: 22 local (boxed) labels, then 6 global ones.
LOCAL_LABELS = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture", "Consolidation",
    "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity", "Lung cavity", "Lung cyst",
    "Mediastinal shift", "Nodule/Mass", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis", "Rib fracture", "Other lesion",
)
GLOBAL_LABELS = ("COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding")
LABELS = LOCAL_LABELS + GLOBAL_LABELS
BOX_HEADER = ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"]

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage


def vindr_id(name: str) -> str:
    """A VinDr-style image id (32 hex digits) for a readable fixture name."""
    return hashlib.md5(name.encode()).hexdigest()


# image -> its radiologists' readings (rad_id, labels). Train: three readers each.
TRAIN: dict[str, list[tuple[str, list[str]]]] = {
    vindr_id("heart"): [("R1", ["Cardiomegaly", "Aortic enlargement"]), ("R2", ["Cardiomegaly"]),
                        ("R3", ["No finding"])],
    vindr_id("normal"): [("R1", ["No finding"]), ("R4", ["No finding"]), ("R5", ["No finding"])],
    vindr_id("nodule"): [("R8", ["Nodule/Mass"]), ("R9", ["Nodule/Mass", "Other lesion"]),
                         ("R10", ["Other lesion", "Lung tumor"])],
    vindr_id("copd"): [("R2", ["COPD", "Emphysema", "Rib fracture"]), ("R3", ["COPD", "Rib fracture"]),
                       ("R4", ["No finding"])],
    vindr_id("disagree"): [("R1", ["Pleural effusion"]), ("R2", ["No finding"]), ("R3", ["Pneumothorax"])],
}
# image -> the consensus labels.
TEST: dict[str, list[str]] = {
    vindr_id("test-effusion"): ["Pleural effusion", "Lung Opacity", "Pneumonia"],
    vindr_id("test-normal"): ["No finding"],
    vindr_id("test-clavicle"): ["Clavicle fracture", "Tuberculosis"],
}


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    bits_allocated: int = 16,
    signed: bool = False,
    rle: bool = False,
    sop_class: str = DX_FOR_PRESENTATION,
    stored_words: Optional[np.ndarray] = None,
    **attrs,
) -> Path:
    """Write a single-frame grayscale DICOM (Explicit VR Little Endian, or RLE Lossless), 16-bit by default.

    ``stored_words`` are the raw words to store instead of ``pixels`` (e.g. with garbage
    above Bits Stored); ``attrs`` are extra data elements (WindowCenter=..., RescaleSlope=...).
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX" if sop_class == DX_FOR_PRESENTATION else "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, bits_allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PhotometricInterpretation = photometric
    for key, value in attrs.items():
        setattr(ds, key, value)
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits_allocated // 8}")
    words = stored_words if stored_words is not None else pixels.astype(dtype)
    ds.PixelData = np.ascontiguousarray(words).tobytes()
    if rle:
        ds.compress(RLELossless)
    return save_dicom(ds, path)


def save_dicom(ds, path: Path) -> Path:
    """Write ``ds`` as a DICOM file with its preamble and meta header (pydicom 3 and 2.x)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds.save_as(path, enforce_file_format=True)
    except TypeError:  # pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)
    return path


def _pixels(k: int, bits: int) -> np.ndarray:
    yy, xx = np.mgrid[0:8, 0:8]
    return ((xx * 8 + yy + 5 * k) * ((1 << bits) - 1) // 80).astype(np.uint16)


def _box(k: int) -> list[str]:
    x, y = 10.0 * k + 1.5, 20.0 * k + 2.0  # pixels of the (nominal) original image
    return [f"{x:.1f}", f"{y:.1f}", f"{x + 30.5:.1f}", f"{y + 41.0:.1f}"]


def _write_csv(path: Path, header: Sequence[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def write_vindr(
    root: Path,
    train: Optional[dict[str, list[tuple[str, list[str]]]]] = None,
    test: Optional[dict[str, list[str]]] = None,
    *,
    test_rad_id: bool = False,
) -> Path:
    """Write annotations/, train/ and test/ under ``root`` for ``train`` (readers) and ``test`` (consensus).

    Every local label a reader gives gets one box from that reader; "No finding" gets one
    annotation row with empty coordinates, as in the release. ``test=None`` uses :data:`TEST`;
    ``test={}`` writes no test files at all. ``test_rad_id`` adds an empty rad_id column to the
    test CSVs (the release leaves it out).
    """
    root = Path(root)
    train = TRAIN if train is None else train
    test = TEST if test is None else test
    label_rows, box_rows, k = [], [], 0
    for image_id, readings in train.items():
        for rad_id, labels in readings:
            label_rows.append([image_id, rad_id, *[int(name in labels) for name in LABELS]])
            for name in labels:
                if name == "No finding":
                    box_rows.append([image_id, rad_id, name, "", "", "", ""])
                elif name in LOCAL_LABELS:
                    box_rows.append([image_id, rad_id, name, *_box(k)])
                    k += 1
    ann = root / "annotations"
    _write_csv(ann / "image_labels_train.csv", ["image_id", "rad_id", *LABELS], label_rows)
    _write_csv(ann / "annotations_train.csv", BOX_HEADER, box_rows)
    if test:
        id_cols = ["image_id", "rad_id"] if test_rad_id else ["image_id"]
        rad = [""] if test_rad_id else []
        _write_csv(ann / "image_labels_test.csv", [*id_cols, *LABELS],
                   [[image_id, *rad, *[int(name in labels) for name in LABELS]] for image_id, labels in test.items()])
        rows = []
        for image_id, labels in test.items():
            for name in labels:
                if name == "No finding":
                    rows.append([image_id, *rad, name, "", "", "", ""])
                elif name in LOCAL_LABELS:
                    rows.append([image_id, *rad, name, *_box(k)])
                    k += 1
        _write_csv(ann / "annotations_test.csv", [*id_cols, *BOX_HEADER[2:]], rows)

    for n, (part, image_id) in enumerate([("train", i) for i in train] + [("test", i) for i in test]):
        bits = (12, 14, 12)[n % 3]
        write_dicom(root / part / f"{image_id}.dicom", _pixels(n, bits), bits_stored=bits,
                    photometric="MONOCHROME1" if n % 2 else "MONOCHROME2", rle=n == 2,
                    sop_class=DX_FOR_PRESENTATION if n % 3 else CR_IMAGE,
                    **({"WindowCenter": 2048, "WindowWidth": 4096} if n % 4 == 3 else {}))
    return root
