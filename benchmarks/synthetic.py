"""Synthetic inputs with a known answer, for the tests and the benchmarks.

Small mammograms written as DICOM with pydicom (:func:`write_mammo`), hostile
RLE files (:func:`write_rle_bomb`), JPEG 2000 files whose codestream is larger
than their header (:func:`write_j2k_size_bomb`), broken header values
(:func:`break_header`), and a random detector whose scores spread
like a trained one's (:func:`spread_model`). Unlike :mod:`simulation.phantom`
(realistic sites for the study), every attribute here is a parameter, so a
test can write exactly the header it checks.

The phantom (stored space, ``rows x cols``): background 0, a half-ellipse breast
of "density" 0.5 against the left or right edge, and a ``MARKER`` x ``MARKER``
block of density 1.0 at a known position inside the breast. Densities are
encoded into stored values according to the photometric interpretation,
presentation LUT shape and intent, so a correct reader recovers dense = bright.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from common.detector.model import ModelConfig, build_detector

MG_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MARKER = 4
BITS = 12
TOP = 2**BITS - 1


@dataclass(frozen=True)
class Phantom:
    """A synthetic image's ground truth, stored space.

    Attributes:
        density: float[rows, cols] in [0, 1] (dense = 1).
        marker_box: ``[xmin, ymin, xmax, ymax]`` pixel edges of the marker block.
        side: ``"left"`` or ``"right"``: where the breast (chest wall) is.
    """

    density: np.ndarray
    marker_box: tuple[int, int, int, int]
    side: str


def mg_dataset(
    sop_class: str = MG_PRESENTATION, transfer_syntax: str = ExplicitVRLittleEndian
) -> Dataset:
    """An empty dataset with file meta: ``sop_class``, a new instance UID, syntax."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(transfer_syntax)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    return ds


def phantom(rows: int = 128, cols: int = 96, side: str = "left") -> Phantom:
    """Half-ellipse breast against the ``side`` edge plus a marker block."""
    r = np.arange(rows)[:, None] + 0.5
    c = np.arange(cols)[None, :] + 0.5
    dist = c if side == "left" else cols - c
    inside = ((r - rows / 2) / (0.4 * rows)) ** 2 + (dist / (0.6 * cols)) ** 2 <= 1
    density = np.where(inside, 0.5, 0.0)
    mr = int(rows * 0.45)
    mc = int(cols * 0.2) if side == "left" else cols - int(cols * 0.2) - MARKER
    density[mr : mr + MARKER, mc : mc + MARKER] = 1.0
    return Phantom(density, (mc, mr, mc + MARKER, mr + MARKER), side)


def encode(
    density: np.ndarray, *, photometric: str, lut_shape: str | None, intent: str
) -> np.ndarray:
    """Stored uint16 values whose correct decoding gives ``density`` back, bright."""
    inverted = photometric == "MONOCHROME1" or (
        photometric == "MONOCHROME2" and lut_shape == "INVERSE"
    )
    d = 1.0 - density if inverted else density
    if intent == "FOR PROCESSING":
        # exposure-like raw values: exponential in density, then log recovers it
        raw = 50.0 * np.exp(d * np.log(TOP / 50.0))
        return np.round(raw).astype(np.uint16)
    return np.round(d * TOP).astype(np.uint16)


