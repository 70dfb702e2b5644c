"""Detections as DICOM Grayscale Softcopy Presentation States: marks any PACS shows.

A Mammography CAD SR (:mod:`client.cad_sr`) is what mammography workstations
read; most general PACS viewers do not draw it. A Grayscale Softcopy
Presentation State (GSPS, SOP Class ``1.2.840.10008.5.1.4.1.1.11.1``, PS3.3
A.33.1) is what they all draw: graphic annotations over a referenced image,
with the window to show it in. :func:`build_exam_gsps` writes **one
presentation state per image** of an exam, all in one new series of the
image's study, so each carries its own image's display settings (two views
of one exam may differ in window or rescale, and a presentation state's
Modality LUT applies to every image it references).

What one presentation state holds (modules of A.33.1-1):

* Patient, General Study (copied from the source, as the SR copies them:
  :func:`client.dicom_derived.copied_value`), General Series (the source's
  laterality, L or R, else empty) and Presentation Series (Modality ``PR``,
  a new series), General Equipment,
  SOP Common (the source's Specific Character Set);
* Presentation State Identification: Content Label ``MAMMOFED_CAD``, a
  description naming the display floor, creation date and time;
* Presentation State Relationship: the source image;
* Displayed Area: the whole image, scale to fit, the source's pixel aspect
  ratio (``PixelAspectRatio``, else that of its pixel spacing, else 1:1);
* Modality LUT: the source's Rescale Slope / Intercept / Type, or its
  Modality LUT Sequence, when it has one;
* Softcopy VOI LUT: the source's first window (Window Center / Width, VOI
  LUT Function) or its first VOI LUT Sequence item; without either, the
  whole range of its Bits Stored (a FOR PROCESSING image has no window);
* Softcopy Presentation LUT: ``INVERSE`` for a MONOCHROME1 source (low
  values are white), else ``IDENTITY``;
* Graphic Layer and Graphic Annotation: three layers a viewer can toggle,
  ``MAMMOFED MASS`` (red), ``MAMMOFED CALC`` (cyan) and ``MAMMOFED INFO``;
  each finding scoring at least the display floor is a closed POLYLINE
  box in its class's layer with the text "<class> <score %>" anchored at its
  top-left corner; the INFO layer has one line naming the algorithm, its
  version and the floor (so "no mark" reads as "read, nothing above the
  floor", not as "not read").

Coordinates: ``GraphicAnnotationUnits`` PIXEL, whose origin is the top-left
corner of the top-left pixel of the SOURCE image as stored (PS3.3
C.10.5.1.2): this project's stored pixel-edge boxes
(:func:`client.predict.detections_to_stored`), written unchanged as (column,
row) pairs, as in the SR.

A presentation state has no "optional" mark: findings below the floor are
left out (the SR keeps them as Presentation Optional).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid
from pydicom.valuerep import format_number_as_ds

from client.dicom_derived import (
    DEFAULT_SCORE_FLOOR,
    MANUFACTURER,
    Checked,
    check_arguments,
    check_detection,
    check_sources,
    derived_header,
    sop_reference,
    source_spacing,
    write_part10,
)
from common import __version__
from common.errors import shown
from common.imaging.dicom import header_text
from common.keys import CALCIFICATION, MASS

log = logging.getLogger(__name__)

__all__ = [
    "GSPS_STORAGE",
    "GSPS_SUFFIX",
    "LAYERS",
    "build_exam_gsps",
    "write_gsps",
]

#: Grayscale Softcopy Presentation State Storage SOP Class UID.
GSPS_STORAGE = "1.2.840.10008.5.1.4.1.1.11.1"
#: File suffix of a written presentation state (``<SOPInstanceUID>.pr.dcm``).
GSPS_SUFFIX = ".pr.dcm"
#: Series Number of the presentation-state series (after the SR's 900).
GSPS_SERIES_NUMBER = 901
#: Content Label (CS: upper case, digits, space and underscore, 16 at most).
CONTENT_LABEL = "MAMMOFED_CAD"
WHAT = "presentation state"


def _cielab(lightness: float, a: float, b: float) -> list[int]:
    """CIELab (D50) as DICOM encodes it: each of L, a, b scaled to 0..65535."""
    return [
        round(lightness * 65535 / 100),
        round((a + 128) * 65535 / 255),
        round((b + 128) * 65535 / 255),
    ]


#: Graphic layers: ``{name: (order, description, grayscale, CIELab)}``; a
#: class's marks go to its layer (red masses, cyan calcifications, as the
#: overlay PNGs draw them).
LAYERS: dict[str, tuple[int, str, int, list[int]]] = {
    "MAMMOFED MASS": (1, "mammofed CAD: masses", 65535, _cielab(54.3, 80.8, 69.9)),
    "MAMMOFED CALC": (
        2,
        "mammofed CAD: calcification clusters",
        65535,
        _cielab(90.7, -50.7, -15.0),
    ),
    "MAMMOFED INFO": (3, "mammofed CAD: what was read", 65535, _cielab(100, 0, 0)),
}
_LAYER_OF = {MASS: "MAMMOFED MASS", CALCIFICATION: "MAMMOFED CALC"}
_INFO_LAYER = "MAMMOFED INFO"


def _value(source: Dataset, keyword: str) -> Any:
    """``source``'s value of ``keyword``, ``None`` when absent or unreadable.

    A header from outside keeps its values raw until read; pydicom converting
    a hostile one can raise anything (``OverflowError`` for an IS of "INF").
    Such a value is not used (logged, naming the keyword and the image).
    """
    try:
        return source.get(keyword)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types
        log.warning(
            "%s: %s of source %s is unreadable (%s); not used", WHAT, keyword,
            shown(header_text(source, "SOPInstanceUID")), shown(str(exc), 120),
        )  # fmt: skip
        return None


def _header(source: Dataset, keyword: str) -> str:
    """:func:`_value` as stripped text; ``""`` when absent or unreadable."""
    value = _value(source, keyword)
    return "" if value is None else str(value).strip()


def _image_reference(source: Dataset) -> DicomSequence:
    return DicomSequence([sop_reference(source)])


def _aspect_ratio(source: Dataset) -> list[int]:
    """Row:column pixel aspect ratio as two integers (IS), 1:1 when unknown."""
    par = _value(source, "PixelAspectRatio")
    # two values, each a positive IS; a text pydicom kept unconverted is not
    if isinstance(par, Sequence) and not isinstance(par, str | bytes) and len(par) == 2:
        try:
            row, col = int(par[0]), int(par[1])
        except (TypeError, ValueError):
            row = col = 0
        if 0 < row < 2**31 and 0 < col < 2**31:
            return [row, col]
    spacing = source_spacing(source)
    if spacing is not None:
        ratio = Fraction(spacing[0] / spacing[1]).limit_denominator(1000)
        if ratio.numerator > 0:
            return [ratio.numerator, ratio.denominator]
    return [1, 1]


def _first_number(value: Any) -> float | None:
    """The first value of a DS element (one or several), ``None`` if not finite."""
    # a str is a Sequence too: a value pydicom could not convert stays one
    several = isinstance(value, Sequence) and not isinstance(value, str | bytes)
    try:
        v = float(value[0] if several else value)
    except (TypeError, ValueError, IndexError):
        return None
    return v if math.isfinite(v) else None


def _modality_lut(ps: Dataset, source: Dataset) -> None:
    """The source's Modality LUT (rescale or sequence), if it has one."""
    lut = _value(source, "ModalityLUTSequence")
    if lut and _usable_lut(lut[0]):
        ps.ModalityLUTSequence = copy.deepcopy(lut[:1])
        return
    slope = _first_number(_value(source, "RescaleSlope"))
    intercept = _first_number(_value(source, "RescaleIntercept"))
    if slope is None or intercept is None:
        return
    ps.RescaleSlope = format_number_as_ds(slope)
    ps.RescaleIntercept = format_number_as_ds(intercept)
    rescale_type = _header(source, "RescaleType")
    ps.RescaleType = rescale_type if rescale_type.isalnum() else "US"


