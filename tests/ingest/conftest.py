"""Fixtures for ingest tests: tiny synthetic DICOM and PNG mammograms."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

MG_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"


def breast_array(
    rows: int, cols: int, *, left: bool, seed: int, maxval: int
) -> np.ndarray:
    """A half-ellipse 'breast' against the chest wall on one side, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    cx = 0 if left else cols - 1
    inside = ((xx - cx) / (0.7 * cols)) ** 2 + (
        (yy - rows / 2) / (0.45 * rows)
    ) ** 2 < 1
    img = np.where(inside, 0.6 * maxval, 0.02 * maxval)
    img = img + rng.normal(0, 0.02 * maxval, size=img.shape)
    return np.clip(img, 0, maxval)


def write_dicom(
    path: Path,
    *,
    rows: int = 160,
    cols: int = 128,
    patient: str = "P1",
    laterality: str = "L",
    view: str = "CC",
    spacing: float = 0.2,
    manufacturer: str = "ACME",
    seed: int = 0,
    bits: int = 14,
) -> Path:
    """Write a small FOR PRESENTATION MG DICOM (breast on the laterality side)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MG_PRESENTATION
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MG_PRESENTATION
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.PatientID = patient
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = "Model-1"
    ds.ImageLaterality = laterality
    ds.ViewPosition = view
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PixelSpacing = [f"{spacing}", f"{spacing}"]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = 0
    arr = breast_array(
        rows, cols, left=laterality == "L", seed=seed, maxval=2**bits - 1
    )
    ds.PixelData = arr.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def write_png(
    path: Path, *, rows: int = 200, cols: int = 160, left: bool, seed: int
) -> Path:
    """8-bit grey PNG research image."""
    arr = breast_array(rows, cols, left=left, seed=seed, maxval=255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode="L").save(path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    """Write a small CSV."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture()
def synthetic_site(tmp_path: Path) -> Path:
    """A small site: 4 DICOMs (2 patients, 2 vendors), 2 PNGs + images.csv,
    one corrupt .dcm, a text file, annotations.csv with good and broken rows."""
    site = tmp_path / "site"
    write_dicom(site / "p1" / "l_cc.dcm", patient="P1", laterality="L", seed=1)
    write_dicom(site / "p1" / "r_cc.dcm", patient="P1", laterality="R", seed=2)
    write_dicom(
        site / "p2" / "l_mlo.dcm", patient="P2", laterality="L", view="MLO",
        manufacturer="OtherCo", seed=3,
    )  # fmt: skip
    write_dicom(
        site / "p2" / "r_mlo.dcm", patient="P2", laterality="R", view="MLO", seed=4
    )
    write_png(site / "research" / "a.png", left=True, seed=5)
    write_png(site / "research" / "b.png", left=False, seed=6)
    (site / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10)
    (site / "notes.txt").write_text("not an image\n")
    write_csv(
        site / "images.csv",
        ["image", "patient_id", "laterality", "view", "spacing_mm"],
        [
            ["research/a.png", "W1", "L", "MLO", "0.2"],
            ["research/b.png", "W1", "R", "MLO", "0.2"],
        ],
    )
    write_csv(
        site / "annotations.csv",
        ["image", "finding", "xmin", "ymin", "xmax", "ymax"],
        [
            ["p1/l_cc.dcm", "mass", 10, 60, 30, 80],
            ["p1/r_cc.dcm", "none", "", "", "", ""],
            ["p2/l_mlo.dcm", "calcification", "", "", "", ""],  # image-level
            ["research/a.png", "CIRC", 20, 90, 40, 110],
            ["research/a.png", "ARCH", 5, 20, 25, 40],
            ["p2/r_mlo.dcm", "mass", 50, 10, 40, 30],  # xmin >= xmax
            ["ghost.dcm", "mass", 1, 1, 5, 5],  # unknown image
            ["research/b.png", "tumour", 1, 1, 5, 5],  # unknown word
        ],
    )
    return site
