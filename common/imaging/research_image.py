"""Read research images (PNG/TIFF, 8 or 16 bit greyscale) into a :class:`MammoImage`.

Research sets (e.g. mini-MIAS) carry no header: the spacing comes from the
dataset table or the site config, laterality from the table or from the breast
side. Pixel values are taken as they are (dense bright), scaled by the bit
depth's full range to ``[0, 1]``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.errors import RefusedImage
from common.imaging.image import (
    ImageMeta,
    MammoImage,
    check_min_side,
    check_spacing,
)
from common.imaging.preprocess import standardize
from common.imaging.specks import find_specks
from common.keys import LEFT, RIGHT, SPACING_TABLE

log = logging.getLogger(__name__)

#: Suffixes read by :func:`read_research_image` (lower case).
RESEARCH_SUFFIXES = frozenset({".png", ".tif", ".tiff"})
#: ``laterality_source`` when the caller (a dataset table) gives the laterality.
LATERALITY_TABLE = "table"


def load_grey01(path: str | Path) -> np.ndarray:
    """Decode a PNG/TIFF to float32[H, W] in ``[0, 1]`` (stored space).

    8-bit images are divided by 255, 16-bit by 65535 (or by the next power of
    two above the maximum when the data visibly uses fewer bits, e.g. 12-bit
    data in a 16-bit PNG), float images in ``[0, 1]`` are kept and others
    scaled by their own range (raw detector values saved as float). RGB
    images whose channels are equal are accepted as greyscale; an alpha
    plane (LA, RGBA) is dropped. As a DICOM file's
    (:func:`common.imaging.dicom.decode_pixels`), an image whose pixels are
    not all finite, or that has no dynamic range (every pixel equal, before
    or after the conversion), is refused: a black frame is no mammogram, and
    the detector scores it all the same.

    Raises:
        RefusedImage: unreadable file, colour image, unsupported mode, too
            small, pixel values not finite (``"pixel values not finite (NaN)
            ..."``), no dynamic range (``"no dynamic range: every pixel is
            0"``).
    """
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            arr = np.asarray(img)
    except FileNotFoundError as exc:
        raise RefusedImage(str(path), f"file not found: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise RefusedImage(str(path), f"unreadable image: {exc}") from exc
    if arr.ndim == 3 and arr.shape[-1] in (2, 4):
        # grey + alpha (LA) or RGBA: the alpha plane is not the image
        arr = arr[..., :-1] if arr.shape[-1] == 4 else arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3:
        if arr.shape[-1] != 3:
            raise RefusedImage(
                str(path), f"image has {arr.shape[-1]} channels (mode {mode})"
            )
        channels = arr
        if not (
            np.array_equal(channels[..., 0], channels[..., 1])
            and np.array_equal(channels[..., 0], channels[..., 2])
        ):
            raise RefusedImage(
                str(path), f"colour image (mode {mode}): expected greyscale"
            )
        arr = channels[..., 0]
    if arr.ndim != 2:
        raise RefusedImage(str(path), f"image has shape {arr.shape}, expected 2-D")
    rows, cols = arr.shape
    check_min_side(path, rows, cols, f"image {rows}x{cols}")
    if arr.dtype == np.uint8 or arr.dtype == bool:
        out = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr
    elif arr.dtype.kind in "ui":
        top = float(arr.max())
        full = float(np.iinfo(arr.dtype).max)
        bits = max(8, int(np.ceil(np.log2(top + 1)))) if top > 0 else 8
        denom = min(full, float(2**bits - 1))
        if denom < full:
            log.debug(
                "%s: %s data uses %d bits: scaling by %d", path, arr.dtype, bits, denom
            )
        out = arr.astype(np.float32) / denom
    elif arr.dtype.kind == "f":
        check_finite(path, arr)
        out = arr.astype(np.float32)
        lo, hi = float(out.min()), float(out.max())
        if (lo < 0.0 or hi > 1.0) and hi > lo:
            # raw detector values (0-4095...) saved as float: clipping them to
            # [0, 1] would leave a near-binary image; their own range scales
            log.info(
                "%s: float data spans [%g, %g], not [0, 1]: scaled by its range",
                path,
                lo,
                hi,
            )
            out = (out - lo) / (hi - lo)
    else:
        raise RefusedImage(
            str(path), f"unsupported pixel type {arr.dtype} (mode {mode})"
        )
    unit = np.clip(out, 0.0, 1.0).astype(np.float32)
    check_dynamic_range(path, arr, unit)
    return unit


def check_finite(path: str | Path, arr: np.ndarray) -> None:
    """Refuse pixel values that are NaN or infinite (a float TIFF's).

    Raises:
        RefusedImage: ``"pixel values not finite (NaN, inf): 90000 of 90000
            pixels"``, naming which of NaN, inf and -inf occur.
    """
    finite = np.isfinite(arr)
    if finite.all():
        return
    bad = arr[~finite]
    kinds = [
        name
        for name, found in (
            ("NaN", np.isnan(bad).any()),
            ("inf", np.isposinf(bad).any()),
            ("-inf", np.isneginf(bad).any()),
        )
        if found
    ]
    raise RefusedImage(
        str(path),
        f"pixel values not finite ({', '.join(kinds)}): {bad.size} of "
        f"{arr.size} pixels",
    )


def check_dynamic_range(path: str | Path, stored: np.ndarray, unit: np.ndarray) -> None:
    """Refuse an image whose ``[0, 1]`` pixels ``unit`` are all equal.

    ``stored`` is the file's own array: when it is constant the message says
    its value (``"no dynamic range: every pixel is 0"``), otherwise that the
    conversion to ``[0, 1]`` made it constant (float64 values closer together
    than float32 can tell apart).

    Raises:
        RefusedImage: no dynamic range, naming the stored values.
    """
    lo, hi = float(unit.min()), float(unit.max())
    if hi > lo:
        return
    s_lo, s_hi = stored.min(), stored.max()
    if s_lo == s_hi:
        raise RefusedImage(
            str(path), f"no dynamic range: every pixel is {s_lo} ({stored.dtype})"
        )
    raise RefusedImage(
        str(path),
        f"no dynamic range after conversion to [0, 1]: every pixel is {lo} "
        f"(stored values {s_lo}..{s_hi}, {stored.dtype})",
    )


def read_research_image(
    path: str | Path,
    *,
    spacing_mm: float,
    working_spacing_mm: float,
    laterality: str | None = None,
    view: str | None = None,
    patient_id: str | None = None,
    specks: bool = False,
    spacing_source: str = "",
) -> MammoImage:
    """Read and standardize a PNG/TIFF research mammogram.

    Args:
        path: the image file.
        spacing_mm: mm per stored pixel (from the dataset table or site config).
        working_spacing_mm: mm per model-space pixel.
        laterality: ``"L"``/``"R"`` from the dataset table, or ``None`` to infer
            it from the breast side.
        view: view word (``"CC"``, ``"MLO"``...) if known.
        patient_id: the woman's id (groups the patient-level split).
        specks: also find the calcification specks at the stored resolution
            (:func:`common.imaging.specks.find_specks`).
        spacing_source: where ``spacing_mm`` came from, for a refusal (e.g.
            ``"images.csv row or --spacing-mm"``); ``""``: not said.

    Returns:
        MammoImage with float32[H, W] model-space pixels in ``[0, 1]``.

    Raises:
        RefusedImage: a spacing outside the plausible ``[MIN_SPACING_MM,
            MAX_SPACING_MM]`` mm (:func:`common.imaging.image.check_spacing`,
            naming the value and ``spacing_source``; checked before the file
            is opened, so nothing is resampled by it); an unreadable, colour,
            too small, non-finite or constant image (:func:`load_grey01`).
        ValueError: a laterality other than L/R/None.
    """
    spacing_mm = check_spacing(path, spacing_mm, "spacing_mm", spacing_source)
    if laterality is not None and laterality not in (LEFT, RIGHT):
        raise ValueError(
            f"{path}: laterality must be 'L', 'R' or None, got {laterality!r}"
        )
    unit = load_grey01(path)
    pixels, geometry, lat, lat_source = standardize(
        unit,
        stored_spacing_mm=spacing_mm,
        laterality=laterality,
        working_spacing_mm=working_spacing_mm,
        laterality_source=LATERALITY_TABLE,
        source=str(path),
    )
    rows, cols = unit.shape
    meta = ImageMeta(
        source=str(path),
        sop_instance_uid=None,
        patient_id=patient_id,
        manufacturer="",
        model="",
        view=view,
        laterality=lat,
        laterality_source=lat_source,
        stored_spacing_mm=float(spacing_mm),
        spacing_source=SPACING_TABLE,
        presentation_intent=None,
        photometric=None,
        rows=rows,
        cols=cols,
    )
    found = find_specks(unit, geometry, float(spacing_mm)) if specks else None
    return MammoImage(pixels, float(working_spacing_mm), geometry, meta, found)