def _usable_lut(item: Dataset) -> bool:
    """Whether a VOI or Modality LUT item is self-consistent enough to copy.

    PS3.3 C.11.2.1.1: LUT Descriptor is (entries, first mapped value, bits),
    0 entries meaning 65536, bits 8 to 16, and LUT Data holds that many
    entries. Anything else (a sender's broken LUT) is not copied.
    """
    try:
        entries, _, bits = (int(v) for v in item.LUTDescriptor)
        n = len(item.LUTData)
    except Exception:  # noqa: BLE001 - absent, unreadable or not three values
        return False
    return 8 <= bits <= 16 and n == (entries or 65536)


def _voi(source: Dataset) -> Dataset:
    """One Softcopy VOI LUT item for ``source``: its first window, LUT or range."""
    item = Dataset()
    item.ReferencedImageSequence = _image_reference(source)
    center = _first_number(_value(source, "WindowCenter"))
    width = _first_number(_value(source, "WindowWidth"))
    if center is not None and width is not None and width >= 1:
        item.WindowCenter = format_number_as_ds(center)
        item.WindowWidth = format_number_as_ds(width)
        function = _header(source, "VOILUTFunction")
        if function in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
            item.VOILUTFunction = function
        return item
    luts = _value(source, "VOILUTSequence")
    if luts and _usable_lut(luts[0]):
        lut = Dataset()
        for keyword in ("LUTDescriptor", "LUTExplanation", "LUTData"):
            if keyword in luts[0]:
                lut[keyword] = copy.deepcopy(luts[0][keyword])
        item.VOILUTSequence = DicomSequence([lut])
        return item
    stored = _first_number(_value(source, "BitsStored"))  # US, maybe several
    bits = int(stored) if stored is not None and stored >= 1 else 16
    bits = min(max(bits, 1), 16)
    signed = _first_number(_value(source, "PixelRepresentation")) == 1
    low = -(2 ** (bits - 1)) if signed else 0
    item.WindowCenter = format_number_as_ds(float(low + 2 ** (bits - 1)))
    item.WindowWidth = format_number_as_ds(float(2**bits))
    return item


