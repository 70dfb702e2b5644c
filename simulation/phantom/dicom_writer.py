"""Write a phantom image as a Digital Mammography X-Ray Image DICOM file.

The file carries what a modality writes: patient/study/series/instance
structure with deterministic UIDs (``2.25.`` + a hash of the image's identity),
fixed dates and times (no wall clock, so the same scenario gives the same bytes),
the vendor's spacing attributes, ImageLaterality, ViewPosition with its code
sequence, PresentationIntentType and the VOI (window, SIGMOID window or a VOI LUT
Sequence). Pixel data is uncompressed, Explicit VR Little Endian.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from common.keys import FOR_PROCESSING, VIEW_CC, VIEW_MLO
from simulation.phantom.scenario import Scenario, SiteSpec, VendorProfile
from simulation.phantom.vendors import Encoded

#: Digital Mammography X-Ray Image Storage - For Presentation.
SOP_CLASS_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
#: Digital Mammography X-Ray Image Storage - For Processing.
SOP_CLASS_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
#: Fixed date and time written to every file (never the wall clock).
STUDY_DATE = "20250115"
STUDY_TIME = "090000"
IMPLEMENTATION_VERSION = "MAMMOFED_PH1"

_VIEW_CODES = {
    VIEW_CC: ("R-10242", "cranio-caudal"),
    VIEW_MLO: ("R-10226", "medio-lateral oblique"),
}
#: PatientOrientation (row direction, column direction) by laterality and view.
_ORIENTATION = {
    ("L", VIEW_CC): ["A", "R"],
    ("R", VIEW_CC): ["P", "L"],
    ("L", VIEW_MLO): ["A", "F"],
    ("R", VIEW_MLO): ["P", "F"],
}


def uid_from(*parts: object) -> str:
    """Deterministic DICOM UID ``2.25.<int>`` from the hash of ``parts``."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:15], "big"))


def _ds(value: float) -> str:
    """A DS string of at most 16 characters."""
    return f"{value:.10g}"[:16]


@dataclass(frozen=True)
class ImageIdentity:
    """Who and what an image is (drives UIDs and the patient module).

    Attributes:
        patient_id: DICOM PatientID.
        woman: index of the woman within her site.
        laterality: ``"L"`` or ``"R"``.
        view: ``"CC"`` or ``"MLO"``.
        instance: InstanceNumber within the study (1..4).
        age: patient age in years.
        thickness_mm: compressed breast thickness (BodyPartThickness).
    """

    patient_id: str
    woman: int
    laterality: str
    view: str
    instance: int
    age: int
    thickness_mm: float


def build_dataset(
    encoded: Encoded,
    identity: ImageIdentity,
    scenario: Scenario,
    site: SiteSpec,
    vendor: VendorProfile,
) -> Dataset:
    """The full DICOM dataset (with file meta) of one stored image.

    ``encoded.pixels`` is uint16[Rows, Columns] in stored orientation (already
    flipped for right breasts).
    """
    processing = vendor.presentation_intent == FOR_PROCESSING
    sop_class = SOP_CLASS_PROCESSING if processing else SOP_CLASS_PRESENTATION
    key = (scenario.name, scenario.seed, site.name, identity.patient_id)
    study_uid = uid_from("study", *key)
    series_uid = uid_from("series", *key)
    sop_uid = uid_from("image", *key, identity.laterality, identity.view)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(uid_from("mammofed-phantom-implementation"))
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = STUDY_TIME
    ds.AccessionNumber = f"ACC{identity.patient_id[-8:]}"[:16]
    ds.Modality = "MG"
    ds.Manufacturer = vendor.manufacturer
    ds.InstitutionName = f"Synthetic site {site.name}"
    ds.ReferringPhysicianName = ""
    ds.StationName = f"PH{site.name}"[:16]
    ds.StudyDescription = "Synthetic screening mammogram"
    ds.SeriesDescription = "Phantom MG"
    ds.ManufacturerModelName = vendor.model_name
    ds.PatientName = f"PHANTOM^{identity.patient_id}"
    ds.PatientID = identity.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "F"
    ds.PatientAge = f"{identity.age:03d}Y"
    ds.BodyPartExamined = "BREAST"
    ds.KVP = _ds(vendor.kvp)
    ds.DeviceSerialNumber = uid_from("device", site.name)[-10:]
    ds.SoftwareVersions = vendor.software_version
    ds.DistanceSourceToDetector = _ds(650.0)
    ds.DistanceSourceToPatient = _ds(650.0 / vendor.magnification)
    ds.BodyPartThickness = _ds(round(identity.thickness_mm, 1))
    ds.AnodeTargetMaterial = vendor.anode
    ds.FilterMaterial = vendor.filter
    ds.DetectorType = "DIRECT" if vendor.detector == "direct" else "SCINTILLATOR"
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = identity.instance
    ds.PatientOrientation = _ORIENTATION[(identity.laterality, identity.view)]
    ds.ImageLaterality = identity.laterality
    ds.ViewPosition = identity.view
    code, meaning = _VIEW_CODES[identity.view]
    item = Dataset()
    item.CodeValue = code
    item.CodingSchemeDesignator = "SRT"
    item.CodeMeaning = meaning
    ds.ViewCodeSequence = Sequence([item])
    ds.PresentationIntentType = vendor.presentation_intent
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PixelIntensityRelationship = "LOG"
    dense_high = encoded.photometric == "MONOCHROME2"
    ds.PixelIntensityRelationshipSign = -1 if dense_high else 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"

    det_pitch = _ds(scenario.detector_pitch_mm(vendor))
    ds.ImagerPixelSpacing = [det_pitch, det_pitch]
    if vendor.spacing_tags == "both":
        ds.PixelSpacing = [det_pitch, det_pitch]
    elif vendor.spacing_tags == "imager_mag":
        ds.EstimatedRadiographicMagnificationFactor = _ds(vendor.magnification)

    voi = encoded.voi
    if voi.lut is not None:
        lut_item = Dataset()
        n = int(voi.lut.size)  # LUTDescriptor: entries (0 means 65536), first, bits
        descriptor = [n if n < 65536 else 0, voi.lut_first, voi.lut_bits]
        lut_item.add(DataElement(0x00283002, "US", descriptor))
        lut_item.LUTExplanation = "PHANTOM S-CURVE"
        lut_item.add(DataElement(0x00283006, "US", [int(v) for v in voi.lut]))
        ds.VOILUTSequence = Sequence([lut_item])
    else:
        ds.WindowCenter = _ds(round(voi.center, 2))
        ds.WindowWidth = _ds(round(voi.width, 2))
        ds.VOILUTFunction = voi.function or "LINEAR"
        ds.WindowCenterWidthExplanation = "PHANTOM DEFAULT"

    rows, cols = encoded.pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = encoded.photometric
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = encoded.bits_stored
    ds.HighBit = encoded.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(encoded.pixels, dtype="<u2").tobytes()
    return ds


def write_dicom(ds: Dataset, path: str | Path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file (preamble, file meta); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(p, enforce_file_format=True)
    return p
