"""Masses and calcification clusters as 3-D path-length maps, with exact boxes.

All positions are in mm on the canonical grid of :mod:`simulation.phantom.anatomy`
(chest wall at ``x = 0``); a rendered lesion is a small patch of path lengths
(mm) through lesion tissue, partial-volume averaged over each pixel, plus its
box in canonical pixel edges ``[xmin, ymin, xmax, ymax]`` (origin top-left,
``xmax``/``ymax`` exclusive), the tight box of every pixel the lesion touches.

A lesion *replaces* the tissue it occupies, so its contribution to the log
attenuation is ``0.1 * (mu_lesion - mu_background) * L`` (mu in 1/cm, L in mm).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from common.keys import CALCIFICATION, MASS

log = logging.getLogger(__name__)

MARGINS: tuple[str, ...] = ("circumscribed", "lobulated", "ill_defined", "spiculated")
#: Extra clearance (mm) between a lesion's extent and the skin edge.
_EDGE_CLEARANCE_MM = 3.0


@dataclass(frozen=True)
class LesionSpec:
    """One lesion's geometry (canonical grid, mm).

    Attributes:
        kind: ``"mass"`` or ``"calcification"`` (a cluster).
        margin: mass margin (one of :data:`MARGINS`), ``""`` for clusters.
        center_mm: ``(x, y)`` center.
        diameter_mm: mass diameter, or the cluster region's diameter.
        angle: orientation (radians).
        aspect: elongation (>= 1).
        harmonics: ``(k, amplitude, phase)`` perturbations of the outline.
        strands: spicules as ``(angle, length_mm, radius_mm)``.
        specks: calcification specks as ``(dx_mm, dy_mm, diameter_mm)`` offsets
            from the center.
    """

    kind: str
    margin: str
    center_mm: tuple[float, float]
    diameter_mm: float
    angle: float = 0.0
    aspect: float = 1.0
    harmonics: tuple[tuple[int, float, float], ...] = ()
    strands: tuple[tuple[float, float, float], ...] = ()
    specks: tuple[tuple[float, float, float], ...] = ()

    def extent_mm(self) -> float:
        """Radius (mm) of a disc around the center that holds the whole lesion."""
        r = self.diameter_mm / 2.0
        if self.kind == CALCIFICATION:
            if not self.specks:
                return r
            return max(np.hypot(dx, dy) + d / 2 for dx, dy, d in self.specks)
        amp = 1.0 + sum(abs(a) for _, a, _ in self.harmonics)
        ext = r * np.sqrt(self.aspect) * amp
        if self.margin == "ill_defined":
            ext *= _ILL_DEFINED_REACH
        for _, length, radius in self.strands:
            ext = max(ext, length + radius)
        return float(ext)


@dataclass(frozen=True)
class RenderedLesion:
    """A lesion rasterized on the canonical grid.

    Attributes:
        spec: what was rendered.
        y0, x0: top-left pixel of ``path`` on the grid.
        path: float32[h, w] mean path length (mm) through lesion tissue per pixel.
        box: ``(xmin, ymin, xmax, ymax)`` integer pixel edges on the canonical grid,
            the tight box of ``path > 0``.
    """

    spec: LesionSpec
    y0: int
    x0: int
    path: np.ndarray
    box: tuple[int, int, int, int]


_ILL_DEFINED_REACH = 1.35


def _local(
    spec: LesionSpec, xs: np.ndarray, ys: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rotated, aspect-normalized coordinates: ``(q, phi, r_mm)`` of sample points."""
    cx, cy = spec.center_mm
    dx, dy = xs - cx, ys - cy
    c, s = np.cos(spec.angle), np.sin(spec.angle)
    lx = (dx * c + dy * s) / np.sqrt(spec.aspect)
    ly = (-dx * s + dy * c) * np.sqrt(spec.aspect)
    r = np.sqrt(lx * lx + ly * ly)
    phi = np.arctan2(ly, lx)
    pert = np.ones_like(r)
    for k, amp, ph in spec.harmonics:
        pert = pert + amp * np.cos(k * phi + ph)
    q = r / (spec.diameter_mm / 2.0) / pert
    return q, phi, np.sqrt(dx * dx + dy * dy)


