"""Vendor-independent breast anatomy on a *canonical* grid.

Canonical grid: ``(rows, cols)`` pixels at the breast-plane pitch, pixel centers at
``((col + 0.5) * pitch, (row + 0.5) * pitch)`` mm, origin top-left, chest wall at
``x = 0`` (left edge) and the nipple pointing to ``+x``. Stored images of right
breasts are the mirror of this grid (chest wall on the right); the flip happens
in :mod:`simulation.phantom.generate`.

The breast is a compressed slab of thickness ``T`` with a half-disc edge
profile, a skin shell, a pectoral muscle wedge in MLO views and a 2.5-D
fibroglandular tissue field (independent 1/f^beta Gaussian layers, each
thresholded by the image's density). Everything is a path length in mm; the
projected log-attenuation is ``A = sum(mu_i * L_i)`` (mu in 1/cm, so / 10).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.keys import VIEW_CC, VIEW_MLO
from simulation.phantom.filters import power_law_field
from simulation.phantom.scenario import Anatomy

DENSITIES: tuple[str, ...] = ("a", "b", "c", "d")
#: Width of the soft threshold of each tissue layer (in field std units).
_LAYER_SOFTNESS = 0.3
#: How strongly glandular tissue avoids the periphery (bias at the skin edge).
_PERIPHERY_BIAS = 1.2


@dataclass(frozen=True)
class BreastSpec:
    """The random draws that define one image's anatomy.

    Attributes:
        view: ``"CC"`` or ``"MLO"``.
        density: BI-RADS density ``a``-``d``.
        gland_fraction: target glandular fraction of the breast area.
        thickness_mm: compressed thickness.
        depth_mm: chest wall to nipple (semi-axis along x).
        half_height_mm: semi-axis along the chest wall.
        center_y_frac: vertical center of the breast as a fraction of the height.
        tilt_deg: MLO tilt of the breast axis (degrees, positive = downward).
        exponent: superellipse exponent of the outline.
        harmonics: ``(k, amplitude, phase)`` outline perturbations.
        pectoral: ``(width_mm, height_mm)`` of the MLO pectoral wedge.
        beta: tissue power-spectrum exponent.
    """

    view: str
    density: str
    gland_fraction: float
    thickness_mm: float
    depth_mm: float
    half_height_mm: float
    center_y_frac: float
    tilt_deg: float
    exponent: float
    harmonics: tuple[tuple[int, float, float], ...]
    pectoral: tuple[float, float]
    beta: float


@dataclass(frozen=True)
class WomanSpec:
    """Draws shared by a woman's four images (density, size, thickness)."""

    density: str
    gland_fraction: float
    thickness_mm: float
    depth_mm: float
    half_height_mm: float


@dataclass(frozen=True)
class AnatomyMaps:
    """Path-length maps of one image on the canonical grid (all float32[H, W]).

    Attributes:
        pitch_mm: breast-plane pixel spacing.
        mask: bool, inside the breast (skin included).
        dist_mm: distance to the skin edge inside the breast (0 outside).
        tissue_mm: path through fat + gland (inside the skin shell).
        gland: glandular fraction of ``tissue_mm`` (0..1).
        muscle_mm: path through pectoral muscle (MLO only; part of tissue_mm).
        skin_mm: path through skin.
        attenuation: projected log attenuation ``A`` (dimensionless).
        mu_background: local mean attenuation of fat/gland (1/cm), what a lesion
            replaces.
    """

    pitch_mm: float
    mask: np.ndarray
    dist_mm: np.ndarray
    tissue_mm: np.ndarray
    gland: np.ndarray
    muscle_mm: np.ndarray
    skin_mm: np.ndarray
    attenuation: np.ndarray
    mu_background: np.ndarray


def _uniform(rng: np.random.Generator, pair: tuple[float, ...]) -> float:
    """One draw from ``U(pair[0], pair[1])``."""
    return float(rng.uniform(pair[0], pair[1]))


