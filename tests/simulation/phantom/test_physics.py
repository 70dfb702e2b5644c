"""Measured, not assumed: tissue power-spectrum slope and lesion CNR per vendor."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from simulation.phantom import Scenario, render_image
from simulation.phantom.anatomy import (
    build_anatomy,
    canonical_shape,
    draw_breast,
    draw_woman,
)
from simulation.phantom.filters import gaussian_blur, power_law_field
from simulation.phantom.lesions import LesionSpec

#: phantom.md: beta about 2.5-3.5 over 0.1-1 cycles/mm.
BETA_RANGE = (2.5, 3.5)
#: Mass CNR against the surrounding tissue (anatomical + quantum noise): masses
#: are low contrast, visible but not obvious (measured 0.4-1.6 on the demo).
MASS_CNR_RANGE = (0.2, 3.0)
#: Calcification speck CNR against the high-pass (quantum + fine texture) noise
#: (measured 5-18 on the demo): small but bright.
CALC_CNR_RANGE = (3.0, 40.0)


# --- measuring the phantom: its power spectrum ---------------------------------
def radial_psd(img: np.ndarray, pitch_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum of a square-ish ROI (Hann windowed).

    Returns ``(f cycles/mm, power)`` for the radial bins (DC excluded).
    """
    a = np.asarray(img, dtype=np.float64)
    a = a - a.mean()
    h, w = a.shape
    win = np.outer(np.hanning(h), np.hanning(w))
    spec = np.abs(np.fft.fft2(a * win)) ** 2
    fy = np.fft.fftfreq(h, d=pitch_mm)[:, None]
    fx = np.fft.fftfreq(w, d=pitch_mm)[None, :]
    f = np.sqrt(fy**2 + fx**2)
    df = 1.0 / (max(h, w) * pitch_mm)
    bins = np.floor(f / df).astype(int)
    n = np.bincount(bins.ravel())
    s = np.bincount(bins.ravel(), weights=spec.ravel())
    k = np.arange(len(n))
    keep = (n > 0) & (k > 0)
    return (k[keep] * df), s[keep] / n[keep]


def psd_slope(
    img: np.ndarray, pitch_mm: float, f_lo: float = 0.1, f_hi: float = 1.0
) -> float:
    """``beta`` of a least-squares fit ``log P = c - beta log f`` over ``[f_lo, f_hi]``.

    Raises ``ValueError`` when the band holds fewer than 4 frequency bins.
    """
    f, p = radial_psd(img, pitch_mm)
    sel = (f >= f_lo) & (f <= f_hi) & (p > 0)
    if sel.sum() < 4:
        raise ValueError(
            f"psd_slope: only {int(sel.sum())} bins in [{f_lo}, {f_hi}] cycles/mm "
            f"for ROI {img.shape} at pitch {pitch_mm} mm"
        )
    slope, _ = np.polyfit(np.log(f[sel]), np.log(p[sel]), 1)
    return float(-slope)


def test_psd_estimator_recovers_known_slopes() -> None:
    rng = np.random.default_rng(0)
    for beta in (2.0, 3.0):
        field = power_law_field((256, 256), 0.1, beta, rng)
        assert psd_slope(field, 0.1) == pytest.approx(beta, abs=0.25)
    white = rng.standard_normal((256, 256))
    assert psd_slope(white, 0.1) == pytest.approx(0.0, abs=0.25)
    with pytest.raises(ValueError, match="bins"):
        psd_slope(white[:8, :8], 0.1)


@pytest.mark.parametrize("woman", range(4))
def test_tissue_power_spectrum_slope(demo_scenario: Scenario, woman: int) -> None:
    an = demo_scenario.anatomy
    pitch = 0.1
    w = draw_woman(an, np.random.default_rng(woman))
    b = draw_breast(an, w, "CC", np.random.default_rng(100 + woman))
    maps = build_anatomy(
        an, b, canonical_shape(an, pitch), pitch, np.random.default_rng(200 + woman)
    )
    cy = int(b.center_y_frac * maps.mask.shape[0])
    roi = np.s_[cy - 128 : cy + 128, 20:276]
    assert maps.mask[roi].all(), "ROI must lie inside the breast"
    beta = psd_slope(maps.attenuation[roi], pitch)
    assert BETA_RANGE[0] <= beta <= BETA_RANGE[1], beta


def test_tissue_slope_check_can_fail(demo_scenario: Scenario) -> None:
    """A breast built from a too-flat spectrum is caught by the same measurement."""
    an = dataclasses.replace(demo_scenario.anatomy, beta=(1.5, 1.5))
    pitch = 0.1
    w = draw_woman(an, np.random.default_rng(0))
    b = draw_breast(an, w, "CC", np.random.default_rng(100))
    maps = build_anatomy(
        an, b, canonical_shape(an, pitch), pitch, np.random.default_rng(200)
    )
    cy = int(b.center_y_frac * maps.mask.shape[0])
    beta = psd_slope(maps.attenuation[cy - 128 : cy + 128, 20:276], pitch)
    assert beta < BETA_RANGE[0]


def _cnr(scenario: Scenario, site: str, woman: int, kind: str) -> float:
    base = render_image(scenario, site, woman, "L", "CC", lesions=[])
    pitch = base.spacing_mm
    h, w = base.pixels.shape
    c = (0.45 * base.breast.depth_mm, base.breast.center_y_frac * h * pitch)
    if kind == "mass":
        spec = LesionSpec(
            kind="mass", margin="circumscribed", center_mm=c, diameter_mm=12.0
        )
    else:
        rng = np.random.default_rng(0)
        specks = tuple(
            (float(rng.uniform(-3, 3)), float(rng.uniform(-3, 3)), 0.5)
            for _ in range(12)
        )
        spec = LesionSpec(
            kind="calcification",
            margin="",
            center_mm=c,
            diameter_mm=8.0,
            specks=specks,
        )
    les = render_image(scenario, site, woman, "L", "CC", lesions=[spec])
    la = les.lesion_attenuation
    core = la > 0.5 * la.max()
    signal = float((les.presented - base.presented)[core].mean())
    if kind == "mass":
        yy, xx = np.mgrid[:h, :w]
        r = np.hypot(xx - c[0] / pitch, yy - c[1] / pitch) * pitch
        ring = (r > 9) & (r < 18) & base.mask
        return signal / float(base.presented[ring].std())
    x0, y0, x1, y1 = les.findings[0].box
    hp = base.presented - gaussian_blur(base.presented, 1.0)
    reg = np.zeros_like(core)
    reg[max(0, y0 - 10) : y1 + 10, max(0, x0 - 10) : x1 + 10] = True
    return signal / float(hp[reg & base.mask].std())


@pytest.mark.parametrize("site", ["A", "B", "C", "D"])
def test_lesion_cnr_per_vendor(demo_scenario: Scenario, site: str) -> None:
    for woman in range(2):
        mass = _cnr(demo_scenario, site, woman, "mass")
        calc = _cnr(demo_scenario, site, woman, "calc")
        assert MASS_CNR_RANGE[0] <= mass <= MASS_CNR_RANGE[1], (site, woman, mass)
        assert CALC_CNR_RANGE[0] <= calc <= CALC_CNR_RANGE[1], (site, woman, calc)
        assert calc > mass  # calcifications are bright, masses are subtle