def _mass_path(spec: LesionSpec, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    r0 = spec.diameter_mm / 2.0
    q, _, _ = _local(spec, xs, ys)
    if spec.margin == "ill_defined":
        qq = q / _ILL_DEFINED_REACH
        return 2.0 * r0 * np.clip(1.0 - qq * qq, 0.0, None) ** 1.5
    core_scale = 0.75 if spec.margin == "spiculated" else 1.0
    qc = q / core_scale
    path = 2.0 * r0 * core_scale * np.sqrt(np.clip(1.0 - qc * qc, 0.0, None))
    if spec.strands:
        cx, cy = spec.center_mm
        dx, dy = xs - cx, ys - cy
        for ang, length, radius in spec.strands:
            ux, uy = np.cos(ang), np.sin(ang)
            along = dx * ux + dy * uy
            perp = np.abs(-dx * uy + dy * ux)
            t = np.clip(along / length, 0.0, 1.0)
            w = radius * (1.0 - t)  # tapers to a point at the tip
            inside = (along > 0) & (along < length) & (perp < w)
            strand = np.where(inside, 2.0 * np.sqrt(np.maximum(w * w - perp**2, 0)), 0)
            path = np.maximum(path, strand)
    return path


def _cluster_path(spec: LesionSpec, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    cx, cy = spec.center_mm
    path = np.zeros_like(xs)
    for dx, dy, d in spec.specks:
        r = d / 2.0
        rr = (xs - cx - dx) ** 2 + (ys - cy - dy) ** 2
        path = path + 2.0 * np.sqrt(np.clip(r * r - rr, 0.0, None))
    return path


_RENDERERS: dict[str, Callable[[LesionSpec, np.ndarray, np.ndarray], np.ndarray]] = {
    MASS: _mass_path,
    CALCIFICATION: _cluster_path,
}


def render_lesion(
    spec: LesionSpec, shape: tuple[int, int], pitch_mm: float
) -> RenderedLesion | None:
    """Rasterize ``spec`` on a canonical grid of ``shape`` pixels at ``pitch_mm``.

    Each pixel's value is the mean path length over a sub-pixel grid (4x4 for
    clusters, 3x3 for masses), so small specks keep their partial volume.
    Returns ``None`` when the lesion does not touch the grid.
    """
    if spec.kind not in _RENDERERS:
        raise ValueError(
            f"unknown lesion kind {spec.kind!r}; valid: {list(_RENDERERS)}"
        )
    ext = spec.extent_mm() + pitch_mm
    cx, cy = spec.center_mm
    h, w = shape
    x0 = max(0, int(np.floor((cx - ext) / pitch_mm)))
    x1 = min(w, int(np.ceil((cx + ext) / pitch_mm)))
    y0 = max(0, int(np.floor((cy - ext) / pitch_mm)))
    y1 = min(h, int(np.ceil((cy + ext) / pitch_mm)))
    if x1 <= x0 or y1 <= y0:
        return None
    ss = 4 if spec.kind == CALCIFICATION else 3
    sub = (np.arange(ss, dtype=np.float64) + 0.5) / ss
    ys = ((np.arange(y0, y1)[:, None] + sub[None, :]).ravel() * pitch_mm)[:, None]
    xs = ((np.arange(x0, x1)[:, None] + sub[None, :]).ravel() * pitch_mm)[None, :]
    fine = _RENDERERS[spec.kind](spec, xs, ys)
    path = fine.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3)).astype(np.float32)
    rows = np.flatnonzero(path.max(axis=1) > 0)
    cols = np.flatnonzero(path.max(axis=0) > 0)
    if rows.size == 0:
        return None
    box = (
        x0 + int(cols[0]),
        y0 + int(rows[0]),
        x0 + int(cols[-1]) + 1,
        y0 + int(rows[-1]) + 1,
    )
    return RenderedLesion(spec=spec, y0=y0, x0=x0, path=path, box=box)