def canonical_shape(anatomy: Anatomy, pitch_mm: float) -> tuple[int, int]:
    """``(rows, cols)`` of the detector field at ``pitch_mm``."""
    h, w = anatomy.field_mm
    return max(8, round(h / pitch_mm)), max(8, round(w / pitch_mm))


def draw_woman(anatomy: Anatomy, rng: np.random.Generator) -> WomanSpec:
    """Draw a woman's density, glandular fraction, thickness and breast size."""
    d = int(rng.choice(4, p=np.asarray(anatomy.density_probs)))
    lo, hi = anatomy.density_fraction[d]
    return WomanSpec(
        density=DENSITIES[d],
        gland_fraction=float(rng.uniform(lo, hi)),
        thickness_mm=float(_uniform(rng, anatomy.thickness_mm)),
        depth_mm=float(_uniform(rng, anatomy.breast_depth_mm)),
        half_height_mm=float(_uniform(rng, anatomy.breast_half_height_mm)),
    )


def draw_breast(
    anatomy: Anatomy, woman: WomanSpec, view: str, rng: np.random.Generator
) -> BreastSpec:
    """Draw one image's anatomy: the woman's values jittered per view."""
    if view not in (VIEW_CC, VIEW_MLO):
        raise ValueError(f"view must be {VIEW_CC!r} or {VIEW_MLO!r}, got {view!r}")
    mlo = view == VIEW_MLO
    jit = rng.uniform(0.92, 1.08, size=3)
    harmonics = tuple(
        (k, float(rng.uniform(0.0, 0.04)), float(rng.uniform(0, 2 * np.pi)))
        for k in (2, 3, 4)
    )
    depth = woman.depth_mm * jit[1]
    return BreastSpec(
        view=view,
        density=woman.density,
        gland_fraction=float(np.clip(woman.gland_fraction * jit[2], 0.02, 0.9)),
        thickness_mm=woman.thickness_mm * (1.1 if mlo else 1.0) * jit[0],
        depth_mm=depth,
        half_height_mm=woman.half_height_mm * (1.25 if mlo else 1.0),
        center_y_frac=float(rng.uniform(0.4, 0.48) if mlo else rng.uniform(0.45, 0.55)),
        tilt_deg=float(rng.uniform(10.0, 25.0)) if mlo else 0.0,
        exponent=float(rng.uniform(1.8, 2.4)),
        harmonics=harmonics,
        pectoral=(
            (float(depth * rng.uniform(0.25, 0.4)), float(rng.uniform(0.45, 0.7)))
            if mlo
            else (0.0, 0.0)
        ),
        beta=float(_uniform(rng, anatomy.beta)),
    )


def _chord(d: np.ndarray, radius: float, full: float) -> np.ndarray:
    """Path through a slab of thickness ``full`` with half-disc edges of ``radius``.

    ``d`` is the in-plane distance to the slab's edge (mm, <= 0 outside).
    """
    dd = np.clip(d, 0.0, radius)
    inner = 2.0 * np.sqrt(np.maximum(radius**2 - (radius - dd) ** 2, 0.0))
    return np.where(d >= radius, full, np.where(d > 0, inner, 0.0)).astype(np.float32)


