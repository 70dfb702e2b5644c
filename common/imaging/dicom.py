"""Read a mammography DICOM file into a standardized :class:`MammoImage`.

Three layers, each usable alone:

* :func:`read_header` -- header facts (laterality, view, intent, photometric,
  spacing and its source) without decoding pixels;
* :func:`decode_pixels` -- stored-space float32[rows, cols] in ``[0, 1]``, dense
  tissue bright (Modality LUT, then VOI or FOR PROCESSING normalization, then
  MONOCHROME1 / INVERSE inversion);
* :func:`read_dicom` -- both, then :func:`common.imaging.preprocess.standardize`.

Anything that must not be guessed raises :class:`common.errors.RefusedImage`
with a one-line reason. The documented choices are in ``docs/dicom.md``.

Hostile input: files are parsed with large values deferred, so nothing of the
pixel data is read before :func:`check_pixel_budget` has compared the header's
Rows x Columns x NumberOfFrames x SamplesPerPixel with the budget; colour
images (:func:`check_greyscale`), a BitsAllocated the reader does not decode
(:func:`check_bits_allocated`), a VOI or Modality LUT whose LUTData is empty or
shorter than its LUTDescriptor declares (:func:`check_lut_length`) and Modality
LUTs giving non-finite values or an image without dynamic range are refused,
naming the field and its value. A decode that every pydicom plugin fails is
refused with each plugin's reason, without pydicom's logged tracebacks.
A header value that cannot be read (a US element of odd length, a Modality
LUT item without or with an unusable LUTDescriptor) is refused the same way,
never passed on as another exception. A compressed frame must declare the
header's size and a bounded JPEG 2000 tile grid (:func:`check_codestream`):
decoders allocate what the codestream says, so a small header cannot smuggle
in a huge frame. A deflated data set is inflated once, bounded, before pydicom
sees it (:func:`check_deflated`): pydicom inflates it whole, without a limit.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError

# pydicom's own readers of what precedes a deflated data set (private: an
# upgrade that renames them fails here, at import, not silently).
from pydicom.filereader import (
    _read_command_set_elements,
    _read_file_meta_info,
    read_preamble,
)
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from common.config.site import DEFAULT_MAX_PIXELS
from common.errors import RefusedImage, one_line, shown
from common.fileio import has_dicom_preamble
from common.imaging.codestream import codestream_shape, codestream_tiling
from common.imaging.image import (
    MAX_SPACING_MM,
    MIN_SPACING_MM,
    ImageMeta,
    MammoImage,
    check_min_side,
)
from common.imaging.preprocess import standardize
from common.imaging.specks import find_specks
from common.keys import (
    FOR_PRESENTATION,
    FOR_PROCESSING,
    LEFT,
    RIGHT,
    SPACING_CONFIG,
    SPACING_IMAGER,
    SPACING_IMAGER_MAG,
    SPACING_PIXEL,
    VIEW_CC,
    VIEW_MLO,
)

log = logging.getLogger(__name__)

#: ``laterality_source`` values set here (``"breast-side"`` comes from preprocess).
LATERALITY_IMAGE = "ImageLaterality"
LATERALITY_SERIES = "Laterality"
#: :func:`read_header` only: the header does not say and pixels were not read.
LATERALITY_UNKNOWN = "unknown"
#: Values larger than this are read from the file only when used (PixelData):
#: the header checks run before any pixel byte is read.
DEFER_SIZE = "64 KB"

#: An element length of 0xFFFFFFFF: encapsulated (compressed) pixel data.
UNDEFINED_LENGTH = 0xFFFFFFFF
#: The only photometric interpretations read (greyscale).
GREYSCALE = ("MONOCHROME1", "MONOCHROME2")
#: BitsAllocated values the reader decodes (and the pixel budget counts): 8 and
#: 16 (PS3.3 for MG, DX and SC greyscale), 32, and 1 (packed bits). pydicom
#: itself takes 1 or a multiple of 8 up to 64, but 0 is no size at all.
BITS_ALLOCATED = (1, 8, 16, 32)
#: A deflated data set (Deflated Explicit VR Little Endian) may inflate to at
#: most this many bytes. pydicom inflates it whole in memory; a few kB of
#: deflate can say gigabytes. The default pixel budget admits at most 64 MiB of
#: pixels (a 5000 x 4000 x 2-byte mammogram is 40 MB), so 512 MiB refuses no
#: real mammogram.
MAX_INFLATED_BYTES = 512 * 2**20
#: Bytes read from the file, and inflated, per step of :func:`check_deflated`.
_INFLATE_STEP = 2**20
#: The logger pydicom's pixel decoders write each failing plugin's traceback
#: to (at ERROR), silenced around :func:`decode_pixels`' decode only.
PYDICOM_DECODER_LOGGER = "pydicom.pixels.decoders.base"
#: How pydicom's error starts when every decoding plugin failed.
_ALL_FAILED = "Unable to decode as exceptions were raised by all available plugins"
#: Percentiles used to normalize FOR PROCESSING images after the log transform.
PROCESSING_PERCENTILES = (0.01, 99.99)

#: Transfer syntaxes whose frames declare their own size (JPEG, JPEG-LS, JPEG
#: 2000 and HTJ2K), checked by :func:`check_codestream` before decoding.
SIZED_CODESTREAMS = frozenset(
    str(uid)
    for uid in (
        *JPEGTransferSyntaxes,
        *JPEGLSTransferSyntaxes,
        *JPEG2000TransferSyntaxes,
    )
)
#: PS3.5 9.1: components of digits separated by dots, no leading zero, <= 64.
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")

#: SOP classes that are mammography by definition.
MAMMO_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1.2": "Digital Mammography X-Ray Image - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.2.1": "Digital Mammography X-Ray Image - For Processing",
}
#: Projection-radiography modalities accepted when BodyPartExamined is BREAST.
PROJECTION_MODALITIES = frozenset({"MG", "RG", "DX", "CR", "OT", "SC", ""})

#: Which package decodes which transfer syntax (for the refusal message).
DECODER_PACKAGES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg or gdcm",
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg or gdcm",
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg or gdcm",
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg or gdcm",
    "1.2.840.10008.1.2.4.80": "pylibjpeg-libjpeg, pyjpegls or gdcm",
    "1.2.840.10008.1.2.4.81": "pylibjpeg-libjpeg, pyjpegls or gdcm",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg or gdcm",
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg or gdcm",
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg-rle (or pydicom's own RLE decoder)",
}

#: ViewCodeSequence codes (SNOMED-RT and SNOMED CT) -> view word.
VIEW_CODES: dict[str, str] = {
    "R-10242": VIEW_CC,
    "399162004": VIEW_CC,
    "R-10226": VIEW_MLO,
    "399368009": VIEW_MLO,
    "R-10224": "ML",
    "399260004": "ML",
    "R-10236": "LM",
    "399352003": "LM",
}
#: CodeMeaning (lower case, hyphens and spaces removed) -> view word.
VIEW_MEANINGS: dict[str, str] = {
    "craniocaudal": VIEW_CC,
    "mediolateraloblique": VIEW_MLO,
    "mediolateral": "ML",
    "lateromedial": "LM",
}


def _first(value: Any) -> Any:
    """The first item of a multi-valued element (``None`` if empty), else ``value``."""
    if isinstance(value, pydicom.multival.MultiValue):
        return value[0] if len(value) else None
    return value


def header_text(ds: Dataset, keyword: str) -> str:
    """A header value as stripped text (all its values); ``""`` when absent."""
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def is_valid_uid(value: str) -> bool:
    """Whether ``value`` is a syntactically valid DICOM UID (safe as a file name).

    PS3.5 9.1: at most 64 characters, digits in dot-separated components, no
    component with a leading zero; so never ``/``, ``..`` or an empty string.
    """
    return len(value) <= 64 and _UID_RE.fullmatch(value) is not None


def first_text(ds: Dataset, keyword: str) -> str:
    """A header's first value as stripped text; ``""`` when absent or empty."""
    value = _first(ds.get(keyword))
    return "" if value is None else str(value).strip()


