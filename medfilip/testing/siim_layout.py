"""A tiny SIIM-ACR Pneumothorax tree in the Kaggle layout (train-rle.csv, dicom-images-*/study/series/id.dcm).

The images are 8x8 DICOMs as SIIM ships them: Secondary Capture, 8-bit MONOCHROME2, pixel
data JPEG Baseline-compressed (pydicom decodes it through Pillow). Masks are encoded with
:func:`encode_rle` in the competition's relative, column-major run-length form.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Optional

import numpy as np

from medfilip.testing.vindr_layout import save_dicom

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SIZE = 8


def siim_uid(kind: int, n: int) -> str:
    """A SIIM-style UID: kind 2 = study, 3 = series, 4 = image (the ImageId / SOPInstanceUID)."""
    return f"1.2.276.0.7230010.3.1.{kind}.8323329.{1000 + n}.1517875{160 + n}.{500000 + 37 * n}"


def encode_rle(mask: np.ndarray) -> str:
    """A boolean mask -> SIIM's relative run-length string (0-based offsets from the previous run's end,
    pixels in column-major order), as ``mask_functions.mask2rle`` writes it; "-1" for an empty mask."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    edges = np.flatnonzero(np.diff(np.concatenate([[False], flat, [False]]).astype(np.int8)))
    begins, ends = edges[0::2], edges[1::2]
    if not len(begins):
        return "-1"
    previous_end = np.concatenate([[0], ends[:-1]])
    return " ".join(f"{b - p} {e - b}" for b, p, e in zip(begins, previous_end, ends))


def _region(rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[rows, cols] = True
    return mask


# ImageId -> its pneumothorax regions (an empty list: "-1", no pneumothorax).
TRAIN: dict[str, list[np.ndarray]] = {
    siim_uid(4, 0): [_region(slice(1, 4), slice(0, 2))],  # one region across two columns
    siim_uid(4, 1): [_region(slice(0, 2), slice(1, 3)), _region(slice(5, 8), slice(5, 6))],  # two regions
    siim_uid(4, 2): [],
    siim_uid(4, 3): [],
    siim_uid(4, 4): [],
}
TEST_IMAGES = [siim_uid(4, 10), siim_uid(4, 11)]  # dicom-images-test: unlabelled in stage 1


def write_dicom(path: Path, pixels: np.ndarray, image_id: str, n: int) -> Path:
    """An 8-bit MONOCHROME2 Secondary Capture DICOM with JPEG Baseline pixel data, as in SIIM."""
    import pydicom
    from PIL import Image
    from pydicom.dataset import FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    jpeg = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(jpeg, format="JPEG", quality=95)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = image_id
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SECONDARY_CAPTURE, image_id
    ds.StudyInstanceUID, ds.SeriesInstanceUID = siim_uid(2, n), siim_uid(3, n)
    ds.Modality, ds.ViewPosition = "CR", ("PA", "AP")[n % 2]
    ds.PatientID = f"{n:08x}-0000-4000-8000-{n:012x}"  # anonymised: one per image, as in SIIM
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 8, 8, 7
    ds.PixelRepresentation, ds.PhotometricInterpretation = 0, "MONOCHROME2"
    ds.PixelData = encapsulate([jpeg.getvalue()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return save_dicom(ds, path)


def image_path(root: Path, folder: str, image_id: str, n: int) -> Path:
    """dicom-images-*/<StudyInstanceUID>/<SeriesInstanceUID>/<ImageId>.dcm"""
    return Path(root) / folder / siim_uid(2, n) / siim_uid(3, n) / f"{image_id}.dcm"


def write_siim(
    root: Path,
    train: Optional[dict[str, list[np.ndarray]]] = None,
    *,
    stage2: bool = False,
    test_labels: Optional[dict[str, list[np.ndarray]]] = None,
) -> Path:
    """Write the label CSV and the DICOM folders under ``root``.

    Stage 1 (default): ``train-rle.csv`` with its header ``ImageId, EncodedPixels`` and a space
    before every value, one row per region (one "-1" row for an image without). ``stage2``:
    ``stage_2_train.csv`` (``ImageId,EncodedPixels``, no spaces), which also labels the test-folder
    images given in ``test_labels``.
    """
    root = Path(root)
    train = TRAIN if train is None else train
    labels = dict(train)
    if stage2:
        labels.update(test_labels or {})
    rows = []
    for image_id, regions in labels.items():
        rows += [[image_id, encode_rle(m)] for m in regions] or [[image_id, "-1"]]
    if stage2:
        csv_path, header = root / "stage_2_train.csv", ["ImageId", "EncodedPixels"]
    else:
        csv_path, header = root / "train-rle.csv", ["ImageId", " EncodedPixels"]
        rows = [[image_id, f" {rle}"] for image_id, rle in rows]
    root.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)

    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for n, image_id in enumerate(train):
        pixels = np.clip(40 + 20 * xx + 5 * yy + 3 * n, 0, 255)
        write_dicom(image_path(root, "dicom-images-train", image_id, n), pixels, image_id, n)
    for k, image_id in enumerate(TEST_IMAGES):
        n = 10 + k
        write_dicom(image_path(root, "dicom-images-test", image_id, n), 200 - 10 * xx, image_id, n)
    return root
