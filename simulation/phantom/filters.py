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