def outline(
    spec: BreastSpec, shape: tuple[int, int], pitch_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Normalized radius ``rho`` (<1 inside) and distance to the edge (mm).

    Both float32[H, W] on the canonical grid.
    """
    h, w = shape
    y = ((np.arange(h, dtype=np.float32) + 0.5) * pitch_mm)[:, None]
    x = ((np.arange(w, dtype=np.float32) + 0.5) * pitch_mm)[None, :]
    cy = spec.center_y_frac * h * pitch_mm
    a = np.deg2rad(spec.tilt_deg)
    dx, dy = x, y - cy
    u = (dx * np.cos(a) + dy * np.sin(a)) / spec.depth_mm
    v = (-dx * np.sin(a) + dy * np.cos(a)) / spec.half_height_mm
    n = spec.exponent
    rho = (np.abs(u) ** n + np.abs(v) ** n) ** (1.0 / n)
    theta = np.arctan2(v, u)
    pert = np.ones_like(rho)
    for k, amp, ph in spec.harmonics:
        pert += amp * np.cos(k * theta + ph)
    rho = (rho / pert).astype(np.float32)
    gy, gx = np.gradient(rho, pitch_mm)
    grad = np.sqrt(gx * gx + gy * gy)
    dist = np.where(rho < 1, (1.0 - rho) / np.maximum(grad, 1e-6), 0.0)
    return rho, dist.astype(np.float32)


def gland_field(
    spec: BreastSpec,
    rho: np.ndarray,
    mask: np.ndarray,
    pitch_mm: float,
    layers: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Glandular fraction float32[H, W] in [0, 1]: mean of thresholded layers.

    Each layer is a unit 1/f^beta field plus a bias that keeps gland away from
    the skin; one threshold (the ``1 - gland_fraction`` quantile inside the
    breast) is shared by all layers, so the mean fraction matches the density.
    """
    shape = rho.shape
    bias = -_PERIPHERY_BIAS * np.clip(rho, 0, 1.5) ** 2
    zs = [
        power_law_field(shape, pitch_mm, spec.beta, rng) + bias for _ in range(layers)
    ]
    inside = np.concatenate([z[mask] for z in zs]) if mask.any() else np.zeros(1)
    thr = float(np.quantile(inside, 1.0 - spec.gland_fraction))
    g = np.zeros(shape, dtype=np.float32)
    for z in zs:
        g += 1.0 / (1.0 + np.exp(-(z - thr) / _LAYER_SOFTNESS))
    return (g / layers).astype(np.float32)


def build_anatomy(
    anatomy: Anatomy,
    spec: BreastSpec,
    shape: tuple[int, int],
    pitch_mm: float,
    rng: np.random.Generator,
) -> AnatomyMaps:
    """Render the path-length maps and projected attenuation of one breast."""
    mu = anatomy.mu_per_cm
    rho, dist = outline(spec, shape, pitch_mm)
    mask = rho < 1.0
    t_full = spec.thickness_mm
    radius = t_full / 2.0
    skin = anatomy.skin_mm
    total = _chord(dist, radius, t_full)
    tissue = _chord(dist - skin, max(radius - skin, 1e-3), t_full - 2 * skin)
    skin_path = (total - tissue).astype(np.float32)
    g = gland_field(spec, rho, mask, pitch_mm, anatomy.tissue_layers, rng)
    muscle = np.zeros(shape, dtype=np.float32)
    if spec.view == VIEW_MLO:
        pw, ph_frac = spec.pectoral
        h = shape[0] * pitch_mm
        ph = ph_frac * h
        yy = ((np.arange(shape[0]) + 0.5) * pitch_mm)[:, None] / ph
        xx = ((np.arange(shape[1]) + 0.5) * pitch_mm)[None, :] / pw
        s = xx + yy - 0.3 * xx * yy
        frac = np.clip((1.0 - s) * 3.0, 0.0, 0.85)
        edge = np.clip((1.0 - s) * ph / 0.5, 0.0, 1.0)  # ~0.5 mm soft edge
        muscle = (tissue * np.maximum(frac, 0.35 * edge) * (s < 1)).astype(np.float32)
    mu_bg = (mu["adipose"] * (1.0 - g) + mu["glandular"] * g).astype(np.float32)
    att = 0.1 * (
        mu_bg * (tissue - muscle) + mu["muscle"] * muscle + mu["skin"] * skin_path
    )
    return AnatomyMaps(
        pitch_mm=pitch_mm,
        mask=mask,
        dist_mm=dist,
        tissue_mm=tissue,
        gland=np.where(mask, g, 0.0).astype(np.float32),
        muscle_mm=muscle,
        skin_mm=skin_path,
        attenuation=np.where(mask, att, 0.0).astype(np.float32),
        mu_background=mu_bg,
    )
