"""Small numpy filters used by the phantom (no scipy dependency).

All functions take and return float32 arrays of shape ``[H, W]`` on the same
pixel grid; sigmas are in pixels of that grid.
"""

from __future__ import annotations

import numpy as np


def gaussian_blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur of ``img`` (float32[H, W]) with edge padding, via FFT.

    ``sigma_px <= 0`` returns a float32 copy.
    """
    a = np.asarray(img, dtype=np.float32)
    if sigma_px <= 1e-3:
        return a.copy()
    pad = int(min(max(3 * sigma_px, 1), max(a.shape)))
    p = np.pad(a, pad, mode="edge")
    h, w = p.shape
    fy = np.fft.fftfreq(h).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(w).astype(np.float32)[None, :]
    kernel = np.exp(-2.0 * (np.pi * sigma_px) ** 2 * (fy * fy + fx * fx))
    out = np.fft.irfft2(np.fft.rfft2(p) * kernel, s=p.shape)
    return out[pad : pad + a.shape[0], pad : pad + a.shape[1]].astype(np.float32)


def normalized_blur(img: np.ndarray, mask: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian mean of ``img`` over ``mask`` only (normalized convolution).

    Pixels far from the mask get the value of the nearest masked region; where
    the blurred mask is ~0 the result is 0.
    """
    m = mask.astype(np.float32)
    num = gaussian_blur(img * m, sigma_px)
    den = gaussian_blur(m, sigma_px)
    out = np.where(den > 1e-4, num / np.maximum(den, 1e-4), 0.0)
    return out.astype(np.float32)


def power_law_field(
    shape: tuple[int, int], pitch_mm: float, beta: float, rng: np.random.Generator
) -> np.ndarray:
    """Gaussian random field with power spectrum ``P(f) ~ 1 / f**beta``.

    Args:
        shape: ``(H, W)`` pixels.
        pitch_mm: pixel spacing, so frequencies are in cycles/mm.
        beta: spectral exponent (about 3 for breast tissue).
        rng: source of the white noise.

    Returns:
        float32[H, W] with zero mean and unit standard deviation. Frequencies
        below ``1 / (2 * max extent)`` are flattened to avoid a divergent DC term.
    """
    h, w = shape
    fy = np.fft.fftfreq(h, d=pitch_mm).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(w, d=pitch_mm).astype(np.float32)[None, :]
    f = np.sqrt(fy * fy + fx * fx)
    f_min = 1.0 / (2.0 * max(h, w) * pitch_mm)
    amp = np.maximum(f, f_min) ** (-beta / 2.0)
    amp[0, 0] = 0.0
    noise = rng.standard_normal((h, w), dtype=np.float32)
    field = np.fft.irfft2(np.fft.rfft2(noise) * amp, s=(h, w)).astype(np.float32)
    field -= field.mean()
    std = float(field.std())
    return field / std if std > 0 else field


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
