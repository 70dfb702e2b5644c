"""What the DICOM objects derived from a site's images share (CAD SR, GSPS).

:mod:`client.cad_sr` (one Mammography CAD SR per exam) and
:mod:`client.gsps` (one Grayscale Softcopy Presentation State per image) both
reference source images by their headers and carry detections in the
source's stored pixel grid. The checks of those inputs, and the patient and
study attributes both copy, are here, so the two objects refuse and copy the
same things:

* :func:`check_sources`: every source has the UIDs and size a reference
  needs, no image comes twice, all belong to one study and one patient;
* :func:`check_detection`: a known label, a score in [0, 1], a box inside the
  stored image (clipped by :data:`BOX_SLACK_PX` of rounding), a zero-area box
  left out with a warning;
* :func:`copied_value`: a patient/study attribute's value when it is valid for
  its VR, else empty with a warning naming it (a strict archive rejects a whole
  object for one bad value);
* :func:`derived_header`: file meta, SOP common, creation date and time, and
  the patient and study of a new object about a source;
* :func:`sop_reference`: the SOP Class / Instance reference item;
* :func:`source_spacing`: the source's plausible pixel spacing, if any;
* :func:`check_arguments`: the builders' own arguments;
* :func:`write_part10`: the object as a Part 10 file, atomically.

``what`` in the messages names the object being built ("CAD SR",
"presentation state").
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydicom import config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import validate_value

from common.errors import shown
from common.fileio import atomic_write
from common.imaging.dicom import header_text, plausible_spacing, spacing_pair
from common.keys import CLASSES

log = logging.getLogger(__name__)

__all__ = [
    "BOX_SLACK_PX",
    "COPIED_ATTRIBUTES",
    "DEFAULT_SCORE_FLOOR",
    "MANUFACTURER",
    "Checked",
    "check_arguments",
    "check_detection",
    "check_sources",
    "copied_value",
    "derived_header",
    "object_charset",
    "sop_reference",
    "source_spacing",
    "write_part10",
]

#: Default display threshold: findings at or above it are shown ("Presentation
#: Required" in the SR; drawn in the presentation state).
DEFAULT_SCORE_FLOOR = 0.3
#: Manufacturer written into every derived object.
MANUFACTURER = "mammofed"
#: Slack (stored pixels) for boxes that leave the image by rounding only.
BOX_SLACK_PX = 0.01

#: What a derived object needs of each source to reference it.
REQUIRED_SOURCE_ATTRIBUTES = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Rows",
    "Columns",
)
#: Patient and study attributes copied from the source (Type 2 in both IODs).
COPIED_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
)
#: Attributes every source of one object must agree on (one patient).
SAME_PATIENT_ATTRIBUTES = ("PatientID", "IssuerOfPatientID")

#: ``(label, score, (xmin, ymin, xmax, ymax))``, the box clipped to the image.
Checked = tuple[str, float, tuple[float, float, float, float]]


def copied_value(source: Dataset, keyword: str, what: str = "CAD SR") -> Any:
    """``source``'s value of ``keyword`` if valid for its VR, else empty.

    These attributes are type 2 in the derived objects: an invalid one (a
    40-character Study ID, a date with dashes, several values where one is
    allowed) is written empty, with a warning naming it, so that a strict
    archive does not reject the whole object for it.
    """
    if keyword not in source:
        return ""
    elem = source.data_element(keyword)
    value = elem.value if elem is not None else None
    if value is None or value == "":
        return ""
    try:
        if elem is None or elem.VM > 1:
            raise ValueError(f"{elem.VM if elem else 0} values where one is allowed")
        validate_value(elem.VR, value, config.RAISE)
    except (ValueError, TypeError, AttributeError) as exc:
        log.warning(
            "%s: %s of source %s is not a valid DICOM value (%s); written "
            "empty", what, keyword, shown(header_text(source, "SOPInstanceUID")),
            shown(str(exc), 120),
        )  # fmt: skip
        return ""
    return value


def sop_reference(source: Dataset) -> Dataset:
    """An item with ``ReferencedSOPClassUID`` / ``ReferencedSOPInstanceUID``."""
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return ref


def check_sources(sources: Sequence[Dataset], what: str = "CAD SR") -> str:
    """The common StudyInstanceUID of ``sources``; ValueError otherwise."""
    if not sources:
        raise ValueError(f"a {what} needs at least one source image, got none")
    seen: dict[str, int] = {}
    for i, ds in enumerate(sources):
        missing = [k for k in REQUIRED_SOURCE_ATTRIBUTES if not header_text(ds, k)]
        if missing:
            raise ValueError(
                f"source {i} (SOPInstanceUID={header_text(ds, 'SOPInstanceUID')!r}) "
                f"lacks {', '.join(missing)}: cannot reference it from a {what}"
            )
        uid = header_text(ds, "SOPInstanceUID")
        if uid in seen:
            raise ValueError(
                f"sources {seen[uid]} and {i} are the same image "
                f"(SOPInstanceUID={uid!r})"
            )
        seen[uid] = i
    studies = sorted({header_text(ds, "StudyInstanceUID") for ds in sources})
    if len(studies) != 1:
        raise ValueError(
            f"one {what} covers one study; sources span {len(studies)} "
            f"StudyInstanceUIDs: {', '.join(studies)}"
        )
    # the object copies the patient from one source: images of one study that
    # name different patients are a mix-up no finding may be filed under
    # (the values are not quoted: an identifier has no place in a log)
    for keyword in SAME_PATIENT_ATTRIBUTES:
        first = header_text(sources[0], keyword)
        odd = [
            header_text(ds, "SOPInstanceUID")
            for ds in sources
            if header_text(ds, keyword) != first
        ]
        if odd:
            raise ValueError(
                f"study {studies[0]}: {keyword} of source(s) {', '.join(odd)} "
                f"differs from source 0's; one {what} is about one patient"
            )
    return studies[0]


def check_detection(
    det: Mapping[str, Any], source: Dataset, index: int, what: str = "CAD SR"
) -> Checked | None:
    """``(label, score, box)`` of one detection, box clipped to the image.

    ``None`` (with a warning) for a box of zero width or height: a detector
    can emit one after clipping and rounding, and it has no outline to draw.
    """
    sop = header_text(source, "SOPInstanceUID")
    where = f"detection {index} of SOPInstanceUID={sop}"
    label = det.get("label")
    if label not in CLASSES:
        raise ValueError(f"{where}: label={label!r}, expected one of {CLASSES}")
    try:
        score = float(det["score"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"{where}: score={det.get('score')!r} is not a number"
        ) from exc
    if not (math.isfinite(score) and 0.0 <= score <= 1.0):
        raise ValueError(f"{where}: score={score!r} outside [0, 1]")
    box = det.get("box")
    try:
        x0, y0, x1, y1 = (float(v) for v in box)  # type: ignore[union-attr]
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{where}: box={box!r} is not [xmin, ymin, xmax, ymax]"
        ) from exc
    rows, cols = int(source.Rows), int(source.Columns)
    s = BOX_SLACK_PX
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or not (
        -s <= x0 <= x1 <= cols + s and -s <= y0 <= y1 <= rows + s
    ):
        raise ValueError(
            f"{where}: box={box!r} is not a box inside the stored image "
            f"(0 <= xmin <= xmax <= {cols}, 0 <= ymin <= ymax <= {rows})"
        )
    if x1 == x0 or y1 == y0:
        log.warning(
            "%s: box=%r has zero width or height: left out of the %s", where, box, what
        )
        return None
    return (
        str(label),
        score,
        (max(x0, 0.0), max(y0, 0.0), min(x1, float(cols)), min(y1, float(rows))),
    )


def source_spacing(source: Dataset) -> tuple[float, float] | None:
    """(row, column) mm of PixelSpacing, else ImagerPixelSpacing, if plausible.

    The reader's own rule (:func:`common.imaging.dicom.plausible_spacing`): a
    value the reader treats as absent (e.g. 53.96 mm) is not written into a
    derived object.
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = source.get(keyword)
        except Exception:  # noqa: BLE001 - a raw value pydicom cannot convert
            continue  # the reader treats it as absent too
        pair = spacing_pair(value)
        if pair is not None and plausible_spacing(pair):
            return pair
    return None