def write_mammo(
    path: Path,
    *,
    rows: int = 128,
    cols: int = 96,
    side: str = "left",
    photometric: str = "MONOCHROME2",
    lut_shape: str | None = None,
    intent: str = "FOR PRESENTATION",
    window: tuple[float, float, str | None] | None = (2048.0, 4096.0, None),
    voi_lut: bool = False,
    pixel_spacing: tuple[float, float] | None = (0.1, 0.1),
    imager_spacing: tuple[float, float] | None = None,
    magnification: float | None = None,
    image_laterality: str | None = "L",
    series_laterality: str | None = None,
    view_position: str | None = "CC",
    view_code: tuple[str, str, str] | None = None,
    modality: str = "MG",
    body_part: str | None = "BREAST",
    sop_class: str | None = None,
    with_pixels: bool = True,
    compress: str | None = None,
    transfer_syntax: str | None = None,
) -> Phantom:
    """Write a synthetic mammogram to ``path`` and return its ground truth.

    ``window`` is ``(center, width, VOILUTFunction or None)``; ``voi_lut`` adds a
    VOI LUT Sequence (square-root curve); ``compress`` is a transfer syntax UID
    for ``Dataset.compress``; ``transfer_syntax`` overrides the file meta UID
    without re-encoding (to fake an unsupported syntax).
    """
    ph = phantom(rows, cols, side)
    sop = sop_class or (
        MG_PROCESSING if intent == "FOR PROCESSING" else MG_PRESENTATION
    )
    ds = mg_dataset(sop)
    ds.PatientID = "P001"
    ds.Modality = modality
    ds.Manufacturer = "SYNTH"
    ds.ManufacturerModelName = "Phantom 1"
    if body_part:
        ds.BodyPartExamined = body_part
    ds.PresentationIntentType = intent
    if image_laterality:
        ds.ImageLaterality = image_laterality
    if series_laterality:
        ds.Laterality = series_laterality
    if view_position is not None:
        ds.ViewPosition = view_position
    if view_code is not None:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = view_code
        ds.ViewCodeSequence = Sequence([item])
    if pixel_spacing is not None:
        ds.PixelSpacing = list(pixel_spacing)
    if imager_spacing is not None:
        ds.ImagerPixelSpacing = list(imager_spacing)
    if magnification is not None:
        ds.EstimatedRadiographicMagnificationFactor = magnification
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    if lut_shape:
        ds.PresentationLUTShape = lut_shape
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, BITS, BITS - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window[0], window[1]
        if window[2]:
            ds.VOILUTFunction = window[2]
    if voi_lut:
        item = Dataset()
        item.add_new(0x00283002, "US", [TOP + 1, 0, BITS])
        curve = np.sqrt(np.arange(TOP + 1) / TOP) * TOP
        item.add_new(0x00283006, "US", np.round(curve).astype(np.uint16).tolist())
        item.LUTExplanation = "SQRT"
        ds.VOILUTSequence = Sequence([item])
    if with_pixels:
        stored = encode(
            ph.density, photometric=photometric, lut_shape=lut_shape, intent=intent
        )
        ds.PixelData = stored.tobytes()
    if compress is not None:
        ds.compress(UID(compress))
    if transfer_syntax is not None:
        ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
        ds.save_as(
            path, enforce_file_format=True, implicit_vr=False, little_endian=True
        )
    else:
        ds.save_as(path, enforce_file_format=True)
    return ph