def _graphic(box: tuple[float, float, float, float]) -> Dataset:
    x0, y0, x1, y1 = box
    g = Dataset()
    g.GraphicAnnotationUnits = "PIXEL"
    g.GraphicDimensions = 2
    g.NumberOfGraphicPoints = 5
    g.GraphicData = [x0, y0, x1, y0, x1, y1, x0, y1, x0, y0]
    g.GraphicType = "POLYLINE"
    g.GraphicFilled = "N"
    return g


def _text(text: str, x: float, y: float) -> Dataset:
    t = Dataset()
    t.AnchorPointAnnotationUnits = "PIXEL"
    t.AnchorPoint = [float(x), float(y)]
    t.AnchorPointVisibility = "N"
    t.UnformattedTextValue = text
    return t


def _annotations(
    source: Dataset,
    findings: Sequence[Checked],
    algorithm: str,
    score_floor: float,
) -> DicomSequence:
    """One Graphic Annotation item per layer that has something to show."""
    by_layer: dict[str, list[Checked]] = {}
    for f in findings:
        by_layer.setdefault(_LAYER_OF[f[0]], []).append(f)
    items = []
    for layer, marks in by_layer.items():
        item = Dataset()
        item.ReferencedImageSequence = _image_reference(source)
        item.GraphicLayer = layer
        item.GraphicObjectSequence = DicomSequence([_graphic(b) for _, _, b in marks])
        item.TextObjectSequence = DicomSequence(
            [_text(f"{lab} {100 * score:.0f}%", b[0], b[1]) for lab, score, b in marks]
        )
        items.append(item)
    info = Dataset()
    info.ReferencedImageSequence = _image_reference(source)
    info.GraphicLayer = _INFO_LAYER
    shown_n = len(findings)
    info.TextObjectSequence = DicomSequence(
        [
            _text(
                f"{algorithm}: {shown_n} finding{'s' if shown_n != 1 else ''} "
                f"scoring >= {100 * score_floor:.0f}%",
                0.0,
                0.0,
            )
        ]
    )
    items.append(info)
    return DicomSequence(items)


def _layers() -> DicomSequence:
    items = []
    for name, (order, description, grey, lab) in LAYERS.items():
        item = Dataset()
        item.GraphicLayer = name
        item.GraphicLayerOrder = order
        item.GraphicLayerRecommendedDisplayGrayscaleValue = grey
        item.GraphicLayerRecommendedDisplayCIELabValue = lab
        item.GraphicLayerDescription = description
        items.append(item)
    return DicomSequence(items)