def check_arguments(
    sources: Sequence[Dataset],
    detections: Sequence[Sequence[Mapping[str, Any]]],
    score_floor: float,
    algorithm_name: str,
    algorithm_version: str,
) -> None:
    """ValueError unless each source has its detection list and the rest is sane.

    Refused: ``len(detections) != len(sources)``, a floor outside [0, 1], a
    blank algorithm name or version.
    """
    if len(detections) != len(sources):
        raise ValueError(
            f"{len(sources)} sources but {len(detections)} detection lists: "
            "detections[i] belongs to sources[i]"
        )
    if not (math.isfinite(score_floor) and 0.0 <= score_floor <= 1.0):
        raise ValueError(f"score_floor must be in [0, 1], got {score_floor!r}")
    if not algorithm_name.strip() or not algorithm_version.strip():
        raise ValueError(
            f"algorithm_name={algorithm_name!r} and "
            f"algorithm_version={algorithm_version!r} must not be blank"
        )


def write_part10(ds: Dataset, path: Path, sop_class: str, what: str) -> Path:
    """Write ``ds`` as a DICOM Part 10 file, Explicit VR Little Endian, atomically.

    The file appears complete or not at all (temporary file + rename). File
    meta is filled from the dataset when absent.

    Raises:
        ValueError: ``ds`` is not of ``sop_class`` (``what`` names it).
    """
    if str(ds.get("SOPClassUID", "")) != sop_class:
        raise ValueError(
            f"SOPClassUID={ds.get('SOPClassUID')!r} is not {what} ({sop_class})"
        )
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(str(ds.SOPInstanceUID))
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    out = Path(path)
    atomic_write(out, lambda fh: ds.save_as(fh, enforce_file_format=True))
    return out


