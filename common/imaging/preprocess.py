"""Standardize a decoded mammogram: breast on the left, cropped, working spacing.

Input is a float32 image in ``[0, 1]`` in *stored space* (the file's own pixel
grid, dense tissue bright). Output is the *model-space* image plus the
:class:`common.imaging.geometry.Geometry` that maps boxes between the two spaces.

Steps (each recorded in the Geometry):

1. find the breast on a block-averaged copy (at most ~512 px a side): box-smooth,
   Otsu threshold, clear a thin border band and apply a binary opening (so film
   edges and labels do not join the breast), keep the largest connected
   component (a component reaching the band extends to the image edge);
2. decide which side the breast is on (tissue signal in the left vs right half);
3. crop to the component's bounding box plus a small margin (never to nothing:
   when no plausible breast is found the whole image is kept);
4. flip left-right when the breast is on the right, so the chest wall is at x = 0;
5. resample the crop to the working spacing,
   ``model_shape = max(1, round(crop_size * stored_spacing / working_spacing))``,
   with antialiased bilinear interpolation (pixel-edge aligned, as Geometry is).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from common.imaging.geometry import Geometry
from common.keys import LEFT, RIGHT

log = logging.getLogger(__name__)

#: ``laterality_source`` when laterality was inferred from the image content.
LATERALITY_FROM_BREAST_SIDE = "breast-side"
#: Default ``laterality_source`` when the caller gives the laterality.
LATERALITY_GIVEN = "given"
#: Longest side of the block-averaged copy used to find the breast.
DETECT_MAX_SIDE = 512
#: Binary-opening iterations (small-image pixels) before labeling components.
OPENING_ITERATIONS = 2
#: Width of the border band ignored when finding the breast (fraction of side).
BORDER_BAND_FRACTION = 0.01
#: Margin around the breast's bounding box, as a fraction of the longer side.
CROP_MARGIN_FRACTION = 0.01
#: A component smaller than this fraction of the image is not a breast.
MIN_BREAST_FRACTION = 0.005
#: |left - right| / (left + right) below this: the side is ambiguous.
SIDE_AMBIGUITY = 0.1


@dataclass(frozen=True)
class BreastRegion:
    """Where the breast is, in stored space.

    Attributes:
        bbox: ``(x0, y0, x1, y1)`` integer pixel edges in stored space (margin
            included, clamped to the image); the whole image when nothing was found.
        side: ``"left"`` or ``"right"``: the half of the image holding more tissue
            signal, or ``None`` when the two halves are too alike to tell.
        found: whether a plausible breast component was found.
    """

    bbox: tuple[int, int, int, int]
    side: str | None
    found: bool


def block_mean(img: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor x factor`` blocks of float[H, W] (edges replicated)."""
    if factor <= 1:
        return img
    h, w = img.shape
    ph, pw = (-h) % factor, (-w) % factor
    if ph or pw:
        img = np.pad(img, ((0, ph), (0, pw)), mode="edge")
    hh, ww = img.shape
    return img.reshape(hh // factor, factor, ww // factor, factor).mean(axis=(1, 3))


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in ``[0, 1]`` (returns the bin edge that splits)."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.5
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = total - w0
    s0 = np.cumsum(hist * centers)
    m0 = np.divide(s0, w0, out=np.zeros_like(s0), where=w0 > 0)
    m1 = np.divide(s0[-1] - s0, w1, out=np.zeros_like(s0), where=w1 > 0)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


@dataclass(frozen=True)
class _Component:
    """The breast's component on the block-averaged grid (:func:`_breast_component`)."""

    comp: np.ndarray  # bool[h, w]: the largest component (band cleared, opened)
    norm: np.ndarray  # float[h, w]: the smoothed copy scaled to [0, 1]
    factor: int  # image pixels per grid cell
    band: int  # width of the cleared border band, in cells

    @property
    def reach(self) -> int:
        """Cells the band and the opening may have taken from the breast's edge."""
        return self.band + OPENING_ITERATIONS + 1


def _grid_factor(h: int, w: int) -> int:
    """Image pixels per cell of the block-averaged grid the breast is found on."""
    return max(1, math.ceil(max(h, w) / DETECT_MAX_SIDE))


def _breast_component(pixels01: np.ndarray) -> _Component | None:
    """The largest bright component of float[H, W] pixels, or ``None``.

    ``None`` for a flat image or when no component holds
    ``MIN_BREAST_FRACTION`` of the grid. The one rule behind
    :func:`find_breast` (stored space, at ingest) and :func:`breast_mask`
    (model space, at inference).
    """
    h, w = pixels01.shape
    factor = _grid_factor(h, w)
    small = block_mean(pixels01.astype(np.float32, copy=False), factor)
    small = ndimage.uniform_filter(small, size=3, mode="nearest")
    lo, hi = float(small.min()), float(small.max())
    if hi - lo < 1e-6:
        log.debug("flat image: keeping the whole %dx%d frame", h, w)
        return None
    norm = (small - lo) / (hi - lo)
    mask = norm > otsu_threshold(norm)
    # Opening cuts thin bright bridges (film edges, paddle rims) to labels.
    # A thin band along the border is cleared so that bright film edges or
    # detector rims cannot join the breast to labels; a breast touching the band
    # is extended back to the image edge by the callers.
    band = max(2, round(BORDER_BAND_FRACTION * max(mask.shape)))
    inner = mask.copy()
    inner[:band, :] = inner[-band:, :] = False
    inner[:, :band] = inner[:, -band:] = False
    opened = ndimage.binary_opening(inner, iterations=OPENING_ITERATIONS)
    if opened.any():
        mask = opened
    elif inner.any():
        mask = inner
    labels, n = ndimage.label(mask)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    biggest = int(np.argmax(sizes)) + 1
    if sizes[biggest - 1] < MIN_BREAST_FRACTION * mask.size:
        log.debug("largest component too small (%d px): no crop", sizes[biggest - 1])
        return None
    return _Component(labels == biggest, norm, factor, band)


def breast_mask(pixels01: np.ndarray) -> tuple[np.ndarray, int]:
    """``(mask, factor)``: where the breast is, on a ``factor``-times coarser grid.

    :func:`find_breast`'s component with its holes filled and grown back by
    what the border band and the opening took (so tissue at the chest wall and
    the skin line stays in); an image with no plausible breast gets an
    all-True mask (nothing is ever dropped for want of a breast). Used at
    inference (``ModelConfig.breast_mask``) to drop detections on film labels
    and markers: :func:`inside_mask`.
    """
    found = _breast_component(pixels01)
    if found is None:
        h, w = pixels01.shape
        factor = _grid_factor(h, w)
        return np.ones((math.ceil(h / factor), math.ceil(w / factor)), bool), factor
    comp = ndimage.binary_fill_holes(found.comp)
    return ndimage.binary_dilation(comp, iterations=found.reach), found.factor


def inside_mask(boxes: np.ndarray, mask: np.ndarray, factor: int) -> np.ndarray:
    """bool[K]: whether each ``[x0, y0, x1, y1]`` box's centre lies in ``mask``.

    ``mask`` and ``factor`` as :func:`breast_mask` returns them; box
    coordinates in the pixels of the image the mask was made from.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(b) == 0:
        return np.zeros(0, dtype=bool)
    cx = np.clip(((b[:, 0] + b[:, 2]) / 2 // factor).astype(int), 0, mask.shape[1] - 1)
    cy = np.clip(((b[:, 1] + b[:, 3]) / 2 // factor).astype(int), 0, mask.shape[0] - 1)
    return mask[cy, cx]


def find_breast(pixels01: np.ndarray) -> BreastRegion:
    """Locate the breast in float[H, W] stored-space pixels (``[0, 1]``, dense bright).

    Works on a block-averaged copy so that it costs a few milliseconds on a
    full-field image. The bounding box is in stored-space pixel edges.
    """
    h, w = pixels01.shape
    full = (0, 0, w, h)
    found = _breast_component(pixels01)
    if found is None:
        return BreastRegion(full, None, False)
    comp, norm, factor, reach = found.comp, found.norm, found.factor, found.reach
    rows = np.flatnonzero(comp.any(axis=1))
    cols = np.flatnonzero(comp.any(axis=0))
    margin = max(2, round(CROP_MARGIN_FRACTION * max(h, w)))
    sh, sw = comp.shape
    x0 = 0 if cols[0] <= reach else max(0, cols[0] * factor - margin)
    y0 = 0 if rows[0] <= reach else max(0, rows[0] * factor - margin)
    x1 = w if cols[-1] >= sw - 1 - reach else min(w, (cols[-1] + 1) * factor + margin)
    y1 = h if rows[-1] >= sh - 1 - reach else min(h, (rows[-1] + 1) * factor + margin)
    # Side: tissue signal (above background) of the breast component per half.
    signal = np.where(comp, norm, 0.0)
    half = signal.shape[1] / 2
    col_sum = signal.sum(axis=0)
    centers = np.arange(signal.shape[1]) + 0.5
    left = float(col_sum[centers < half].sum())
    right = float(col_sum[centers >= half].sum())
    side: str | None
    if left + right <= 0 or abs(left - right) / (left + right) < SIDE_AMBIGUITY:
        side = None
    else:
        side = "left" if left > right else "right"
    return BreastRegion((int(x0), int(y0), int(x1), int(y1)), side, True)


def resample(pixels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample float[H, W] to ``shape`` (rows, cols); pixel edges map to edges.

    Antialiased bilinear (``align_corners=False``), so the mapping agrees with
    :class:`Geometry`'s scale ``model / crop`` per axis.
    """
    if pixels.shape == tuple(shape):
        return pixels.astype(np.float32, copy=True)
    t = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None, None]
    out = F.interpolate(
        t,
        size=(int(shape[0]), int(shape[1])),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    return out[0, 0].numpy()


def standardize(
    pixels01: np.ndarray,
    *,
    stored_spacing_mm: float,
    laterality: str | None,
    working_spacing_mm: float,
    chest_wall_hint: str | None = None,
    laterality_source: str = LATERALITY_GIVEN,
    source: str = "",
) -> tuple[np.ndarray, Geometry, str, str]:
    """Crop to the breast, put it on the left, resample to the working spacing.

    Args:
        pixels01: float[H, W] in ``[0, 1]``, stored space, dense tissue bright.
        stored_spacing_mm: mm per stored pixel.
        laterality: ``"L"``/``"R"`` from the header, or ``None`` to infer it from
            the breast side (a breast on the left half of the stored image is a
            left breast, the standard hanging convention).
        working_spacing_mm: mm per model-space pixel.
        chest_wall_hint: ``"left"``/``"right"`` (e.g. from PatientOrientation),
            used only when the image content does not tell the side.
        laterality_source: where ``laterality`` came from; returned unchanged
            when ``laterality`` is given.
        source: the file, for the warning when the side is a guess.

    Returns:
        ``(pixels, geometry, laterality, laterality_source)``: float32[h, w]
        model-space pixels in ``[0, 1]``; the Geometry stored -> model;
        ``"L"``/``"R"``; ``LATERALITY_FROM_BREAST_SIDE`` when inferred here, else
        ``laterality_source``.

    Raises:
        ValueError: for a non-2-D input or non-positive spacings.
    """
    if pixels01.ndim != 2 or min(pixels01.shape) < 1:
        raise ValueError(f"standardize needs a 2-D image, got shape {pixels01.shape}")
    if not (stored_spacing_mm > 0 and working_spacing_mm > 0):
        raise ValueError(
            f"spacings must be positive: stored_spacing_mm={stored_spacing_mm}, "
            f"working_spacing_mm={working_spacing_mm}"
        )
    region = find_breast(pixels01)
    side = region.side
    if side is None:
        if chest_wall_hint in ("left", "right"):
            side = chest_wall_hint
        elif laterality in (LEFT, RIGHT):
            side = "left" if laterality == LEFT else "right"
        else:
            log.warning(
                "%s: breast side ambiguous (the image does not show it, and no "
                "laterality or orientation in the file): assuming left",
                source or "<image>",
            )
            side = "left"
    lat_source = laterality_source
    if laterality not in (LEFT, RIGHT):
        laterality = LEFT if side == "left" else RIGHT
        lat_source = LATERALITY_FROM_BREAST_SIDE
    x0, y0, x1, y1 = region.bbox
    crop = pixels01[y0:y1, x0:x1]
    flip = side == "right"
    if flip:
        crop = crop[:, ::-1]
    ratio = stored_spacing_mm / working_spacing_mm
    shape = (max(1, round(crop.shape[0] * ratio)), max(1, round(crop.shape[1] * ratio)))
    out = np.clip(resample(crop, shape), 0.0, 1.0).astype(np.float32, copy=False)
    geometry = Geometry(pixels01.shape, region.bbox, flip, shape)  # type: ignore[arg-type]
    return out, geometry, laterality, lat_source
