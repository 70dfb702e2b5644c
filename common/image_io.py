"""One entry point for every image file: DICOM by content, PNG/TIFF by suffix."""

from __future__ import annotations

import logging
from pathlib import Path

from common.dicom import is_dicom, read_dicom
from common.errors import RefusedImage
from common.image import MammoImage
from common.research_image import RESEARCH_SUFFIXES, read_research_image

log = logging.getLogger(__name__)


def read_any(
    path: str | Path,
    *,
    working_spacing_mm: float,
    default_spacing_mm: float | None = None,
    spacing_mm: float | None = None,
    laterality: str | None = None,
    view: str | None = None,
    patient_id: str | None = None,
) -> MammoImage:
    """Read a DICOM or PNG/TIFF mammogram into a model-space :class:`MammoImage`.

    DICOM is recognised by content (``DICM`` preamble or a parseable dataset),
    whatever the suffix; it uses the header's spacing, falling back to
    ``default_spacing_mm``; ``laterality``/``view``/``patient_id`` are ignored for
    DICOM (the header is authoritative). PNG/TIFF (by suffix) need a spacing:
    ``spacing_mm`` (dataset table) or else ``default_spacing_mm`` (site config).

    Raises:
        RefusedImage: unsupported file type, no spacing for a research image, or
            any refusal of the underlying reader.
    """
    p = Path(path)
    if not p.is_file():
        raise RefusedImage(str(path), "file not found or not a regular file")
    if is_dicom(p):
        return read_dicom(
            p,
            working_spacing_mm=working_spacing_mm,
            default_spacing_mm=default_spacing_mm,
        )
    suffix = p.suffix.lower()
    if suffix in RESEARCH_SUFFIXES:
        spacing = spacing_mm if spacing_mm is not None else default_spacing_mm
        if spacing is None:
            raise RefusedImage(
                str(path),
                f"research image ({suffix}) needs spacing_mm "
                "or a site default_spacing_mm",
            )
        return read_research_image(
            p,
            spacing_mm=spacing,
            working_spacing_mm=working_spacing_mm,
            laterality=laterality,
            view=view,
            patient_id=patient_id,
        )
    raise RefusedImage(
        str(path),
        f"unsupported file type (suffix {suffix or 'none'!r}, not DICOM by content); "
        f"expected DICOM or one of {sorted(RESEARCH_SUFFIXES)}",
    )