def is_dicom(path: str | Path) -> bool:
    """Whether ``path`` is a DICOM file, judged by content, not by suffix.

    True when bytes 128..132 are ``DICM``, or when pydicom (forced) parses a
    dataset holding at least one of SOPClassUID, Modality or Rows.
    A file meta group whose deflated data set is over
    :data:`MAX_INFLATED_BYTES` counts as DICOM (the reader refuses it, saying
    why); nothing is inflated past that bound.
    """
    if has_dicom_preamble(path):
        return True
    try:
        ds = dcmread_bounded(path, force=True, stop_before_pixels=True)
    except RefusedImage:  # a deflate bomb behind a file meta group
        return True
    except Exception:  # noqa: BLE001 - any parse failure means "not DICOM"
        return False
    return any(k in ds for k in ("SOPClassUID", "Modality", "Rows"))


def _inflated_size(fp: BinaryIO, limit: int) -> int:
    """Bytes the raw deflate stream from ``fp``'s position inflates to.

    Inflates :data:`_INFLATE_STEP` bytes at a time and keeps none of them;
    stops at the end of the stream, or as soon as more than ``limit`` bytes
    came out (the count returned is then ``> limit``, not the full size).

    Raises:
        zlib.error: the stream is corrupt.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    while not inflater.eof:
        pending = fp.read(_INFLATE_STEP)
        if not pending:
            break
        while True:
            out = inflater.decompress(pending, _INFLATE_STEP)
            total += len(out)
            if total > limit:
                return total
            pending = inflater.unconsumed_tail
            if not pending and len(out) < _INFLATE_STEP:
                break  # input used up and output drained
    return total + len(inflater.flush())


def check_deflated(path: str | Path) -> None:
    """Refuse a deflated data set that would inflate past the bound.

    Reads the preamble, the file meta group (never deflated) and any command
    group exactly as :func:`pydicom.dcmread` (forced) does; when the
    TransferSyntaxUID is Deflated Explicit VR Little Endian, the rest of the
    file is inflated in steps, keeping nothing, and counted up to
    :data:`MAX_INFLATED_BYTES`. pydicom itself would inflate it whole in one
    allocation. Anything that is not a deflated data set, or whose file meta
    cannot be read, is left to pydicom (which then fails as before, before
    inflating anything).

    Raises:
        RefusedImage: the deflated data set inflates to more than
            :data:`MAX_INFLATED_BYTES`, or is not a valid deflate stream
            (naming TransferSyntaxUID and the sizes).
    """
    limit = MAX_INFLATED_BYTES
    with open(path, "rb") as fp:
        try:
            read_preamble(fp, True)
            ts = _read_file_meta_info(fp).get("TransferSyntaxUID")
            if ts != DeflatedExplicitVRLittleEndian:
                return
            _read_command_set_elements(fp)
        except MemoryError:
            raise
        except Exception:  # noqa: BLE001 - pydicom reports its own parse errors
            return
        start = fp.tell()
        where = f"TransferSyntaxUID={ts} ({UID(str(ts)).name})"
        try:
            inflated = _inflated_size(fp, limit)
        except zlib.error as exc:
            raise RefusedImage(
                str(path),
                f"{where}: the deflated data set (from byte {start}) is not a "
                f"valid deflate stream: {one_line(exc)}",
            ) from exc
        if inflated > limit:
            deflated = fp.seek(0, 2) - start
            raise RefusedImage(
                str(path),
                f"{where}: the deflated data set ({deflated} bytes from byte "
                f"{start}) inflates to more than MAX_INFLATED_BYTES = {limit} "
                "bytes: refused before pydicom inflates it",
            )


def dcmread_bounded(
    path: str | Path,
    *,
    force: bool = False,
    stop_before_pixels: bool = False,
    defer_size: str | int | None = None,
) -> pydicom.FileDataset:
    """:func:`pydicom.dcmread` of a file, after :func:`check_deflated`.

    For every file that is not a deflate bomb the result is ``dcmread``'s,
    and so are its errors; a legitimate deflated file is read by pydicom as
    before (inflated a second time, now known to be bounded).

    Raises:
        RefusedImage: see :func:`check_deflated`.
    """
    check_deflated(path)
    # pydicom warns about what it tolerates (a VR other than the transfer
    # syntax's, an odd-length value) without naming the file: those warnings
    # become log lines that name it
    # (pydicom also logs most of them to its own logger: held, and said once)
    with (
        _held_records("pydicom", _is_plain_warning) as held,
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        try:
            return pydicom.dcmread(
                path,
                force=force,
                stop_before_pixels=stop_before_pixels,
                defer_size=defer_size,
            )
        finally:
            said = [str(w.message) for w in caught] + [r.getMessage() for r in held]
            for message in dict.fromkeys(said):
                log.warning("%s: pydicom: %s", path, message)


class _Held(logging.Filter):
    """Holds, instead of passing on, the records ``keep`` selects."""

    def __init__(self, keep: Callable[[logging.LogRecord], bool]) -> None:
        super().__init__()
        self.keep = keep
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        """Drop (and hold) a record ``keep`` selects; pass any other."""
        if self.keep(record):
            self.records.append(record)
            return False
        return True


@contextmanager
def _held_records(
    logger_name: str, keep: Callable[[logging.LogRecord], bool]
) -> Iterator[list[logging.LogRecord]]:
    """Hold a logger's records that ``keep`` selects, for the duration only.

    They go to the yielded list instead of being written; the logger's other
    records pass, and the filter is removed on the way out.
    """
    logger = logging.getLogger(logger_name)
    held = _Held(keep)
    logger.addFilter(held)
    try:
        yield held.records
    finally:
        logger.removeFilter(held)


def _is_plain_warning(record: logging.LogRecord) -> bool:
    return record.levelno == logging.WARNING and record.exc_info is None


def _has_traceback(record: logging.LogRecord) -> bool:
    return record.exc_info is not None


def read_dataset(path: str | Path) -> Dataset:
    """Parse a file, deferring values over :data:`DEFER_SIZE` (PixelData).

    Deferred values are read from the file when first used, so header checks
    cost no pixel memory. Unreadable or non-DICOM files are refused, and so is
    a deflated data set larger than :data:`MAX_INFLATED_BYTES`
    (:func:`check_deflated`).
    """
    try:
        return dcmread_bounded(path, force=True, defer_size=DEFER_SIZE)
    except FileNotFoundError as exc:
        raise RefusedImage(str(path), f"file not found: {one_line(exc)}") from exc
    except (
        InvalidDicomError,
        OSError,
        ValueError,
        EOFError,
        KeyError,
        zlib.error,
    ) as exc:
        raise RefusedImage(
            str(path), f"unreadable DICOM (truncated or corrupt): {one_line(exc)}"
        ) from exc


def check_breast_image(ds: Dataset, path: str | Path) -> None:
    """Refuse a dataset that is not a breast projection image.

    Accepted when Modality is MG, or the SOP class is a digital mammography
    class, or BodyPartExamined is BREAST on a projection modality (RG, DX, CR,
    OT or blank, e.g. digitised film stored as Secondary Capture). A CT, MR or
    ultrasound of the breast is refused.
    """
    modality = first_text(ds, "Modality").upper()
    sop = first_text(ds, "SOPClassUID")
    body = first_text(ds, "BodyPartExamined").upper()
    if modality == "MG" or sop in MAMMO_SOP_CLASSES:
        return
    if body == "BREAST" and modality in PROJECTION_MODALITIES:
        return
    sop_name = UID(sop).name if sop else "absent"
    raise RefusedImage(
        str(path),
        f"not a breast projection image: Modality={modality or 'absent'!r}, "
        f"SOPClassUID={sop or 'absent'} ({sop_name}), "
        f"BodyPartExamined={body or 'absent'!r}",
    )


def spacing_pair(values: Any) -> tuple[float, float] | None:
    """``(row, column)`` mm of a 2-valued spacing tag; ``None`` if not two numbers."""
    try:
        row, col = (float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return row, col


def plausible_spacing(pair: tuple[float, float]) -> bool:
    """Both values finite and in ``[MIN_SPACING_MM, MAX_SPACING_MM]``."""
    return all(math.isfinite(v) and MIN_SPACING_MM <= v <= MAX_SPACING_MM for v in pair)


def _valid_spacing(values: Any, keyword: str, path: str | Path) -> float | None:
    """Row spacing in mm from a 2-valued spacing tag, or ``None`` if implausible."""
    pair = spacing_pair(values)
    if pair is None:
        log.warning("%s: %s=%r is not two numbers: ignored", path, keyword, values)
        return None
    row, col = pair
    where = f"{path}: {keyword}=[{row}, {col}]"
    if not plausible_spacing(pair):
        lo, hi = MIN_SPACING_MM, MAX_SPACING_MM
        log.warning("%s mm outside [%s, %s]: treated as absent", where, lo, hi)
        return None
    if abs(row - col) > 0.01 * row:
        log.warning("%s is anisotropic: using the row spacing %s mm", where, row)
    return row


def resolve_spacing(
    ds: Dataset, path: str | Path, default_spacing_mm: float | None = None
) -> tuple[float, str]:
    """``(mm per stored pixel, source)`` with source one of ``common.keys.SPACING_*``.

    Order: PixelSpacing; ImagerPixelSpacing divided by
    EstimatedRadiographicMagnificationFactor when present (and plausible);
    the site default; else refuse. Implausible values are logged and skipped.
    """
    if "PixelSpacing" in ds and ds.PixelSpacing is not None:
        mm = _valid_spacing(ds.PixelSpacing, "PixelSpacing", path)
        if mm is not None:
            return mm, SPACING_PIXEL
    if "ImagerPixelSpacing" in ds and ds.ImagerPixelSpacing is not None:
        mm = _valid_spacing(ds.ImagerPixelSpacing, "ImagerPixelSpacing", path)
        if mm is not None:
            mag_raw = first_text(ds, "EstimatedRadiographicMagnificationFactor")
            if mag_raw:
                try:
                    mag = float(mag_raw)
                except ValueError:
                    mag = float("nan")
                if math.isfinite(mag) and 0.5 <= mag <= 5.0:
                    mm_mag = mm / mag
                    if MIN_SPACING_MM <= mm_mag <= MAX_SPACING_MM:
                        return mm_mag, SPACING_IMAGER_MAG
                log.warning(
                    "%s: EstimatedRadiographicMagnificationFactor=%r implausible: "
                    "using ImagerPixelSpacing unchanged",
                    path,
                    mag_raw,
                )
            return mm, SPACING_IMAGER
    if default_spacing_mm is not None:
        if not (MIN_SPACING_MM <= default_spacing_mm <= MAX_SPACING_MM):
            raise ValueError(
                f"default_spacing_mm={default_spacing_mm} outside "
                f"[{MIN_SPACING_MM}, {MAX_SPACING_MM}] mm"
            )
        return float(default_spacing_mm), SPACING_CONFIG
    raise RefusedImage(
        str(path),
        "no usable pixel spacing (PixelSpacing/ImagerPixelSpacing absent or "
        "implausible) and no site default_spacing_mm",
    )


def resolve_laterality(
    ds: Dataset, path: str | Path = "<dataset>"
) -> tuple[str | None, str | None]:
    """``(laterality, source)`` from ImageLaterality then Laterality; else Nones.

    Both hold one value; a header with several (``L`` and ``R``) says nothing
    reliable, so it is passed over with a warning naming ``path`` (the next
    field, then the breast's side in the image, decide).
    """
    for keyword, source in (
        ("ImageLaterality", LATERALITY_IMAGE),
        ("Laterality", LATERALITY_SERIES),
    ):
        elem = ds.get(keyword)
        raw = getattr(elem, "value", elem)
        if isinstance(raw, pydicom.multival.MultiValue) and len(raw) > 1:
            log.warning(
                "%s: %s=%s holds %d values (one expected): ignored",
                path,
                keyword,
                shown("\\".join(str(v) for v in raw)),
                len(raw),
            )
            continue
        value = first_text(ds, keyword).upper()
        if value in (LEFT, RIGHT):
            return value, source
    return None, None


def resolve_view(ds: Dataset) -> str | None:
    """View word from ViewPosition, else from ViewCodeSequence; ``None`` if neither.

    ViewPosition is returned upper-case as written (``CC``, ``MLO``, ``ML``, ...).
    ViewCodeSequence is mapped by CodeValue (SNOMED-RT ``R-10242``/SNOMED CT
    ``399162004`` -> CC, ``R-10226``/``399368009`` -> MLO, ML, LM), then by
    CodeMeaning (``cranio-caudal``, ``medio-lateral oblique``, ...).
    """
    vp = first_text(ds, "ViewPosition").upper()
    if vp:
        return vp
    seq = ds.get("ViewCodeSequence")
    if not isinstance(seq, DicomSequence) or not seq:  # e.g. written as text
        return None
    code = str(seq[0].get("CodeValue", "")).strip()
    meaning = str(seq[0].get("CodeMeaning", "")).lower()
    meaning = meaning.replace("-", "").replace(" ", "")
    return VIEW_CODES.get(code) or VIEW_MEANINGS.get(meaning)


def chest_wall_hint(ds: Dataset) -> str | None:
    """``"left"``/``"right"`` from PatientOrientation's row direction, else ``None``.

    Row direction ``A`` (columns run towards the nipple) puts the chest wall at
    the left edge; ``P`` at the right edge. Other values say nothing.
    """
    po = ds.get("PatientOrientation")
    if not po:
        return None
    first = str(po[0]).strip().upper()
    if first.startswith("A"):
        return "left"
    if first.startswith("P"):
        return "right"
    return None


def read_header(
    path: str | Path, *, default_spacing_mm: float | None = None
) -> ImageMeta:
    """Header facts of a DICOM file without decoding its pixels.

    Checks that the file is a breast image and that a spacing can be found; it
    does not require pixel data (so shrunk or pixel-less test files still expose
    their metadata). When the header gives no laterality, ``laterality`` is
    ``""`` and ``laterality_source`` is :data:`LATERALITY_UNKNOWN` (the pixel
    reader infers it from the breast side).

    Raises:
        RefusedImage: unreadable file, not a breast image, no usable spacing.
    """
    ds = read_dataset(path)
    return _meta(ds, path, default_spacing_mm)


def _meta(ds: Dataset, path: str | Path, default_spacing_mm: float | None) -> ImageMeta:
    """Build the ImageMeta of a parsed dataset (no pixel access)."""
    check_breast_image(ds, path)
    spacing, spacing_source = resolve_spacing(ds, path, default_spacing_mm)
    laterality, lat_source = resolve_laterality(ds, path)
    return ImageMeta(
        source=str(path),
        sop_instance_uid=first_text(ds, "SOPInstanceUID") or None,
        patient_id=first_text(ds, "PatientID") or None,
        manufacturer=first_text(ds, "Manufacturer"),
        model=first_text(ds, "ManufacturerModelName"),
        view=resolve_view(ds),
        laterality=laterality or "",
        laterality_source=lat_source or LATERALITY_UNKNOWN,
        stored_spacing_mm=float(spacing),
        spacing_source=spacing_source,
        presentation_intent=first_text(ds, "PresentationIntentType").upper() or None,
        photometric=first_text(ds, "PhotometricInterpretation").upper() or None,
        rows=_header_int(ds, "Rows", path, 0),
        cols=_header_int(ds, "Columns", path, 0),
    )


def _shown(ds: Dataset, keyword: str) -> Any:
    """A header value for a message: converted if it can be, else its raw bytes."""
    try:
        return ds[keyword].value if keyword in ds else None
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - the value is what failed to convert
        return getattr(ds.get_item(keyword), "value", None)


def _header_int(ds: Dataset, keyword: str, path: str | Path, default: int) -> int:
    """An integer header value (``default`` when absent or empty).

    Any failure to read the value (not an integer, a binary element of the
    wrong length such as a 3-byte US: pydicom's ``BytesLengthException``...)
    is a refusal; only ``MemoryError`` passes.

    Raises:
        RefusedImage: the value cannot be read, is not an integer or is
            negative (naming the field and the value, raw bytes if need be).
    """
    try:
        raw = _first(ds.get(keyword))
        if raw is None or str(raw).strip() == "":
            return default
        value = int(raw)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - BytesLengthException, TypeError...
        raise RefusedImage(
            str(path),
            f"{keyword}={_shown(ds, keyword)!r} is not an integer: {one_line(exc)}",
        ) from exc
    if value < 0:
        raise RefusedImage(str(path), f"{keyword}={value} is negative")
    return value


def check_pixel_budget(
    ds: Dataset, path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> None:
    """Refuse a file whose decoded pixels would exceed the budget (header only).

    ``samples`` = Rows x Columns x NumberOfFrames x SamplesPerPixel and decoded
    bytes = ``samples`` x ceil(BitsAllocated / 8), from the header alone (no
    pixel byte is read or decoded). Refused when ``samples > max_pixels`` or
    the bytes exceed ``2 * max_pixels`` (16 bits a sample). ``None`` disables
    the check. Native (not encapsulated) pixel data is also refused when the
    element holds a frame or more beyond what that header makes: the
    header's word is what the budget checks, and pydicom reads every byte
    the element holds (a 256 x 256 header over 300 MiB is read as thousands
    of frames); a deferred element's length tells it without reading. Less
    than a frame of excess is padding pydicom drops, as before.

    Raises:
        RefusedImage: over budget, naming the fields and their values; or a
            BitsAllocated the reader does not decode (:func:`check_bits_allocated`,
            checked even without a budget).
    """
    check_bits_allocated(ds, path)
    if max_pixels is None:
        return
    rows = _header_int(ds, "Rows", path, 0)
    cols = _header_int(ds, "Columns", path, 0)
    frames = _header_int(ds, "NumberOfFrames", path, 1)
    spp = _header_int(ds, "SamplesPerPixel", path, 1)
    bits = _header_int(ds, "BitsAllocated", path, 16)
    samples = rows * cols * frames * spp
    nbytes = samples * max(1, math.ceil(bits / 8))
    if samples > max_pixels or nbytes > 2 * max_pixels:
        raise RefusedImage(
            str(path),
            f"over the pixel budget: Rows x Columns x NumberOfFrames x "
            f"SamplesPerPixel = {rows} x {cols} x {frames} x {spp} = {samples} "
            f"samples, {nbytes} bytes decoded at BitsAllocated={bits} "
            f"(max_pixels={max_pixels}: at most {max_pixels} samples and "
            f"{2 * max_pixels} bytes)",
        )
    held = _pixel_data_length(ds)
    made = math.ceil(samples / 8) if bits == 1 else nbytes
    frame = max(1, made // max(1, frames))
    if held is not None and held >= made + frame:
        raise RefusedImage(
            str(path),
            f"PixelData holds {held} bytes, a frame or more beyond the {made} "
            f"bytes of the header's Rows x Columns x NumberOfFrames x "
            f"SamplesPerPixel = {rows} x {cols} x {frames} x {spp} at "
            f"BitsAllocated={bits}",
        )


def check_bits_allocated(ds: Dataset, path: str | Path) -> None:
    """Refuse a BitsAllocated that is not one of :data:`BITS_ALLOCATED`.

    An absent BitsAllocated is left to the decoder (the budget counts 16).

    Raises:
        RefusedImage: ``"BitsAllocated=0 is invalid: expected 1, 8, 16 or 32"``
            (a value that is no integer: see :func:`_header_int`).
    """
    if "BitsAllocated" not in ds:
        return
    bits = _header_int(ds, "BitsAllocated", path, 16)
    if bits not in BITS_ALLOCATED:
        allowed = ", ".join(map(str, BITS_ALLOCATED[:-1]))
        raise RefusedImage(
            str(path),
            f"BitsAllocated={bits} is invalid: expected {allowed} or "
            f"{BITS_ALLOCATED[-1]} bits per stored sample",
        )


def _pixel_data_length(ds: Dataset) -> int | None:
    """Bytes the native PixelData element holds; ``None``: encapsulated or absent.

    Read from the element's length (a deferred or raw element is not read).
    """
    if "PixelData" not in ds:
        return None
    item = ds.get_item("PixelData", keep_deferred=True)  # not read from the file
    length = getattr(item, "length", None)  # a raw (or deferred) element
    if length is None:
        value = getattr(item, "value", None)
        length = len(value) if isinstance(value, bytes | bytearray) else None
    if (
        length is None
        or length == UNDEFINED_LENGTH
        or getattr(item, "is_undefined_length", False)  # converted, encapsulated
    ):
        return None
    return int(length)


def check_greyscale(ds: Dataset, path: str | Path) -> None:
    """Refuse colour data (SamplesPerPixel != 1, or not MONOCHROME1/2).

    Refused: SamplesPerPixel other than 1, and any PhotometricInterpretation
    but MONOCHROME1 and MONOCHROME2 (RGB, YBR_*, PALETTE COLOR, absent...).

    Raises:
        RefusedImage: naming the field and its value.
    """
    spp = _header_int(ds, "SamplesPerPixel", path, 1)
    if spp != 1:
        raise RefusedImage(
            str(path), f"not greyscale: SamplesPerPixel={spp} (expected 1)"
        )
    photometric = first_text(ds, "PhotometricInterpretation").upper()
    if photometric not in GREYSCALE:
        raise RefusedImage(
            str(path),
            f"not greyscale: PhotometricInterpretation={photometric or 'absent'!r} "
            f"(expected {' or '.join(GREYSCALE)})",
        )


def check_pixel_data(
    ds: Dataset, path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> None:
    """Refuse what cannot or should not be decoded, before decoding.

    No PixelData; a BitsAllocated the reader does not decode
    (:func:`check_bits_allocated`); over the pixel budget
    (:func:`check_pixel_budget`); a transfer syntax with no installed decoder
    (naming the UID, its name and the package that would decode it);
    multi-frame or colour data (:func:`check_greyscale`); a grid too small for
    a mammogram (:func:`common.imaging.image.check_min_side`). Reads the
    header only.
    """
    if "PixelData" not in ds:
        raise RefusedImage(str(path), "no pixel data (PixelData element missing)")
    check_bits_allocated(ds, path)
    check_pixel_budget(ds, path, max_pixels)
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is not None:
        ts = UID(str(ts))
        package = DECODER_PACKAGES.get(str(ts))
        known = ts.is_transfer_syntax
        label = f"{ts.name} ({ts})" if known else f"unknown/private syntax {ts}"
        try:
            decoder = get_decoder(ts)
        except NotImplementedError as exc:
            none = "no installed pixel decoder handles it"
            needs = f"needs {package}" if package else none
            raise RefusedImage(
                str(path), f"unsupported transfer syntax {label}: {needs}"
            ) from exc
        if not decoder.is_available:
            raise RefusedImage(
                str(path),
                f"transfer syntax {label} needs {package or 'no known package'}, "
                "none installed",
            )
    frames = _header_int(ds, "NumberOfFrames", path, 1)
    if frames > 1:
        raise RefusedImage(
            str(path), f"multi-frame image (NumberOfFrames={frames}) not supported"
        )
    check_greyscale(ds, path)
    rows, cols = _header_int(ds, "Rows", path, 0), _header_int(ds, "Columns", path, 0)
    check_min_side(path, rows, cols, f"pixel array {rows}x{cols} (Rows x Columns)")


def check_codestream(ds: Dataset, path: str | Path) -> None:
    """Refuse compressed frames that do not declare the header's size.

    For JPEG, JPEG-LS, JPEG 2000 and HTJ2K transfer syntaxes
    (:data:`SIZED_CODESTREAMS`), every frame pydicom would decode (split as
    its decoder splits them: Basic or Extended Offset Table, NumberOfFrames)
    must declare, in its own SIZ or SOF segment
    (:func:`common.imaging.codestream.codestream_shape`), the header's
    Rows x Columns x SamplesPerPixel: the decoder allocates what the
    codestream says, so the header's pixel budget only holds if they agree.
    A JPEG 2000 / HTJ2K frame must also declare a valid tile grid of at most
    :data:`common.imaging.codestream.MAX_J2K_TILES` tiles (openjpeg allocates
    per tile, and SIZ may ask for 65,535 tiles of one pixel).
    Reads the (compressed) pixel data, decodes nothing. Other syntaxes
    (native, RLE, deflated) are not looked at: their decoded size follows
    from the header.

    Raises:
        RefusedImage: the encapsulation cannot be split into frames, a frame's
            size cannot be read, or it differs from the header (naming both),
            or its SIZ tile grid is invalid or too fine (naming the SIZ
            fields and the tile count).
    """
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is None or str(ts) not in SIZED_CODESTREAMS:
        return
    header = (
        _header_int(ds, "Rows", path, 0),
        _header_int(ds, "Columns", path, 0),
        _header_int(ds, "SamplesPerPixel", path, 1),
    )
    rows, cols, spp = header
    declared = f"Rows x Columns x SamplesPerPixel = {rows} x {cols} x {spp}"
    offsets = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    try:
        frames = generate_frames(
            ds.PixelData,
            number_of_frames=_header_int(ds, "NumberOfFrames", path, 1) or 1,
            extended_offsets=offsets,
        )
        for index, frame in enumerate(frames):
            shape = codestream_shape(frame)
            if shape is None:
                raise RefusedImage(
                    str(path),
                    f"compressed frame {index} ({UID(str(ts)).name}): no readable "
                    f"SIZ/SOF segment giving its size (header: {declared})",
                )
            if shape != header:
                got = " x ".join(map(str, shape))
                raise RefusedImage(
                    str(path),
                    f"compressed frame {index} ({UID(str(ts)).name}) declares "
                    f"rows x columns x components = {got} in its codestream, "
                    f"the header {declared}",
                )
            tiling = codestream_tiling(frame)
            problem = tiling.problem() if tiling is not None else None
            if problem is not None:
                raise RefusedImage(
                    str(path),
                    f"compressed frame {index} ({UID(str(ts)).name}): SIZ tiles: "
                    f"{problem}",
                )
    except (RefusedImage, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt encapsulation, many types
        raise RefusedImage(
            str(path), f"encapsulated pixel data unreadable: {one_line(exc)}"
        ) from exc


def _window(
    values: np.ndarray, center: float, width: float, function: str
) -> np.ndarray:
    """PS3.3 C.11.2.1.2 windowing to ``[0, 1]`` (LINEAR, LINEAR_EXACT, SIGMOID)."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width <= 1:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _lut_entries(item: Dataset) -> np.ndarray:
    """A LUT item's LUTData as float64 entries (size 0 when empty).

    LUTData stored as OW (bytes) is read as 16-bit little-endian words; an
    empty US element (value ``None``) holds no entry.

    Raises:
        AttributeError: no LUTData; ValueError, TypeError: unreadable values.
    """
    raw = item.LUTData
    if raw is None:
        return np.zeros(0)
    if isinstance(raw, bytes | bytearray):
        # LUTData may be stored as OW: 16-bit little-endian words.
        return np.frombuffer(bytes(raw), dtype="<u2").astype(np.float64)
    return np.asarray(raw, dtype=np.float64).ravel()


def check_lut_length(declared: int, held: int, where: str, path: str | Path) -> None:
    """Refuse a LUT whose LUTData holds no entry, or fewer than declared.

    ``declared``: LUTDescriptor's first value (0 means 65536, PS3.3
    C.11.1.1); ``where``: the item, e.g. ``"VOILUTSequence[0]"``. A LUT cut
    short would map every value past its end to the last entry held (a
    near-binary image the model would score).

    Raises:
        RefusedImage: ``"VOILUTSequence[0]: empty LUTData"``, or
            ``"VOILUTSequence[0]: LUTDescriptor declares 4096 entries,
            LUTData holds 2"``.
    """
    if held < 1:
        raise RefusedImage(str(path), f"{where}: empty LUTData")
    n = declared or 65536
    if held < n:
        zero = " (first value 0)" if not declared else ""
        raise RefusedImage(
            str(path),
            f"{where}: LUTDescriptor declares {n} entries{zero}, LUTData holds {held}",
        )


def _voi_lut(
    values: np.ndarray,
    item: Dataset,
    path: str | Path,
    where: str = "VOILUTSequence[0]",
) -> np.ndarray:
    """Apply one VOI LUT Sequence item ``where``; output scaled to ``[0, 1]``.

    Raises:
        RefusedImage: no usable LUTDescriptor or LUTData, bits per entry
            outside 0..16, or LUTData empty or shorter than the descriptor
            declares (:func:`check_lut_length`), naming the item.
    """
    try:
        n, first, bits = (int(v) for v in item.LUTDescriptor)
        data = _lut_entries(item)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - absent, mistyped or wrong-length
        raise RefusedImage(str(path), f"{where} unusable: {one_line(exc)}") from exc
    if not 0 <= bits <= 16:  # PS3.3 C.11.2.1.1: 8 or 16; 0 read as the data's max
        raise RefusedImage(
            str(path),
            f"{where}: LUTDescriptor bits per entry = {bits} (expected 0 to 16)",
        )
    check_lut_length(n, data.size, where, path)
    n = n or 65536
    idx = np.clip(np.rint(values - first), 0, n - 1).astype(np.int64)
    out = data[idx]
    top = max(float(2**bits - 1), float(data[:n].max()), 1.0)
    return out / top


def check_modality_lut_length(ds: Dataset, path: str | Path) -> None:
    """Refuse a ModalityLUTSequence item whose LUTData is short (before pydicom).

    pydicom's ``apply_modality_lut`` clips the stored values to the
    descriptor's count and indexes the data with them: short LUTData either
    fails with an IndexError naming nothing or, when the values stay within
    it, maps silently. Only the lengths are checked here (when the first
    item has a LUTData and a LUTDescriptor whose first value reads as an
    integer): any other fault is left to the Modality LUT's own refusal
    (:func:`to_unit_range`), which names it.

    Raises:
        RefusedImage: see :func:`check_lut_length`
            (``"ModalityLUTSequence[0]: ..."``).
    """
    try:
        seq = ds.get("ModalityLUTSequence")
        if not seq or "LUTData" not in seq[0]:
            return
        item = seq[0]
        declared = int(item.LUTDescriptor[0])
        held = _lut_entries(item).size
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - refused, by name, when pydicom applies it
        return
    check_lut_length(declared, held, "ModalityLUTSequence[0]", path)


def _invert(ds: Dataset, path: str | Path = "<dataset>") -> bool:
    """Whether low stored values mean bright: MONOCHROME1, or MONOCHROME2 + INVERSE.

    DICOM requires PresentationLUTShape INVERSE together with MONOCHROME1 for
    DX/MG, and both describe the same single inversion; INVERSE on a MONOCHROME2
    image inverts it.
    """
    photometric = first_text(ds, "PhotometricInterpretation").upper()
    shape = first_text(ds, "PresentationLUTShape").upper()
    if shape not in ("", "IDENTITY", "INVERSE"):
        log.warning(
            "%s: PresentationLUTShape=%s is neither IDENTITY nor INVERSE: read "
            "as IDENTITY",
            path,
            shown(shape),
        )
    return photometric == "MONOCHROME1" or (
        photometric == "MONOCHROME2" and shape == "INVERSE"
    )


def _rescale_text(ds: Dataset) -> str:
    """``RescaleSlope=..., RescaleIntercept=...`` as written in the header."""
    return ", ".join(
        f"{k}={str(ds[k].value).strip()!r}" if k in ds else f"{k} absent"
        for k in ("RescaleSlope", "RescaleIntercept")
    )


def _modality_lut_text(ds: Dataset) -> str:
    """The Modality LUT fields as written, for a refusal (never raises).

    The first ModalityLUTSequence item's LUTDescriptor (or ``absent``), else
    RescaleSlope/RescaleIntercept.
    """
    try:
        seq = ds.get("ModalityLUTSequence")
        if not seq:
            return _rescale_text(ds)
        item = seq[0]
        if "LUTDescriptor" not in item:
            return "ModalityLUTSequence[0].LUTDescriptor absent"
        return f"ModalityLUTSequence[0].LUTDescriptor={_shown(item, 'LUTDescriptor')!r}"
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - the message must not fail too
        return f"ModalityLUTSequence unreadable ({one_line(exc)})"


def check_rescale(ds: Dataset, path: str | Path) -> None:
    """Refuse a RescaleSlope/RescaleIntercept that is not a finite number.

    A slope of 0 is refused too (every pixel would get the same value).

    Raises:
        RefusedImage: naming the field and its value.
    """
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        text = ""
        try:  # reading the element converts it: an unparseable DS raises here
            text = first_text(ds, keyword)
            value = float(text) if text else None
        except (TypeError, ValueError) as exc:
            raise RefusedImage(
                str(path), f"Modality LUT: {keyword}={text!r} is not a number"
            ) from exc
        if value is None:
            continue
        if not math.isfinite(value) or (keyword == "RescaleSlope" and value == 0):
            what = "non-zero number" if keyword == "RescaleSlope" else "number"
            raise RefusedImage(
                str(path), f"Modality LUT: {keyword}={text!r} is not a finite {what}"
            )


def to_unit_range(arr: np.ndarray, ds: Dataset, path: str | Path) -> np.ndarray:
    """Stored values float[rows, cols] -> float32 ``[0, 1]``, dense tissue bright.

    Modality LUT first. FOR PROCESSING: ``log1p(v - min)`` then percentiles
    :data:`PROCESSING_PERCENTILES` to 0..1. Otherwise (FOR PRESENTATION or no
    intent): the first window (WindowCenter/WindowWidth with VOILUTFunction),
    else the first VOILUTSequence item, else min..max. Finally MONOCHROME1 (or
    MONOCHROME2 with INVERSE) is inverted.

    Raises:
        RefusedImage: the Modality LUT is not finite (:func:`check_rescale`),
            its LUTData is empty or shorter than declared
            (:func:`check_modality_lut_length`; a VOI LUT item's too:
            :func:`_voi_lut`), it cannot be applied (a ModalityLUTSequence
            item without LUTDescriptor, or with 12 bits per entry: naming the
            field and value), or gives a value that is not finite
            (RescaleSlope=1e308).
    """
    check_rescale(ds, path)
    check_modality_lut_length(ds, path)
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types here
        raise RefusedImage(
            str(path),
            f"Modality LUT cannot be applied: {_modality_lut_text(ds)}: "
            f"{one_line(exc)}",
        ) from exc
    lo_v, hi_v = float(values.min()), float(values.max())
    if not (math.isfinite(lo_v) and math.isfinite(hi_v)):
        raise RefusedImage(
            str(path),
            f"Modality LUT gives non-finite values (min {lo_v}, max {hi_v}): "
            f"{_rescale_text(ds)}",
        )
    intent = first_text(ds, "PresentationIntentType").upper()
    if intent == FOR_PROCESSING:
        logv = np.log1p(np.maximum(values - values.min(), 0.0))
        lo, hi = np.percentile(logv, PROCESSING_PERCENTILES)
        out = (logv - lo) / (hi - lo) if hi > lo else np.zeros_like(logv)
    else:
        if intent and intent != FOR_PRESENTATION:
            log.warning(
                "%s: PresentationIntentType=%r unknown: windowing", path, intent
            )
        out = _presentation(values, ds, path)
    out = np.clip(out, 0.0, 1.0)
    if _invert(ds, path):
        out = 1.0 - out
    return out.astype(np.float32)


def _presentation(values: np.ndarray, ds: Dataset, path: str | Path) -> np.ndarray:
    """VOI transform of a FOR PRESENTATION image to ``[0, 1]`` (see to_unit_range)."""
    centers = ds.get("WindowCenter")
    widths = ds.get("WindowWidth")
    if centers is not None and widths is not None:
        try:
            c, w = float(_first(centers)), float(_first(widths))
        except (TypeError, ValueError):
            c, w = float("nan"), float("nan")
        if math.isfinite(c) and math.isfinite(w) and w > 0:
            function = first_text(ds, "VOILUTFunction").upper() or "LINEAR"
            if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
                log.warning("%s: VOILUTFunction=%r unknown: LINEAR", path, function)
                function = "LINEAR"
            return _window(values, c, w, function)
        log.warning(
            "%s: WindowCenter=%r WindowWidth=%r unusable: trying VOILUTSequence",
            path,
            centers,
            widths,
        )
    seq = ds.get("VOILUTSequence")
    if seq:
        return _voi_lut(values, seq[0], path)
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


@contextmanager
def _decoder_tracebacks(path: str | Path) -> Iterator[None]:
    """Silence pydicom's decoder tracebacks for the duration (not globally).

    pydicom logs, at ERROR with its traceback, every plugin that fails on a
    frame (:data:`PYDICOM_DECODER_LOGGER`) before it raises one
    ``RuntimeError`` listing them all: the refusal carries those reasons
    (:func:`_decode_failure`), so the tracebacks are only written at DEBUG to
    this module's logger. The decoder's other records (warnings) pass.
    """
    with _held_records(PYDICOM_DECODER_LOGGER, _has_traceback) as kept:
        try:
            yield
        finally:
            for record in kept:
                log.debug(
                    "%s: decoder: %s",
                    path,
                    record.getMessage(),
                    exc_info=record.exc_info,
                )


def _decode_failure(exc: Exception) -> str:
    r"""The reason of a failed decode, one line.

    pydicom's ``RuntimeError("Unable to decode as exceptions were raised by
    all available plugins:\n  pylibjpeg: ...\n  pydicom: ...")`` becomes
    ``"pylibjpeg: ...; pydicom: ..."`` (each plugin's own reason, in the
    order tried); anything else :func:`common.errors.one_line`.
    """
    lines = str(exc).splitlines()
    if isinstance(exc, RuntimeError) and lines and lines[0].startswith(_ALL_FAILED):
        plugins = [line.strip() for line in lines[1:] if line.startswith("  ")]
        if any(plugins):
            return "; ".join(p for p in plugins if p)
    return one_line(exc)


def decode_pixels(
    ds: Dataset, path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode and normalize to float32[rows, cols] in ``[0, 1]``, stored space.

    Dense tissue is bright. The header is checked (:func:`check_pixel_data`,
    with the pixel budget ``max_pixels``) before any pixel byte is read, and a
    compressed frame's own size (:func:`check_codestream`) before it is
    decoded.

    Raises:
        RefusedImage: see :func:`check_pixel_data`, :func:`check_codestream`
            and :func:`to_unit_range`;
            the decoder failed (truncated or corrupt pixel data); or the result
            has no dynamic range (every pixel equal: never an all-zero or
            constant training image).
        MemoryError: passed on (the ingest reports it per file).
    """
    check_pixel_data(ds, path, max_pixels=max_pixels)
    check_codestream(ds, path)
    try:
        with _decoder_tracebacks(path):
            arr = ds.pixel_array
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - decoder errors have many types
        raise RefusedImage(
            str(path), f"pixel data cannot be decoded: {_decode_failure(exc)}"
        ) from exc
    if arr.ndim != 2:
        raise RefusedImage(
            str(path), f"pixel array has shape {arr.shape}, expected 2-D"
        )
    unit = to_unit_range(arr, ds, path)
    lo, hi = float(unit.min()), float(unit.max())
    if not hi > lo:
        raise RefusedImage(
            str(path),
            f"no dynamic range after the Modality LUT and VOI: every pixel is {lo} "
            f"(stored values {arr.min()}..{arr.max()}; {_rescale_text(ds)})",
        )
    return unit


def read_dicom(
    path: str | Path,
    *,
    working_spacing_mm: float,
    default_spacing_mm: float | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    specks: bool = False,
) -> MammoImage:
    """Read, decode and standardize one DICOM mammogram.

    Returns a :class:`MammoImage` whose pixels are float32[H, W] in ``[0, 1]`` in
    model space (cropped, breast on the left, at ``working_spacing_mm``) and whose
    Geometry maps boxes between the file's stored grid and model space. Every
    header check, the pixel budget ``max_pixels`` included, runs before the
    pixel data is read from the file. ``specks``: also find the calcification
    specks at the stored resolution (``MammoImage.specks``).

    Raises:
        RefusedImage: one-line reason (unreadable, not a breast image, no pixel
            data, over the pixel budget, colour, no decoder, too small, no
            spacing, non-finite Modality LUT, no dynamic range, decode failure).
    """
    ds = read_dataset(path)
    check_breast_image(ds, path)
    check_pixel_data(ds, path, max_pixels=max_pixels)
    meta = _meta(ds, path, default_spacing_mm)
    unit = decode_pixels(ds, path, max_pixels=max_pixels)
    pixels, geometry, laterality, lat_source = standardize(
        unit,
        stored_spacing_mm=meta.stored_spacing_mm,
        laterality=meta.laterality or None,
        working_spacing_mm=working_spacing_mm,
        chest_wall_hint=chest_wall_hint(ds),
        laterality_source=meta.laterality_source,
        source=str(path),
    )
    meta = replace(meta, laterality=laterality, laterality_source=lat_source)
    log.debug(
        "%s: %s %s %s, %s mm (%s) -> %s",
        path,
        meta.laterality,
        meta.view,
        meta.presentation_intent,
        meta.stored_spacing_mm,
        meta.spacing_source,
        geometry,
    )
    found = find_specks(unit, geometry, meta.stored_spacing_mm) if specks else None
    return MammoImage(pixels, float(working_spacing_mm), geometry, meta, found)