def rle_constant_frame(rows: int, cols: int) -> bytes:
    """One RLE Lossless frame of ``rows x cols`` 16-bit zeros.

    Two byte segments, each a chain of 128-byte replicate runs (plus one
    literal run for the remainder): a 16384 x 16384 frame is about 8.4 MB and
    decodes to a 512 MB array.
    """
    n = rows * cols
    seg = np.tile(np.array([0x81, 0], np.uint8), n // 128).tobytes()
    if n % 128:
        seg += bytes([n % 128 - 1]) + bytes(n % 128)
    header = struct.pack("<16I", 2, 64, 64 + len(seg), *([0] * 13))
    return header + seg + seg


def write_rle_bomb(
    path: Path, *, rows: int = 16384, cols: int = 16384, full: bool = False
) -> Path:
    """An MG file, RLE Lossless, declaring ``rows x cols`` 16-bit pixels.

    ``full=False`` stores a tiny fake frame (any decoder attempt fails or
    allocates the declared size); ``full=True`` stores the real constant frame
    (:func:`rle_constant_frame`, about 8.4 MB for 16384 x 16384) that decodes
    to a ``rows x cols`` uint16 array.
    """
    ds = mg_dataset(MG_PRESENTATION, RLELossless)
    ds.PatientID = "P-BOMB"
    ds.Modality = "MG"
    ds.PixelSpacing = [0.1, 0.1]
    ds.ImageLaterality = "L"
    ds.ViewPosition = "CC"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, BITS, BITS - 1
    ds.PixelRepresentation = 0
    if full:
        frame = rle_constant_frame(rows, cols)
    else:
        frame = struct.pack("<16I", 2, 64, 66, *([0] * 13)) + b"\x81\x00\x81\x00"
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_j2k_size_bomb(
    path: Path, *, rows: int = 256, cols: int = 256, declared: int = 20000
) -> Path:
    """An MG file, JPEG 2000 Lossless, whose header and codestream disagree.

    The header says ``rows x cols`` (inside any pixel budget); the frame is
    the real encoding of that image with its SIZ segment rewritten to
    ``declared x declared`` (image and single tile), which openjpeg would
    allocate (``declared=20000``: 1.6 GB of int32) before failing.
    """
    write_mammo(path, rows=rows, cols=cols, compress=JPEG2000Lossless)
    ds = pydicom.dcmread(path)
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    at = frame.index(b"\xff\x51")  # SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz XTsiz..
    frame[at + 6 : at + 14] = struct.pack(">II", declared, declared)
    frame[at + 22 : at + 30] = struct.pack(">II", declared, declared)
    ds.PixelData = encapsulate([bytes(frame)])
    ds.save_as(path, enforce_file_format=True)
    return path


#: :func:`break_header` kinds: header values pydicom parses but cannot use.
HEADER_BREAKS = (
    "modality-lut-without-descriptor",
    "modality-lut-12-bit-entries",
    "rows-3-bytes",
)


def break_header(path: Path, kind: str) -> Path:
    """Rewrite the :func:`write_mammo` file at ``path`` with one broken value.

    ``kind`` (:data:`HEADER_BREAKS`): a ModalityLUTSequence item without
    LUTDescriptor; one whose LUTDescriptor says 12 bits per entry (only 8
    and 16 exist); a Rows element 3 bytes long (US is 2 bytes a value).
    """
    ds = pydicom.dcmread(path)
    if kind.startswith("modality-lut-"):
        item = Dataset()
        item.ModalityLUTType = "US"
        if kind == "modality-lut-12-bit-entries":
            item.add_new(0x00283002, "US", [TOP + 1, 0, BITS])
        item.add_new(0x00283006, "US", list(range(TOP + 1)))
        ds.ModalityLUTSequence = Sequence([item])
        del ds.RescaleSlope, ds.RescaleIntercept
    elif kind == "rows-3-bytes":
        tag = Tag(0x00280010)
        ds[tag] = RawDataElement(tag, "US", 3, b"\x80\x00\x00", 0, False, True)
    else:
        raise ValueError(f"kind={kind!r}; known: {', '.join(HEADER_BREAKS)}")
    ds.save_as(path, enforce_file_format=True)
    return path


def spread_model(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """A random detector (eval mode) whose head gives well spread scores.

    At torchvision's initialisation every location scores about 0.07 (prior
    bias, tiny weights), so the ranking of candidates is a matter of 1e-6;
    head convolutions drawn from N(0, 0.1) and the class bias at -1 give
    scores spread over (0, 1), like a trained model's, so that two runtimes
    keep the same candidates.
    """
    torch.manual_seed(seed)
    model = build_detector(cfg)
    with torch.no_grad():
        for name, p in model.get_submodule("head").named_parameters():
            if p.dim() == 4:
                p.normal_(0.0, 0.1)
            elif name.endswith("cls_logits.bias"):
                p.fill_(-1.0)
    return model.eval()
