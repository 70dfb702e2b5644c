"""One entry point for every image file: DICOM by content, PNG/TIFF by suffix."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from common.config.site import DEFAULT_MAX_PIXELS
from common.errors import RefusedImage
from common.imaging.dicom import is_dicom, read_dicom
from common.imaging.image import MammoImage, check_spacing
from common.imaging.research_image import RESEARCH_SUFFIXES, read_research_image

log = logging.getLogger(__name__)

#: Where a research image's ``spacing_mm`` comes from, for a refusal: the
#: dataset table (ingest and predict read ``images.csv``) or the command line.
SOURCE_TABLE = "images.csv row or --spacing-mm"
#: ... and where ``default_spacing_mm`` comes from.
SOURCE_DEFAULT = "the site's default_spacing_mm or --default-spacing-mm"


def check_research_budget(path: Path, max_pixels: int | None) -> None:
    """Refuse a PNG/TIFF whose header declares more than ``max_pixels`` samples.

    Reads the header only (PIL opens lazily); width x height x bands is
    compared with the budget. Unreadable headers are left to the reader.

    Raises:
        RefusedImage: over the budget, naming the size.
    """
    if max_pixels is None:
        return
    try:
        with Image.open(path) as im:
            (width, height), bands = im.size, len(im.getbands())
            frames = int(getattr(im, "n_frames", 1) or 1)
    except Image.DecompressionBombError as exc:
        raise RefusedImage(str(path), f"over the pixel budget: {exc}") from exc
    except (OSError, UnidentifiedImageError, ValueError):
        return
    samples = width * height * bands * frames
    if samples > max_pixels:
        raise RefusedImage(
            str(path),
            f"over the pixel budget: width x height x bands x frames = {width} x "
            f"{height} x {bands} x {frames} = {samples} samples "
            f"(max_pixels={max_pixels})",
        )


def read_any(
    path: str | Path,
    *,
    working_spacing_mm: float,
    default_spacing_mm: float | None = None,
    spacing_mm: float | None = None,
    laterality: str | None = None,
    view: str | None = None,
    patient_id: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    specks: bool = False,
) -> MammoImage:
    """Read a DICOM or PNG/TIFF mammogram into a model-space :class:`MammoImage`.

    DICOM is recognised by content (``DICM`` preamble or a parseable dataset),
    whatever the suffix; it uses the header's spacing, falling back to
    ``default_spacing_mm``; ``laterality``/``view``/``patient_id`` are ignored for
    DICOM (the header is authoritative). PNG/TIFF (by suffix) need a spacing:
    ``spacing_mm`` (dataset table) or else ``default_spacing_mm`` (site config).
    ``max_pixels`` is the pixel budget, checked from the file's header before
    any pixel is decoded (``None``: no budget). ``specks``: also find the
    calcification specks at the stored resolution (``MammoImage.specks``).
    A research image's spacing must be in the plausible ``[MIN_SPACING_MM,
    MAX_SPACING_MM]`` mm a DICOM spacing must be in
    (:func:`common.imaging.image.check_spacing`): it is checked before any
    pixel is decoded or resampled, and the refusal names the value and where
    it came from (:data:`SOURCE_TABLE` or :data:`SOURCE_DEFAULT`).

    Raises:
        RefusedImage: unsupported file type, no spacing or an implausible one
            for a research image, or any refusal of the underlying reader.
    """
    p = Path(path)
    if not p.is_file():
        raise RefusedImage(str(path), "file not found or not a regular file")
    if is_dicom(p):
        return read_dicom(
            p,
            working_spacing_mm=working_spacing_mm,
            default_spacing_mm=default_spacing_mm,
            max_pixels=max_pixels,
            specks=specks,
        )
    suffix = p.suffix.lower()
    if suffix in RESEARCH_SUFFIXES:
        if spacing_mm is not None:
            spacing, source = spacing_mm, SOURCE_TABLE
        elif default_spacing_mm is not None:
            spacing, source = default_spacing_mm, SOURCE_DEFAULT
        else:
            raise RefusedImage(
                str(path),
                f"research image ({suffix}) needs spacing_mm "
                "or a site default_spacing_mm",
            )
        spacing = check_spacing(p, spacing, "spacing_mm", source)
        check_research_budget(p, max_pixels)
        return read_research_image(
            p,
            spacing_mm=spacing,
            working_spacing_mm=working_spacing_mm,
            laterality=laterality,
            view=view,
            patient_id=patient_id,
            specks=specks,
            spacing_source=source,
        )
    raise RefusedImage(
        str(path),
        f"unsupported file type (suffix {suffix or 'none'!r}, not DICOM by content); "
        f"expected DICOM or one of {sorted(RESEARCH_SUFFIXES)}",
    )