def _presentation_state(
    source: Dataset,
    findings: Sequence[Checked],
    *,
    series_uid: str,
    sop_uid: str,
    instance_number: int,
    algorithm_name: str,
    algorithm_version: str,
    score_floor: float,
) -> Dataset:
    ps = derived_header(source, GSPS_STORAGE, sop_uid, WHAT)
    ps.PresentationCreationDate = ps.InstanceCreationDate
    ps.PresentationCreationTime = ps.InstanceCreationTime
    ps.Modality = "PR"
    ps.SeriesInstanceUID = series_uid
    ps.SeriesNumber = GSPS_SERIES_NUMBER
    ps.SeriesDescription = f"{algorithm_name} CAD marks"
    # General Series' Laterality (2C: a breast is paired and a presentation
    # state has no Image Laterality): the source's, empty when it names none
    side = _header(source, "ImageLaterality") or _header(source, "Laterality")
    ps.Laterality = side if side in ("L", "R") else ""
    ps.BodyPartExamined = "BREAST"
    ps.Manufacturer = MANUFACTURER
    ps.ManufacturerModelName = algorithm_name
    ps.SoftwareVersions = algorithm_version
    ps.InstanceNumber = instance_number
    ps.ContentLabel = CONTENT_LABEL
    ps.ContentDescription = (
        f"{algorithm_name} CAD marks, findings scoring at least {score_floor:.2f}"
    )
    ps.ContentCreatorName = ""
    series = Dataset()
    series.SeriesInstanceUID = source.SeriesInstanceUID
    series.ReferencedImageSequence = _image_reference(source)
    ps.ReferencedSeriesSequence = DicomSequence([series])
    area = Dataset()
    area.DisplayedAreaTopLeftHandCorner = [1, 1]
    area.DisplayedAreaBottomRightHandCorner = [int(source.Columns), int(source.Rows)]
    area.PresentationSizeMode = "SCALE TO FIT"
    area.PresentationPixelAspectRatio = _aspect_ratio(source)
    ps.DisplayedAreaSelectionSequence = DicomSequence([area])
    _modality_lut(ps, source)
    ps.SoftcopyVOILUTSequence = DicomSequence([_voi(source)])
    monochrome1 = _header(source, "PhotometricInterpretation") == "MONOCHROME1"
    ps.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
    ps.GraphicLayerSequence = _layers()
    ps.GraphicAnnotationSequence = _annotations(
        source, findings, f"{algorithm_name} {algorithm_version}", score_floor
    )
    return ps


def build_exam_gsps(
    sources: Sequence[Dataset],
    detections: Sequence[Sequence[Mapping[str, Any]]],
    *,
    algorithm_name: str = "mammofed",
    algorithm_version: str = __version__,
    score_floor: float = DEFAULT_SCORE_FLOOR,
    uid_seed: Sequence[str] | None = None,
) -> list[Dataset]:
    """One presentation state per source image of ONE exam (module docstring).

    Args:
        sources: headers (pixel data not needed) of the images of one study,
            as :func:`client.cad_sr.build_cad_sr` takes them.
        detections: ``detections[i]`` for ``sources[i]``, in the source's
            stored pixel grid (:func:`client.predict.detections_to_stored`).
        algorithm_name: named in the series and the INFO layer's text.
        algorithm_version: the same (the package version by default).
        score_floor: findings scoring at least this are drawn; the others are
            left out.
        uid_seed: when given, the series and SOP Instance UIDs derive from
            these strings (the same exam and model give the same UIDs, so a
            presentation state queued again after a crash is a duplicate an
            archive recognizes); without it, random UIDs.

    Returns:
        ``len(sources)`` datasets with file meta, in the sources' order, one
        series (instance numbers 1, 2, ...).

    Raises:
        ValueError: what :func:`client.dicom_derived.check_sources` and
            :func:`~client.dicom_derived.check_detection` refuse (several
            studies or patients, a source without its UIDs or size, the same
            image twice, an unknown label, a score outside [0, 1], a box
            outside the image), ``len(detections) != len(sources)``, a floor
            outside [0, 1] or a blank algorithm name or version.
    """
    check_arguments(sources, detections, score_floor, algorithm_name, algorithm_version)
    check_sources(sources, WHAT)
    seed = None if uid_seed is None else [str(v) for v in uid_seed]
    series_uid = generate_uid(entropy_srcs=None if seed is None else [*seed, "pr"])
    out = []
    for i, (src, dets) in enumerate(zip(sources, detections, strict=True)):
        checked = [
            c for j, d in enumerate(dets) if (c := check_detection(d, src, j, WHAT))
        ]
        shown_marks = [c for c in checked if c[1] >= score_floor]
        sop = header_text(src, "SOPInstanceUID")
        sop_uid = generate_uid(
            entropy_srcs=None if seed is None else [*seed, "pr", sop]
        )
        out.append(
            _presentation_state(
                src,
                sorted(shown_marks, key=lambda c: -c[1]),
                series_uid=series_uid,
                sop_uid=sop_uid,
                instance_number=i + 1,
                algorithm_name=algorithm_name,
                algorithm_version=algorithm_version,
                score_floor=score_floor,
            )
        )
        log.debug(
            "presentation state for %s: %d of %d findings drawn",
            shown(sop), len(shown_marks), len(checked),
        )  # fmt: skip
    return out


def write_gsps(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file (:func:`client.dicom_derived.write_part10`).

    Raises:
        ValueError: ``ds`` is not a Grayscale Softcopy Presentation State.
    """
    return write_part10(
        ds, path, GSPS_STORAGE, "a Grayscale Softcopy Presentation State"
    )
