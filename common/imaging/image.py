"""The in-memory form of one mammogram after decoding and standardization."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from common.errors import RefusedImage
from common.imaging.geometry import Geometry

#: A pixel array smaller than this on either side is not a mammogram.
MIN_SIDE_PX = 64
#: Plausible mm per stored pixel of a mammogram, for every reader: a DICOM
#: spacing outside is treated as absent (and a site default outside refused),
#: a research image's spacing outside is refused (:func:`check_spacing`).
#: Detectors are 0.05-0.1 mm, digitised film 0.04-0.2 mm, a downsampled
#: research set such as mini-MIAS 0.2 mm; a value past 1 mm is a typo or
#: another unit, and resampling to the working spacing by it can ask for
#: gigapixels (50 mm makes a 300 x 300 image 37500 x 37500 at 0.4 mm).
MIN_SPACING_MM = 0.01
MAX_SPACING_MM = 1.0

#: BI-RADS breast composition (5th edition): almost entirely fatty,
#: scattered fibroglandular, heterogeneously dense, extremely dense.
BIRADS_DENSITIES: tuple[str, ...] = ("a", "b", "c", "d")
#: mini-MIAS background tissue: fatty, fatty-glandular, dense-glandular.
MIAS_TISSUES: tuple[str, ...] = ("F", "G", "D")
#: Every breast density an image may carry, as written (case matters: ``d`` is
#: BI-RADS "extremely dense", ``D`` MIAS "dense-glandular"; no mapping between
#: the two scales is applied).
DENSITY_VALUES: tuple[str, ...] = BIRADS_DENSITIES + MIAS_TISSUES
#: The site's optional density table (``image,density``; see ``client.ingest``).
DENSITY_CSV = "density.csv"
DENSITY_COLUMNS: tuple[str, ...] = ("image", "density")


def check_density(value: str | None) -> str | None:
    """``value`` when it is ``None`` or one of :data:`DENSITY_VALUES`.

    Raises:
        ValueError: any other value, quoted, with the valid ones.
    """
    if value is not None and value not in DENSITY_VALUES:
        raise ValueError(
            f"breast density must be one of {', '.join(DENSITY_VALUES)} (BI-RADS "
            f"a-d or MIAS F/G/D, case matters) or empty, got {value!r}"
        )
    return value


def check_min_side(path: object, rows: int, cols: int, what: str) -> None:
    """Refuse a ``rows x cols`` grid under :data:`MIN_SIDE_PX` on a side.

    Raises:
        RefusedImage: ``"<what> too small for a mammogram (< 64 px a side)"``.
    """
    if rows < MIN_SIDE_PX or cols < MIN_SIDE_PX:
        raise RefusedImage(
            str(path), f"{what} too small for a mammogram (< {MIN_SIDE_PX} px a side)"
        )


def check_spacing(
    path: object, spacing_mm: float, field: str, source: str = ""
) -> float:
    """``spacing_mm`` as a float, when finite and in the plausible range.

    The range is ``[MIN_SPACING_MM, MAX_SPACING_MM]``. ``field`` names the
    value (``"spacing_mm"``, ``"default_spacing_mm"``), ``source`` where it
    came from (``"images.csv row or --spacing-mm"``), for the refusal.

    Raises:
        RefusedImage: ``"spacing_mm=50.0 mm (images.csv row or --spacing-mm)
            is outside the plausible [0.01, 1.0] mm per pixel of a
            mammogram"``; NaN, infinities and non-positive values too.
    """
    value = float(spacing_mm)
    if not (math.isfinite(value) and MIN_SPACING_MM <= value <= MAX_SPACING_MM):
        where = f" ({source})" if source else ""
        raise RefusedImage(
            str(path),
            f"{field}={spacing_mm!r} mm{where} is outside the plausible "
            f"[{MIN_SPACING_MM}, {MAX_SPACING_MM}] mm per pixel of a mammogram",
        )
    return value


@dataclass(frozen=True)
class ImageMeta:
    """What the file said (or what was inferred, with its source named).

    Attributes:
        source: path of the file as given to the reader.
        sop_instance_uid: DICOM SOPInstanceUID, ``None`` for research images.
        patient_id: DICOM PatientID (or the dataset's woman id); groups splits.
        manufacturer, model: strings from the header ("" when blank).
        view: ``"CC"``, ``"MLO"``, another ViewPosition word, or ``None``.
        laterality: ``"L"`` or ``"R"``.
        laterality_source: ``"ImageLaterality"``, ``"Laterality"``,
            ``"breast-side"`` or ``"table"``.
        stored_spacing_mm: mm per stored pixel (row spacing; columns assumed equal).
        spacing_source: one of ``common.keys.SPACING_*``.
        presentation_intent: ``"FOR PRESENTATION"``, ``"FOR PROCESSING"`` or ``None``.
        photometric: ``"MONOCHROME1"``, ``"MONOCHROME2"`` or ``None``.
        rows, cols: stored grid size.
        density: breast density from the site's ``density.csv``, one of
            :data:`DENSITY_VALUES` as given, or ``None`` (unknown; also every
            entry cached before the field existed).
    """

    source: str
    sop_instance_uid: str | None
    patient_id: str | None
    manufacturer: str
    model: str
    view: str | None
    laterality: str
    laterality_source: str
    stored_spacing_mm: float
    spacing_source: str
    presentation_intent: str | None
    photometric: str | None
    rows: int
    cols: int
    density: str | None = None

    def __post_init__(self) -> None:
        """Refuse a density outside :data:`DENSITY_VALUES` (ValueError)."""
        check_density(self.density)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageMeta:
        """Inverse of :meth:`to_dict` (no ``density`` key: unknown)."""
        return cls(**d)


@dataclass(frozen=True)
class MammoImage:
    """A standardized mammogram in model space.

    Attributes:
        pixels: float32[H, W] in ``[0, 1]``, model space: cropped to the breast,
            breast on the left (chest wall at x = 0), dense tissue bright.
        spacing_mm: mm per model-space pixel (the working spacing).
        geometry: maps boxes between the file's stored grid and ``pixels``.
        meta: header facts and their provenance.
        specks: float32[N, 3] calcification specks found at the stored
            resolution, ``(x, y, z)`` in model-space pixels
            (:func:`common.imaging.specks.find_specks`), or ``None`` when the
            reader was not asked for them.
    """

    pixels: np.ndarray
    spacing_mm: float
    geometry: Geometry
    meta: ImageMeta
    specks: np.ndarray | None = None
