"""Vendor presentation processing and pixel encoding (stored values + VOI).

``present`` turns a detector exposure into the vendor's processed image
(float32[H, W] in [0, 1], dense bright, canonical grid): log transform,
flat-field, peripheral equalization, multi-scale unsharp masking, percentile
normalization inside the breast and a gamma. ``encode`` maps that image to
stored integers (BitsStored, MONOCHROME1/2) and the VOI the vendor writes
(linear window, SIGMOID window or a VOI LUT table). FOR PROCESSING profiles
skip the processing and store the raw log image at a fixed scale.

``display`` applies a VOI and the photometric interpretation the way a viewer
does (used by the preview and the tests, independently of the project reader).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from common.keys import FOR_PROCESSING
from simulation.phantom.acquisition import Exposure, log_image
from simulation.phantom.filters import gaussian_blur, normalized_blur
from simulation.phantom.scenario import VendorProfile

#: Attenuation mapped to the top stored value in FOR PROCESSING log images.
RAW_LOG_FULL_SCALE = 6.0
#: Entries of a VOI LUT table (a 12-bit table is standard for mammography).
LUT_ENTRIES = 4096


@dataclass(frozen=True)
class Voi:
    """The VOI transform written to the file.

    Attributes:
        center, width: WindowCenter / WindowWidth (stored-value units).
        function: VOILUTFunction (``LINEAR`` or ``SIGMOID``) or ``None`` with a LUT.
        lut_first: first stored value the LUT maps (LUTDescriptor[1]).
        lut_bits: bits of the LUT entries (LUTDescriptor[2]).
        lut: uint16[N] table entries, or ``None``.
    """

    center: float
    width: float
    function: str | None = "LINEAR"
    lut_first: int = 0
    lut_bits: int = 12
    lut: np.ndarray | None = None


@dataclass(frozen=True)
class Encoded:
    """Stored pixels (uint16[H, W], canonical grid) and how to display them."""

    pixels: np.ndarray
    voi: Voi
    photometric: str
    bits_stored: int


def present(exposure: Exposure, vendor: VendorProfile, pitch_mm: float) -> np.ndarray:
    """The vendor's processed image, float32[H, W] in [0, 1], 0 outside the breast.

    ``pitch_mm`` is the pixel spacing of the grid (sigmas are in mm).
    """
    proc = vendor.processing
    mask = exposure.mask
    p = log_image(exposure, proc.flat_field)
    if vendor.presentation_intent == FOR_PROCESSING:
        return np.clip(p / RAW_LOG_FULL_SCALE, 0.0, 1.0).astype(np.float32)
    if proc.equalization > 0 and mask.any():
        low = normalized_blur(p, mask, proc.equalization_sigma_mm / pitch_mm)
        target = float(np.percentile(low[mask], 70))
        p = p + proc.equalization * np.maximum(target - low, 0.0) * mask
    for stage in proc.unsharp:
        p = p + stage.amount * (p - gaussian_blur(p, stage.sigma_mm / pitch_mm))
    if mask.any():
        lo, hi = np.percentile(p[mask], [proc.low_percentile, proc.high_percentile])
    else:
        lo, hi = float(p.min()), float(p.max())
    x = np.clip((p - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0) ** proc.gamma
    return np.where(mask, x, 0.0).astype(np.float32)


def _scurve(t: np.ndarray) -> np.ndarray:
    """Monotone S-shaped curve on [0, 1] (a normalized logistic)."""
    k = 6.0
    s = 1.0 / (1.0 + np.exp(-k * (t - 0.5)))
    s0, s1 = 1.0 / (1.0 + np.exp(k / 2)), 1.0 / (1.0 + np.exp(-k / 2))
    return (s - s0) / (s1 - s0)


#: The display window starts at this fraction of the breast's lowest stored value,
#: so the darkest breast pixels show as dark gray and the background as black.
WINDOW_FLOOR = 0.4
#: Display level of the darkest breast pixels in a VOI LUT table.
LUT_BREAST_FLOOR = 0.1


def _voi_window(lo: float, hi: float, maxv: int) -> Voi:
    low = WINDOW_FLOOR * lo
    return Voi(center=(low + hi) / 2.0, width=max(hi - low, 2.0), function="LINEAR")


def _voi_sigmoid(lo: float, hi: float, maxv: int) -> Voi:
    low = WINDOW_FLOOR * lo
    return Voi(
        center=(low + hi) / 2.0, width=max(0.8 * (hi - low), 2.0), function="SIGMOID"
    )


def _voi_lut(lo: float, hi: float, maxv: int) -> Voi:
    v = np.arange(min(LUT_ENTRIES, maxv + 1), dtype=np.float64)
    t = np.clip((v - lo) / max(hi - lo, 1.0), 0.0, 1.0)
    level = LUT_BREAST_FLOOR + (1.0 - LUT_BREAST_FLOOR) * _scurve(t)
    level = np.where(v < WINDOW_FLOOR * lo, 0.0, level)
    table = np.round(level * (2**12 - 1)).astype(np.uint16)
    return Voi((lo + hi) / 2.0, max(hi - lo, 2.0), None, lut_bits=12, lut=table)


#: VOI encoders by profile ``voi`` name: ``(low, high, max value) -> Voi``.
VOI_ENCODERS: dict[str, Callable[[float, float, int], Voi]] = {
    "window": _voi_window,
    "sigmoid": _voi_sigmoid,
    "lut": _voi_lut,
}


def encode(image01: np.ndarray, mask: np.ndarray, vendor: VendorProfile) -> Encoded:
    """Stored integers and VOI for a processed image (float32[H, W] in [0, 1]).

    The breast occupies ``vendor.output_range`` of the stored range; the
    background is 0 before the MONOCHROME1 inversion (so it displays dark).
    A VOI LUT table has one entry per stored value, so LUT profiles must have
    ``bits_stored <= 12``.
    """
    bits = vendor.bits_stored
    maxv = 2**bits - 1
    if vendor.voi == "lut" and bits > 12:
        raise ValueError(
            f"vendor {vendor.name}: voi 'lut' needs bits_stored <= 12, got {bits}"
        )
    if vendor.presentation_intent == FOR_PROCESSING:
        stored = np.round(image01 * maxv)
        vals = stored[mask] if mask.any() else stored.ravel()
        lo, hi = (float(v) for v in np.percentile(vals, [0.5, 99.5]))
    else:
        a, b = vendor.output_range
        stored = np.where(mask, np.round((a + (b - a) * image01) * maxv), 0.0)
        lo, hi = a * maxv, b * maxv
    voi = VOI_ENCODERS[vendor.voi](lo, hi, maxv)
    if vendor.photometric == "MONOCHROME1":
        stored = maxv - stored
        lut = voi.lut
        if lut is not None:  # viewer: 1 - LUT'[maxv - s] must equal LUT[s]
            lut = ((2**voi.lut_bits - 1) - lut[::-1]).astype(np.uint16)
        voi = replace(voi, center=maxv - voi.center, lut=lut)
    pixels = np.clip(stored, 0, maxv).astype(np.uint16)
    return Encoded(pixels, voi, vendor.photometric, bits)


def display(pixels: np.ndarray, voi: Voi, photometric: str) -> np.ndarray:
    """Apply ``voi`` then the photometric interpretation: float32 in [0, 1], 1 white.

    Linear window per DICOM C.11.2.1.2.1, SIGMOID per C.11.2.1.3.1, LUT by table
    lookup (values outside the table clamp to its ends).
    """
    v = pixels.astype(np.float64)
    if voi.lut is not None:
        n = voi.lut.size
        idx = np.clip(np.round(v - voi.lut_first), 0, n - 1).astype(np.int64)
        out = voi.lut[idx] / float(2**voi.lut_bits - 1)
    elif voi.function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (v - voi.center) / voi.width))
    else:
        c, w = voi.center, voi.width
        out = np.clip((v - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)
