"""Acquisition physics: exposure, heel effect, quantum and electronic noise, MTF.

Input is the projected log attenuation ``A`` (float32[H, W], canonical grid,
dimensionless); output is the detected signal in quanta per pixel on the same
grid. Exposure follows an automatic exposure control: the open-field fluence
is set so that the median breast pixel receives ``vendor.quanta_per_mm2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulation.phantom.filters import gaussian_blur
from simulation.phantom.scenario import VendorProfile


@dataclass(frozen=True)
class Exposure:
    """One acquisition on the canonical grid.

    Attributes:
        quanta: float32[H, W] detected quanta per pixel (noisy, blurred).
        open_field: quanta per pixel without the breast at the chest wall.
        heel: float32[1, W] relative fluence profile (1 at the chest wall).
        mask: bool[H, W] breast region.
    """

    quanta: np.ndarray
    open_field: float
    heel: np.ndarray
    mask: np.ndarray


def heel_profile(width: int, heel_effect: float) -> np.ndarray:
    """Relative fluence float32[1, W]: 1 at the chest wall (x=0), falling linearly."""
    x = (np.arange(width, dtype=np.float32) + 0.5) / width
    return (1.0 - heel_effect * x)[None, :].astype(np.float32)


def expose(
    attenuation: np.ndarray,
    mask: np.ndarray,
    vendor: VendorProfile,
    detector_pitch_mm: float,
    rng: np.random.Generator,
) -> Exposure:
    """Simulate the detector signal for a log-attenuation image.

    Steps: AEC open field ``q0 = quanta_per_mm2 * pitch^2 * exp(median A)``;
    expected quanta ``q0 * heel * exp(-A)``; Poisson quantum noise; detector blur
    (Gaussian MTF of ``vendor.blur_sigma_mm`` at the detector, which blurs the
    quantum noise too, as in a scintillator); additive electronic noise.
    """
    area = detector_pitch_mm**2
    med = float(np.median(attenuation[mask])) if mask.any() else 0.0
    q0 = vendor.quanta_per_mm2 * area * float(np.exp(med))
    heel = heel_profile(attenuation.shape[1], vendor.heel_effect)
    expected = (q0 * heel * np.exp(-attenuation)).astype(np.float64)
    noisy = rng.poisson(expected).astype(np.float32)
    blurred = gaussian_blur(noisy, vendor.blur_sigma_mm / detector_pitch_mm)
    if vendor.electronic_noise > 0:
        noise = rng.normal(0.0, vendor.electronic_noise, blurred.shape)
        blurred += noise.astype(np.float32)
    return Exposure(quanta=blurred, open_field=q0, heel=heel, mask=mask)


def log_image(exposure: Exposure, flat_field: float) -> np.ndarray:
    """Flat-fielded log image ``-log(quanta / (q0 * heel**flat_field))``, float32.

    Approximates ``A`` inside the breast (dense bright); about 0 outside.
    """
    ref = exposure.open_field * exposure.heel**flat_field
    q = np.maximum(exposure.quanta, 0.5)
    return (-np.log(q / ref)).astype(np.float32)