#: The character set a derived object is written in when its source's is not
#: one pydicom knows: UTF-8 encodes every name pydicom decoded.
FALLBACK_CHARSET = "ISO_IR 192"


def object_charset(source: Dataset, what: str = "CAD SR") -> str | list[str] | None:
    """The Specific Character Set a derived object copies from ``source``.

    The source's own when every value is a defined term pydicom knows (PS3.3
    C.12.1.1.2), nothing when it has none. A hostile or unknown one (control
    characters, a made-up name) would make the object unwritable, so it
    becomes :data:`FALLBACK_CHARSET`, with a warning naming the value.
    """
    from pydicom.charset import python_encoding

    try:
        value = source.get("SpecificCharacterSet")
    except Exception:  # noqa: BLE001 - a raw value pydicom cannot convert
        value = "<unreadable>"
    if not value:
        return None
    values = [value] if isinstance(value, str) else list(value)
    if all(isinstance(v, str) and v.strip() in python_encoding for v in values):
        return value  # type: ignore[no-any-return]
    log.warning(
        "%s: SpecificCharacterSet %s of source %s is not a known character set; "
        "written as %s", what, shown(repr(value), 80),
        shown(header_text(source, "SOPInstanceUID")), FALLBACK_CHARSET,
    )  # fmt: skip
    return FALLBACK_CHARSET


def derived_header(
    source: Dataset, sop_class: str, sop_uid: str, what: str = "CAD SR"
) -> Dataset:
    """A new object about ``source``'s study: its first attributes.

    File meta (Explicit VR Little Endian), the source's Specific Character
    Set, SOP Class and Instance UIDs, Instance Creation Date / Time (now),
    the patient and study attributes (:data:`COPIED_ATTRIBUTES`, each
    through :func:`copied_value`) and the Study Instance UID.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    charset = object_charset(source, what)
    if charset:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    now = dt.datetime.now()
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    for keyword in COPIED_ATTRIBUTES:
        setattr(ds, keyword, copied_value(source, keyword, what))
    ds.StudyInstanceUID = source.StudyInstanceUID
    return ds
