"""Detections of one exam as a DICOM Mammography CAD SR (TID 4000).

:func:`build_cad_sr` turns the stored-space detections of the images of one
study (the list :func:`client.predict.detections_to_stored` returns, one per
image) into a Mammography CAD SR instance (SOP Class
``1.2.840.10008.5.1.4.1.1.88.50``, PS3.3 A.35.5) whose content tree follows
PS3.16 TID 4000 "Mammography CAD Document Root"; :func:`write_cad_sr` writes it
as a Part 10 file.

Content tree (relationships by value unless marked *by reference*)::

    CONTAINER (111036, DCM, "Mammography CAD Report")            TID 4000
      HAS CONCEPT MOD  CODE Language = (en-US, RFC5646)           TID 1204
      CONTAINS CONTAINER (111028, DCM, "Image Library")
        CONTAINS IMAGE <source i>                                 TID 4020
          HAS ACQ CONTEXT CODE Image Laterality (CID 6022), CODE Image View
          (CID 4014), TEXT Patient Orientation Row/Column, DATE/TIME Study and
          Content Date/Time, NUM Horizontal/Vertical Pixel Spacing (um)
          -- each only when the source header carries it
      CONTAINS CODE (111017, DCM, "CAD Processing and Findings Summary")
               = All algorithms succeeded; with / without findings  TID 4001
        INFERRED FROM CONTAINER Individual Impression/Recommendation  TID 4003
            (one per detection; none when there are no detections)
          HAS CONCEPT MOD CODE Rendering Intent (CID 6034)
          CONTAINS CODE (111059, DCM, "Single Image Finding")      TID 4006
                   = finding class (CID 6014)
            HAS CONCEPT MOD CODE Rendering Intent
            HAS CONCEPT MOD TEXT Algorithm Name / Algorithm Version TID 4019
            HAS PROPERTIES NUM (111012, DCM, "Certainty of Finding") in %
            HAS PROPERTIES SCOORD (111010, DCM, "Center") POINT      TID 4021
              SELECTED FROM IMAGE <source i>
            HAS PROPERTIES SCOORD (111041, DCM, "Outline") POLYLINE (closed box)
              SELECTED FROM IMAGE <source i>
      CONTAINS CODE (111064, DCM, "Summary of Detections") = Succeeded
        INFERRED FROM CONTAINER (111063, DCM, "Successful Detections") TID 4015
          CONTAINS CODE (111022, DCM, "Detection Performed") = class  TID 4017
            HAS CONCEPT MOD TEXT Algorithm Name / Version
            INFERRED FROM <every Image Library IMAGE, by reference>
      CONTAINS CODE (111065, DCM, "Summary of Analyses") = Not Attempted

Finding classes (CID 6014 "Mammography Single Image Finding", codes read from
pydicom's copy of PS3.16): ``calcification`` -> (129769006, SCT, "Calcification
Cluster"); ``mass`` -> (129793001, SCT, "Mammography breast density"). CID 6014
has no "Mass": in BI-RADS and PS3.16 a mass is a *composite* finding seen in two
views ((129788004, SCT, "Mammographic breast mass") is in CID 6016 "Mammography
Composite Feature"), and the single-view mark a mass detector makes is a
density, which is what mammography CAD vendors write and workstations draw.

Coordinates: every SCOORD is in the SOURCE image's stored pixel grid (Rows x
Columns as stored, before any flip), as (column, row) pairs of 32-bit floats
(VR FL). DICOM's pixel convention for SCOORD (PS3.3 C.18.6.1.2) puts (0, 0) at
the top-left corner of the top-left pixel and (0.5, 0.5) at its centre, which is
this project's pixel-edge convention (``common.imaging.geometry``): a stored-space box
``[xmin, ymin, xmax, ymax]`` becomes the closed polyline (xmin, ymin), (xmax,
ymin), (xmax, ymax), (xmin, ymax), (xmin, ymin) without any conversion.

Scores: ``score`` in [0, 1] is written as Certainty of Finding ``100 * score``
percent. Findings scoring at least ``score_floor`` get Rendering Intent
"Presentation Required"; lower ones "Presentation Optional" (a workstation may
hide them).

The document is COMPLETE, UNVERIFIED; patient and study attributes are copied
from the first source; the Current Requested Procedure Evidence Sequence lists
every source image.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from client.dicom_derived import (
    DEFAULT_SCORE_FLOOR,
    MANUFACTURER,
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
from common.imaging.dicom import (
    first_text,
    header_text,
    resolve_laterality,
    resolve_view,
)
from common.keys import CALCIFICATION, CLASSES, LEFT, MASS, RIGHT

log = logging.getLogger(__name__)

__all__ = [
    "MAMMOGRAPHY_CAD_SR_STORAGE",
    "FINDING_CODES",
    "build_cad_sr",
    "write_cad_sr",
]

#: Mammography CAD SR Storage SOP Class UID.
MAMMOGRAPHY_CAD_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.50"
#: Series Number of the CAD SR series (any number; CAD series sort last).
SR_SERIES_NUMBER = 900


def _code(code: Code) -> Code:
    """A pydicom code with zero-width characters removed from its meaning.

    pydicom's tables carry U+200B inside some meanings ("Impression/\u200b
    Recommendation"), which is not a valid character of the default repertoire.
    """
    meaning = code.meaning.replace("\u200b", "")
    return Code(code.value, code.scheme_designator, meaning)


_DCM = codes.DCM
MAMMOGRAPHY_CAD_REPORT = _code(_DCM.MammographyCADReport)
LANGUAGE = _code(_DCM.LanguageOfContentItemAndDescendants)
#: CID 5000 "Language" entry for English (United States), as highdicom writes it.
ENGLISH_US = Code("en-US", "RFC5646", "English (United States)")
IMAGE_LIBRARY = _code(_DCM.ImageLibrary)
IMAGE_LATERALITY = _code(_DCM.ImageLaterality)
IMAGE_VIEW = _code(_DCM.ImageView)
ORIENTATION_ROW = _code(_DCM.PatientOrientationRow)
ORIENTATION_COLUMN = _code(_DCM.PatientOrientationColumn)
STUDY_DATE = _code(_DCM.StudyDate)
STUDY_TIME = _code(_DCM.StudyTime)
CONTENT_DATE = _code(_DCM.ContentDate)
CONTENT_TIME = _code(_DCM.ContentTime)
HORIZONTAL_SPACING = _code(_DCM.HorizontalPixelSpacing)
VERTICAL_SPACING = _code(_DCM.VerticalPixelSpacing)
FINDINGS_SUMMARY = _code(_DCM.CADProcessingAndFindingsSummary)
INDIVIDUAL_IMPRESSION = _code(_DCM.IndividualImpressionRecommendation)
SINGLE_IMAGE_FINDING = _code(_DCM.SingleImageFinding)
RENDERING_INTENT = _code(_DCM.RenderingIntent)
ALGORITHM_NAME = _code(_DCM.AlgorithmName)
ALGORITHM_VERSION = _code(_DCM.AlgorithmVersion)
CERTAINTY_OF_FINDING = _code(_DCM.CertaintyOfFinding)
CENTER = _code(_DCM.Center)
OUTLINE = _code(_DCM.Outline)
SUMMARY_OF_DETECTIONS = _code(_DCM.SummaryOfDetections)
SUMMARY_OF_ANALYSES = _code(_DCM.SummaryOfAnalyses)
SUCCESSFUL_DETECTIONS = _code(_DCM.SuccessfulDetections)
DETECTION_PERFORMED = _code(_DCM.DetectionPerformed)
PERCENT = _code(codes.UCUM.Percent)
MICROMETER = _code(codes.UCUM.Micrometer)

_CID6047 = codes.cid6047
WITH_FINDINGS = _code(_CID6047.AllAlgorithmsSucceededWithFindings)
WITHOUT_FINDINGS = _code(_CID6047.AllAlgorithmsSucceededWithoutFindings)
SUCCEEDED = _code(codes.cid6042.Succeeded)
NOT_ATTEMPTED = _code(codes.cid6042.NotAttempted)
PRESENTATION_REQUIRED = _code(
    codes.cid6034.PresentationRequiredRenderingDeviceIsExpectedToPresent
)
PRESENTATION_OPTIONAL = _code(
    codes.cid6034.PresentationOptionalRenderingDeviceMayPresent
)

#: Detector class -> CID 6014 "Mammography Single Image Finding" code.
FINDING_CODES: dict[str, Code] = {
    MASS: _code(codes.cid6014.MammographyBreastDensity),
    CALCIFICATION: _code(codes.cid6014.CalcificationCluster),
}
#: Header laterality -> CID 6022 "Side".
_LATERALITY_CODES: dict[str, Code] = {
    LEFT: _code(codes.cid6022.LeftBreast),
    RIGHT: _code(codes.cid6022.RightBreast),
}
#: View word (common.imaging.dicom.resolve_view) -> CID 4014 "View for Mammography".
_VIEW_CODES: dict[str, Code] = {
    "CC": _code(codes.cid4014.CranioCaudal),
    "MLO": _code(codes.cid4014.MedioLateralObliqueProjection),
    "ML": _code(codes.cid4014.MedioLateralProjection),
    "LM": _code(codes.cid4014.LateroMedial),
    "LMO": _code(codes.cid4014.LateroMedialOblique),
    "XCCL": _code(codes.cid4014.CranioCaudalExaggeratedLaterally),
    "XCCM": _code(codes.cid4014.CranioCaudalExaggeratedMedially),
    "FB": _code(codes.cid4014.CaudoCranial),
    "SIO": _code(codes.cid4014.SuperolateralToInferomedialOblique),
    "ISO": _code(codes.cid4014.InferomedialToSuperolateralOblique),
}


#: A DICOM date (DA) and time (TM) as a content item may hold them.
_DATE_RE = re.compile(r"\d{8}")
_TIME_RE = re.compile(r"([01]\d|2[0-3])([0-5]\d([0-5]\d(\.\d{1,6})?)?)?")


# --- content items ----------------------------------------------------------
def _coded(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _item(value_type: str, relationship: str | None, name: Code | None) -> Dataset:
    ds = Dataset()
    if relationship is not None:
        ds.RelationshipType = relationship
    ds.ValueType = value_type
    if name is not None:
        ds.ConceptNameCodeSequence = DicomSequence([_coded(name)])
    return ds


def _children(parent: Dataset, items: Sequence[Dataset]) -> Dataset:
    if items:
        parent.ContentSequence = DicomSequence(list(items))
    return parent


def _container(
    relationship: str | None, name: Code, items: Sequence[Dataset]
) -> Dataset:
    ds = _item("CONTAINER", relationship, name)
    ds.ContinuityOfContent = "SEPARATE"
    return _children(ds, items)


def _code_item(
    relationship: str, name: Code, value: Code, items: Sequence[Dataset] = ()
) -> Dataset:
    ds = _item("CODE", relationship, name)
    ds.ConceptCodeSequence = DicomSequence([_coded(value)])
    return _children(ds, items)


#: The attribute holding the value of a TEXT, DATE or TIME content item.
_VALUE_KEYWORDS = {"TEXT": "TextValue", "DATE": "Date", "TIME": "Time"}


def _string(value_type: str, relationship: str, name: Code, value: str) -> Dataset:
    ds = _item(value_type, relationship, name)
    setattr(ds, _VALUE_KEYWORDS[value_type], value)
    return ds


def _num(relationship: str, name: Code, value: float, unit: Code) -> Dataset:
    ds = _item("NUM", relationship, name)
    measured = Dataset()
    measured.NumericValue = f"{value:.6g}"
    measured.FloatingPointValue = float(value)
    measured.MeasurementUnitsCodeSequence = DicomSequence([_coded(unit)])
    ds.MeasuredValueSequence = DicomSequence([measured])
    return ds


def _image(
    relationship: str, source: Dataset, items: Sequence[Dataset] = ()
) -> Dataset:
    ds = _item("IMAGE", relationship, None)
    ds.ReferencedSOPSequence = DicomSequence([sop_reference(source)])
    return _children(ds, items)


def _scoord(
    name: Code,
    graphic_type: str,
    points: Sequence[tuple[float, float]],
    source: Dataset,
) -> Dataset:
    ds = _item("SCOORD", "HAS PROPERTIES", name)
    ds.GraphicType = graphic_type
    ds.GraphicData = [float(v) for xy in points for v in xy]
    return _children(ds, [_image("SELECTED FROM", source)])


def _by_reference(relationship: str, path: Sequence[int]) -> Dataset:
    ds = Dataset()
    ds.RelationshipType = relationship
    ds.ReferencedContentItemIdentifier = [int(v) for v in path]
    return ds


# --- the tree -------------------------------------------------------------------
def _library_entry(source: Dataset) -> Dataset:
    """TID 4020 CAD Image Library Entry: what the source header tells."""
    acq = "HAS ACQ CONTEXT"
    ctx: list[Dataset] = []
    laterality, _ = resolve_laterality(source)
    if laterality in _LATERALITY_CODES:
        ctx.append(_code_item(acq, IMAGE_LATERALITY, _LATERALITY_CODES[laterality]))
    view = resolve_view(source)
    if view in _VIEW_CODES:
        ctx.append(_code_item(acq, IMAGE_VIEW, _VIEW_CODES[view]))
    orientation = source.get("PatientOrientation")
    if orientation is not None and len(orientation) == 2:
        row, column = (str(v).strip() for v in orientation)
        if row and column:
            ctx.append(_string("TEXT", acq, ORIENTATION_ROW, row))
            ctx.append(_string("TEXT", acq, ORIENTATION_COLUMN, column))
    for keyword, name, value_type in (
        ("StudyDate", STUDY_DATE, "DATE"),
        ("StudyTime", STUDY_TIME, "TIME"),
        ("ContentDate", CONTENT_DATE, "DATE"),
        ("ContentTime", CONTENT_TIME, "TIME"),
    ):
        value = first_text(source, keyword)
        pattern = _DATE_RE if value_type == "DATE" else _TIME_RE
        if pattern.fullmatch(value):  # a DICOM DA / TM, else left out
            ctx.append(_string(value_type, acq, name, value))
        elif value:
            log.warning(
                "CAD SR: %s of source %s is not a DICOM %s (%s); left out",
                keyword, shown(header_text(source, "SOPInstanceUID")),
                "date (YYYYMMDD)" if value_type == "DATE" else "time (HHMMSS)",
                shown(value),
            )  # fmt: skip
    spacing = source_spacing(source)
    if spacing is not None:
        row_mm, col_mm = spacing
        ctx.append(_num(acq, HORIZONTAL_SPACING, col_mm * 1000.0, MICROMETER))
        ctx.append(_num(acq, VERTICAL_SPACING, row_mm * 1000.0, MICROMETER))
    return _image("CONTAINS", source, ctx)


def _algorithm(name: str, version: str) -> list[Dataset]:
    """TID 4019 Algorithm Identification (new items: no dataset sits in two trees)."""
    return [
        _string("TEXT", "HAS CONCEPT MOD", ALGORITHM_NAME, name),
        _string("TEXT", "HAS CONCEPT MOD", ALGORITHM_VERSION, version),
    ]


def _finding(
    label: str,
    score: float,
    box: tuple[float, float, float, float],
    source: Dataset,
    intent: Code,
    algorithm: tuple[str, str],
) -> Dataset:
    """TID 4003 holding one TID 4006 Single Image Finding."""
    x0, y0, x1, y1 = box
    outline = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
    center = [((x0 + x1) / 2.0, (y0 + y1) / 2.0)]
    sif = _code_item(
        "CONTAINS",
        SINGLE_IMAGE_FINDING,
        FINDING_CODES[label],
        [
            _code_item("HAS CONCEPT MOD", RENDERING_INTENT, intent),
            *_algorithm(*algorithm),
            _num("HAS PROPERTIES", CERTAINTY_OF_FINDING, 100.0 * score, PERCENT),
            _scoord(CENTER, "POINT", center, source),
            _scoord(OUTLINE, "POLYLINE", outline, source),
        ],
    )
    return _container(
        "INFERRED FROM",
        INDIVIDUAL_IMPRESSION,
        [_code_item("HAS CONCEPT MOD", RENDERING_INTENT, intent), sif],
    )


def build_cad_sr(
    sources: Sequence[Dataset],
    detections: Sequence[Sequence[Mapping[str, Any]]],
    *,
    algorithm_name: str = "mammofed",
    algorithm_version: str = __version__,
    score_floor: float = DEFAULT_SCORE_FLOOR,
    uid_seed: Sequence[str] | None = None,
) -> Dataset:
    """One Mammography CAD SR for one exam (see the module docstring).

    Args:
        sources: headers (pixel data not needed) of the images of ONE study:
            same StudyInstanceUID, each with SOPClassUID, SOPInstanceUID,
            SeriesInstanceUID, Rows and Columns.
        detections: ``detections[i]`` for ``sources[i]``, as
            :func:`client.predict.detections_to_stored` returns them:
            ``{"label": "mass"|"calcification", "score": float in [0, 1],
            "box": [xmin, ymin, xmax, ymax]}`` in the SOURCE image's stored
            pixel grid (pixel-edge coordinates, origin at the top-left corner of
            the top-left pixel, before any flip). An empty list is an image the
            CAD read and found nothing in.
        algorithm_name: TID 4019 Algorithm Name.
        algorithm_version: TID 4019 Algorithm Version (the package version).
        score_floor: findings scoring at least this are "Presentation
            Required", the others "Presentation Optional".
        uid_seed: when given, the SR's Series and SOP Instance UIDs are
            derived from these strings (``generate_uid(entropy_srcs=...)``):
            the same exam scored by the same model gets the same UIDs, so an
            SR queued again after a crash is a duplicate the archive
            recognizes, not a second report. Without it, random UIDs.

    Returns:
        The SR dataset with file meta (new Series and SOP Instance UIDs), ready
        for :func:`write_cad_sr` or a C-STORE. SCOORD values are the boxes
        unchanged: DICOM's SCOORD origin is the same top-left pixel corner.

    Raises:
        ValueError: no sources, ``len(detections) != len(sources)``, sources from
            several studies (the message lists the StudyInstanceUIDs), the same
            image twice, a source without the UIDs or size, or a detection with
            an unknown label, a score outside [0, 1] or a box outside the image
            or inverted. A zero-width or zero-height box is left out with a
            warning.
    """
    check_arguments(sources, detections, score_floor, algorithm_name, algorithm_version)
    study_uid = check_sources(sources)
    checked = [
        [c for j, d in enumerate(dets) if (c := check_detection(d, src, j))]
        for src, dets in zip(sources, detections, strict=True)
    ]
    algorithm = (algorithm_name, algorithm_version)

    # Root children, in TID 4000 order. Positions matter: the by-reference
    # items of TID 4017 address Image Library entries as [1, 2, k].
    library = _container(
        "CONTAINS", IMAGE_LIBRARY, [_library_entry(src) for src in sources]
    )
    library_path = [1, 2]
    impressions: list[Dataset] = []
    for src, dets in zip(sources, checked, strict=True):
        for label, score, box in dets:
            intent = (
                PRESENTATION_REQUIRED if score >= score_floor else PRESENTATION_OPTIONAL
            )
            impressions.append(_finding(label, score, box, src, intent, algorithm))
    summary = _code_item(
        "CONTAINS",
        FINDINGS_SUMMARY,
        WITH_FINDINGS if impressions else WITHOUT_FINDINGS,
        impressions,
    )
    performed = [
        _code_item(
            "CONTAINS",
            DETECTION_PERFORMED,
            FINDING_CODES[label],
            [
                *_algorithm(*algorithm),
                *(
                    _by_reference("INFERRED FROM", [*library_path, k + 1])
                    for k in range(len(sources))
                ),
            ],
        )
        for label in CLASSES
    ]
    detections_summary = _code_item(
        "CONTAINS",
        SUMMARY_OF_DETECTIONS,
        SUCCEEDED,
        [_container("INFERRED FROM", SUCCESSFUL_DETECTIONS, performed)],
    )
    analyses_summary = _code_item("CONTAINS", SUMMARY_OF_ANALYSES, NOT_ATTEMPTED)
    root_items = [
        _code_item("HAS CONCEPT MOD", LANGUAGE, ENGLISH_US),
        library,
        summary,
        detections_summary,
        analyses_summary,
    ]
    ds = _header(sources, study_uid, algorithm_name, algorithm_version, uid_seed)
    ds.update(_container(None, MAMMOGRAPHY_CAD_REPORT, root_items))
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "4000"
    ds.ContentTemplateSequence = DicomSequence([template])
    n = sum(len(d) for d in checked)
    log.debug("CAD SR for study %s: %d images, %d findings", study_uid, len(sources), n)
    return ds


def _header(
    sources: Sequence[Dataset],
    study_uid: str,
    algorithm_name: str,
    version: str,
    uid_seed: Sequence[str] | None = None,
) -> Dataset:
    """Patient, study, series, equipment, document-general and SOP common."""
    first = sources[0]
    seed = None if uid_seed is None else [str(v) for v in uid_seed]
    sop_uid = generate_uid(entropy_srcs=None if seed is None else [*seed, "sop"])
    ds = derived_header(first, MAMMOGRAPHY_CAD_SR_STORAGE, sop_uid)
    ds.ContentDate = ds.InstanceCreationDate
    ds.ContentTime = ds.InstanceCreationTime
    ds.StudyInstanceUID = study_uid
    ds.Modality = "SR"
    ds.SeriesInstanceUID = generate_uid(
        entropy_srcs=None if seed is None else [*seed, "series"]
    )
    ds.SeriesNumber = SR_SERIES_NUMBER
    ds.SeriesDescription = f"{algorithm_name} CAD"
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence([])
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = algorithm_name
    ds.SoftwareVersions = version
    ds.InstanceNumber = 1
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = DicomSequence([])
    ds.CurrentRequestedProcedureEvidenceSequence = _evidence(sources, study_uid)
    return ds


def _evidence(sources: Sequence[Dataset], study_uid: str) -> DicomSequence:
    """SOP Instance Reference Macro: the source images by series."""
    by_series: dict[str, list[Dataset]] = {}
    for src in sources:
        series = by_series.setdefault(header_text(src, "SeriesInstanceUID"), [])
        series.append(sop_reference(src))
    series_items = []
    for series_uid, refs in by_series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        item.ReferencedSOPSequence = DicomSequence(refs)
        series_items.append(item)
    study = Dataset()
    study.StudyInstanceUID = study_uid
    study.ReferencedSeriesSequence = DicomSequence(series_items)
    return DicomSequence([study])


def write_cad_sr(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file (:func:`client.dicom_derived.write_part10`).

    Raises:
        ValueError: ``ds`` is not a Mammography CAD SR.
    """
    return write_part10(ds, path, MAMMOGRAPHY_CAD_SR_STORAGE, "Mammography CAD SR")
