"""A tiny RSNA Pneumonia Detection Challenge tree in the published (Kaggle stage 2) layout.

File names and CSV headers follow the download, including its one row per box in both CSVs.
The DICOMs are like the challenge's: secondary-capture objects, 8-bit MONOCHROME2, JPEG
baseline compressed, PatientID = patientId, ViewPosition PA/AP -- but 8x8 pixels. Needs
pydicom (the ``dicom`` extra).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

# (patientId, class, view, boxes (x, y, width, height)); ids are made up in the challenge's format.
RSNA_PATIENTS = [
    ("0004cfab-14fd-4e49-80ba-63a80b6bddd6", "No Lung Opacity / Not Normal", "PA", []),
    ("00313ee0-9eaa-42f4-b0ab-c148ed3241cd", "No Lung Opacity / Not Normal", "PA", []),
    ("00322d4d-1c29-4943-afc9-b6754be640eb", "Normal", "AP", []),
    ("003d8fa0-6bf1-40ed-b54c-ac657f8495c5", "Normal", "PA", []),
    ("00436515-870c-4b36-a041-de91049b9ab4", "Lung Opacity", "AP",
     [(264.0, 152.0, 213.0, 379.0), (562.0, 152.0, 256.0, 453.0)]),
    ("00704310-78a8-4b38-8475-49f4573b2dbb", "Lung Opacity", "AP",
     [(323.0, 577.0, 160.0, 104.0), (695.0, 575.0, 162.0, 137.0)]),
    ("00aecb01-a116-45a2-956c-08d2fa55433f", "Lung Opacity", "PA", [(288.0, 322.0, 94.0, 135.0)]),
]
RSNA_TEST_IDS = ["000924cf-0f8d-42bd-9158-1af53881a557", "000db696-cf54-4385-b10b-6b16fbb3f985"]


def _write_dicom(path: Path, patient_id: str, view: str, pixels: np.ndarray) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage, generate_uid

    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, format="JPEG", quality=95)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[patient_id, "sop"])
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ConversionType, ds.BodyPartExamined = "CR", "WSD", "CHEST"
    ds.SeriesDescription, ds.ViewPosition = f"view: {view}", view
    ds.PatientName = ds.PatientID = patient_id
    ds.PatientSex, ds.PatientAge, ds.PatientBirthDate = "F", "051Y", ""
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[patient_id, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[patient_id, "series"])
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "", "1", "1"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [0.143, 0.143]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
    ds.PixelData = encapsulate([jpeg.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


def write_rsna(folder: Path, *, patients=RSNA_PATIENTS, images: bool = True) -> Path:
    """Write the tree under ``folder`` and return it (the ``data.root`` to use)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels = ["patientId,x,y,width,height,Target"]
    classes = ["patientId,class"]
    for pid, cls, _view, boxes in patients:
        # One row per box in both files; a patient without boxes has one row with empty coordinates.
        rows = [f"{pid},{x},{y},{w},{h},1" for x, y, w, h in boxes] or [f"{pid},,,,,0"]
        labels += rows
        classes += [f"{pid},{cls}"] * len(rows)
    (folder / "stage_2_train_labels.csv").write_text("\n".join(labels) + "\n")
    (folder / "stage_2_detailed_class_info.csv").write_text("\n".join(classes) + "\n")
    if images:
        rng = np.random.default_rng(2018)
        for sub, todo in (("stage_2_train_images", [(p[0], p[2]) for p in patients]),
                          ("stage_2_test_images", [(pid, "PA") for pid in RSNA_TEST_IDS])):
            (folder / sub).mkdir(exist_ok=True)
            for pid, view in todo:
                pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8)
                _write_dicom(folder / sub / f"{pid}.dcm", pid, view, pixels)
    return folder