def draw_lesion_shape(
    kind: str,
    center_mm: tuple[float, float],
    cfg_diameter: tuple[float, ...],
    margin_weights: dict[str, float],
    speck_diameter: tuple[float, ...],
    specks: tuple[int, ...],
    rng: np.random.Generator,
) -> LesionSpec:
    """Draw the shape of one lesion of ``kind`` at ``center_mm``.

    ``cfg_diameter`` is the mass diameter range or the cluster-region range.
    """
    d = float(rng.uniform(cfg_diameter[0], cfg_diameter[1]))
    angle = float(rng.uniform(0, np.pi))
    if kind == CALCIFICATION:
        n = int(rng.integers(specks[0], specks[1] + 1))
        stretch = np.sqrt(rng.uniform(1.0, 1.6))  # sqrt of the cluster's aspect
        c, s = np.cos(angle), np.sin(angle)
        pts = []
        for _ in range(n):
            rad = d / 2.0 * np.sqrt(rng.uniform(0, 1))
            th = rng.uniform(0, 2 * np.pi)
            lx, ly = rad * np.cos(th) * stretch, rad * np.sin(th) / stretch
            diam = float(rng.uniform(speck_diameter[0], speck_diameter[1]))
            pts.append((float(lx * c - ly * s), float(lx * s + ly * c), diam))
        return LesionSpec(CALCIFICATION, "", center_mm, d, angle, specks=tuple(pts))
    names = sorted(margin_weights)
    p = np.asarray([margin_weights[k] for k in names], dtype=float)
    margin = names[int(rng.choice(len(names), p=p / p.sum()))]
    aspect = float(rng.uniform(1.0, 1.4))
    harmonics: tuple[tuple[int, float, float], ...] = ()
    strands: tuple[tuple[float, float, float], ...] = ()
    if margin == "lobulated":
        harmonics = tuple(
            (k, float(rng.uniform(0.06, 0.14)), float(rng.uniform(0, 2 * np.pi)))
            for k in (3, 4, 5)
        )
    elif margin == "ill_defined":
        harmonics = tuple(
            (k, float(rng.uniform(0.02, 0.05)), float(rng.uniform(0, 2 * np.pi)))
            for k in range(5, 11)
        )
    elif margin == "spiculated":
        n = int(rng.integers(8, 17))
        strands = tuple(
            (
                float(rng.uniform(0, 2 * np.pi)),
                float(d / 2.0 * rng.uniform(1.3, 2.2)),
                float(rng.uniform(0.3, 0.6)),
            )
            for _ in range(n)
        )
    return LesionSpec(MASS, margin, center_mm, d, angle, aspect, harmonics, strands)


def place(
    spec: LesionSpec,
    eligible_dist_mm: np.ndarray,
    pitch_mm: float,
    taken: list[tuple[float, float, float]],
    rng: np.random.Generator,
) -> LesionSpec | None:
    """Move ``spec`` to a random pixel deep enough inside the breast.

    ``eligible_dist_mm`` is the distance to the skin edge (mm, float32[H, W]) with
    forbidden pixels (muscle) set to 0; ``taken`` lists ``(x, y, extent)`` of
    lesions already placed, which the new one must not overlap. Returns ``None``
    (and logs) when there is no room.
    """
    ext = spec.extent_mm()
    cand = np.flatnonzero(eligible_dist_mm > ext + _EDGE_CLEARANCE_MM)
    for _ in range(20):
        if cand.size == 0:
            break
        i = int(cand[rng.integers(cand.size)])
        r, c = divmod(i, eligible_dist_mm.shape[1])
        x, y = (c + 0.5) * pitch_mm, (r + 0.5) * pitch_mm
        if all(np.hypot(x - tx, y - ty) > ext + te + 2.0 for tx, ty, te in taken):
            taken.append((x, y, ext))
            return replace(spec, center_mm=(float(x), float(y)))
    log.debug("no room for a %s of extent %.1f mm; skipped", spec.kind, ext)
    return None
