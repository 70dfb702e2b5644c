"""Post-hoc ideas on the mini-MIAS cross-validation's out-of-fold detections.

Issue 13 asks for mass sensitivity 0.85 at 1 FP/image and a cluster CPM of
0.5; the recipe's 5-fold CV reaches 0.65–0.775 and 0.13–0.18. Four classic
CAD ideas (and ``where``) can be measured on the out-of-fold predictions
without training a detector, so each answers in minutes on 2 cores:

``rank``
    per-image rules on the mass detections: keep the top ``k`` of an image
    (CAD systems cap their marks per image), or damp each detection by its
    score relative to the image's best (``rel``: ``s * sqrt(s / s_max)``).
``bilateral``
    bilateral asymmetry (Yin et al. 1991, "bilateral subtraction"): a mass is
    denser than the same place in the other breast, normal tissue is about
    symmetric. Each mass detection gets its box's mean intensity and local
    contrast, and the same in the contralateral MLO (model space puts both
    chest walls at x = 0; the box's place is mapped by the breast crops'
    sizes and the best match within ±12 mm is taken, for misregistration).
    A logistic model of "this detection hits a mass" on the detector's logit
    and those features re-scores the detections; it is fitted on the other
    folds' detections and applied to each fold (nested, so the figure is
    out-of-fold too).
``where``
    where a mass mark lies and what its image holds, none of it appearance:
    the centre's place in the breast's crop, the box's size, the mark's rank
    among its image's marks and that image's best score, and the film's
    density; re-scored by the same nested logistic model as ``bilateral``.
    If these separated the false positives from the hits at 1 FP/image, a
    cheap rule would; they do not (stop 52).
``convergence``
    the classic CAD mass filter: the gradient's convergence index (Kobatake's
    iris filter, Karssemeijer's gradient concentration) on annuli of 2-6,
    4-12 and 8-24 mm, at the mark's centre and over its box's middle half,
    and the gradient's coherence there; re-scored by the same nested
    logistic model. A consistent +0.01 mass CPM on three seeds, pooled
    +0.012 [-0.023, 0.038]: not resolved (stop 53).
``suppress``
    stricter suppression of a class's overlapping marks than the model's own
    NMS (IoU above 0.6): greedy NMS at IoU 0.3 and 0.1, and ``reach``, which
    drops a mark whose centre lies within a higher mark's FROC reach (half its
    diagonal, at least 5 mm: the hit rule, applied between marks). A CAD
    system shows one mark per finding; marks the model leaves side by side on
    one dense region would each count as a false positive.
``specks``
    a classic calcification-cluster detector at the stored 0.2 mm: white
    top-hat of the lightly smoothed image, specks = local maxima above ``z``
    robust standard deviations, clusters = specks linked within ``r`` mm with
    at least ``k`` members, scored by the sum of their log-contrasts; scored
    as the cluster class against the CNN's own clusters.

Each figure is paired with the detector's own out-of-fold figure on the same
images (interval over women), the baseline of the same run; with several
files (seeds), each re-scoring variant also gets a ``mass-cpm-pooled`` line:
the mean difference over the seeds, its interval resampling the seeds and
the women. One JSON line per
(file, analysis, variant) in ``benchmarks/results/mias_posthoc.jsonl``.

Usage (the two seeds' OOF files of ``benchmarks/results/mias_cv_seeds``)::

    python -m benchmarks.mias_posthoc --cache out/mini-mias/cache \\
        --oof out/mias-rs-seed0/oof_predictions-detector.json \\
              out/mias-rs-seed1/oof_predictions-detector.json

The recommended 0.4 mm recipe's kept out-of-fold files (gzip-compressed) with
only the suppression rules (stop 49)::

    K=benchmarks/results/mias_04_pretrain
    python -m benchmarks.mias_posthoc --analyses suppress \\
        --cache out/mini-mias/cache --results benchmarks/results/mias_04_limits \\
        --oof $K/oof_predictions-base-seed{0,1,2}.json.gz
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import emit, rounded
from benchmarks.ensemble import load_oof, oof_records
from client.onnx_export import nms
from common.detector.froc import (
    HIT,
    FrocImage,
    centres_and_reach_mm,
    froc_class,
    match_image,
    paired_cpm_difference,
    pooled_paired_cpm_difference,
)
from common.imaging.geometry import Geometry
from common.keys import CLASSES

BENCH = "mias_posthoc"
MASS, CALC = 0, 1


# --- the cache: each image's pixels, meta and geometry ------------------------------
@dataclasses.dataclass(frozen=True)
class CachedImage:
    """One cache entry: model-space pixels scaled to about [0, 1] in the breast."""

    pixels: np.ndarray
    patient: str
    view: str
    laterality: str
    geometry: Geometry
    source: Path
    density: str = ""


def read_cached(cache: Path, key: str) -> CachedImage:
    """The cache entry of an OOF key (``cache/<hash>``), normalized robustly."""
    h = key.rsplit("/", 1)[-1]
    meta = json.loads((cache / "images" / f"{h}.json").read_text())
    with np.load(cache / "images" / f"{h}.npz") as z:
        x = z["pixels"].astype(np.float32)
    inside = x[x > np.percentile(x, 5)] if x.size else x
    lo, hi = np.percentile(inside if inside.size else x, [5, 99]) if x.size else (0, 1)
    m = meta["meta"]
    return CachedImage(
        pixels=(x - lo) / max(float(hi - lo), 1.0),
        patient=str(m.get("patient_id") or ""),
        view=str(m.get("view") or ""),
        laterality=str(m.get("laterality") or ""),
        geometry=Geometry.from_dict(meta["geometry"]),
        source=Path(m["source"]),
        density=str(m.get("density") or ""),
    )


def _integral(a: np.ndarray) -> np.ndarray:
    ii = np.zeros((a.shape[0] + 1, a.shape[1] + 1), np.float64)
    ii[1:, 1:] = a.cumsum(0).cumsum(1)
    return ii


def box_mean(ii: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> float:
    """Mean of the image behind integral image ``ii`` over a box (clipped inside)."""
    h, w = ii.shape[0] - 1, ii.shape[1] - 1
    a = int(np.clip(round(x0), 0, w - 1))
    b = int(np.clip(round(x1), a + 1, w))
    c = int(np.clip(round(y0), 0, h - 1))
    d = int(np.clip(round(y1), c + 1, h))
    return float((ii[d, b] - ii[c, b] - ii[d, a] + ii[c, a]) / ((b - a) * (d - c)))


# --- rank rules --------------------------------------------------------------------
def rank_rule(images: Sequence[FrocImage], mode: str) -> list[FrocImage]:
    """``topK``: keep an image's K best mass detections; ``rel``: damp by rank."""
    out = []
    for im in images:
        s = im.det_scores.copy()
        idx = np.where(im.det_labels == MASS)[0]
        order = idx[np.argsort(-s[idx], kind="stable")]
        if mode.startswith("top"):
            keep = np.ones(len(s), bool)
            keep[order[int(mode[3:]) :]] = False
            out.append(
                dataclasses.replace(
                    im,
                    det_boxes=im.det_boxes[keep],
                    det_scores=s[keep],
                    det_labels=im.det_labels[keep],
                )
            )
            continue
        if mode != "rel":
            raise ValueError(f"rank rule {mode!r}: expected topK or rel")
        if len(order):
            s[order] = s[order] * np.sqrt(s[order] / max(s[order[0]], 1e-9))
        out.append(dataclasses.replace(im, det_scores=s))
    return out


# --- stricter suppression of overlapping marks --------------------------------------
SUPPRESS = ("iou0.3", "iou0.1", "reach")


def suppress_rule(images: Sequence[FrocImage], mode: str) -> list[FrocImage]:
    """Each class's marks thinned by ``mode`` (one of :data:`SUPPRESS`).

    ``iouT``: greedy NMS at IoU ``T`` per class. ``reach``: greedy by score, a
    mark is dropped when its centre is within ``max(half the diagonal of a
    kept higher mark of its class, MIN_HIT_RADIUS_MM)`` of that mark's centre.
    """
    if mode not in SUPPRESS:
        raise ValueError(f"suppress rule {mode!r}: one of {SUPPRESS}")
    out = []
    for im in images:
        keep: list[int] = []
        for label in np.unique(im.det_labels):
            idx = np.where(im.det_labels == label)[0]
            boxes, scores = im.det_boxes[idx], im.det_scores[idx]
            if mode.startswith("iou"):
                keep += idx[nms(boxes, scores, float(mode[3:]))].tolist()
                continue
            c, reach = centres_and_reach_mm(boxes, im.spacing_mm)
            kept: list[int] = []
            for i in np.argsort(-scores, kind="stable"):
                d = np.linalg.norm(c[kept] - c[i], axis=1)
                if not np.any(d <= reach[kept]):
                    kept.append(int(i))
            keep += idx[kept].tolist()
        k = np.sort(np.asarray(keep, dtype=np.int64))
        out.append(
            dataclasses.replace(
                im,
                det_boxes=im.det_boxes[k],
                det_scores=im.det_scores[k],
                det_labels=im.det_labels[k],
            )
        )
    return out


def _logit(score: float) -> float:
    p = min(max(float(score), 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


# --- bilateral asymmetry -------------------------------------------------------------
FEATURES = ("logit", "inner", "contrast", "asym", "asym_contrast", "has_other")


def bilateral_features(
    images: Sequence[FrocImage],
    cached: dict[str, CachedImage],
    *,
    search_mm: float = 12.0,
    grid: int = 5,
) -> list[np.ndarray]:
    """float[K, len(FEATURES)] per image, for every detection (any class)."""
    by_side = {(c.patient, c.view, c.laterality): k for k, c in cached.items()}
    out = []
    for im in images:
        me = cached[im.key]
        other_side = {"L": "R", "R": "L"}.get(me.laterality, "")
        other_key = by_side.get((me.patient, me.view, other_side))
        ia = _integral(me.pixels)
        h, w = me.pixels.shape
        ib = hb = wb = None
        if other_key is not None and me.patient:
            ob = cached[other_key].pixels
            ib, (hb, wb) = _integral(ob), ob.shape
        rows = []
        for (x0, y0, x1, y1), score in zip(im.det_boxes, im.det_scores, strict=True):
            bw, bh = x1 - x0, y1 - y0
            inner = box_mean(ia, x0, y0, x1, y1)
            contrast = inner - box_mean(
                ia, x0 - bw / 2, y0 - bh / 2, x1 + bw / 2, y1 + bh / 2
            )
            asym = asym_c = 0.0
            if ib is not None:
                mx, my = (x0 + x1) / 2 / w * wb, (y0 + y1) / 2 / h * hb
                r = search_mm / im.spacing_mm
                best, best_c = -math.inf, -math.inf
                for dy in np.linspace(-r, r, grid):
                    for dx in np.linspace(-r, r, grid):
                        a0, b0 = mx + dx - bw / 2, my + dy - bh / 2
                        v = box_mean(ib, a0, b0, a0 + bw, b0 + bh)
                        o = box_mean(
                            ib, a0 - bw / 2, b0 - bh / 2, a0 + 1.5 * bw, b0 + 1.5 * bh
                        )
                        best, best_c = max(best, v), max(best_c, v - o)
                asym, asym_c = inner - best, contrast - best_c
            rows.append(
                [
                    _logit(score),
                    inner,
                    contrast,
                    asym,
                    asym_c,
                    float(ib is not None),
                ]
            )
        out.append(np.asarray(rows, np.float64).reshape(-1, len(FEATURES)))
    return out


WHERE = (
    "logit",
    "x",
    "y",
    "x2",
    "y2",
    "log_size_mm",
    "rank_in_image",
    "image_top_logit",
    "dense",
)


def where_features(
    images: Sequence[FrocImage], cached: dict[str, CachedImage], label: int = MASS
) -> list[np.ndarray]:
    """float[K, len(WHERE)] per image, for every detection (any class).

    Where a mark lies and what its image holds, none of it appearance: the
    centre's place in the breast's crop (``x`` from the chest wall, ``y``
    from the top, both in [0, 1], and their squares for a middle band), the
    box's size, its rank among the image's marks of ``label`` (0 = the
    image's best) and that best mark's logit, and whether the film's
    density is dense-glandular (mini-MIAS ``D``).
    """
    out = []
    for im in images:
        c = cached[im.key]
        h, w = c.pixels.shape
        of_label = np.where(im.det_labels == label)[0]
        rank = np.zeros(len(im.det_scores))
        order = of_label[np.argsort(-im.det_scores[of_label], kind="stable")]
        rank[order] = np.arange(len(order))
        top = _logit(im.det_scores[order[0]]) if len(order) else _logit(0.0)
        rows = []
        for i, ((x0, y0, x1, y1), score) in enumerate(
            zip(im.det_boxes, im.det_scores, strict=True)
        ):
            x, y = (x0 + x1) / 2 / max(w, 1), (y0 + y1) / 2 / max(h, 1)
            side = math.sqrt(max((x1 - x0) * (y1 - y0), 1e-6)) * im.spacing_mm
            rows.append(
                [
                    _logit(score),
                    x,
                    y,
                    x * x,
                    y * y,
                    math.log(side),
                    rank[i],
                    top,
                    float(c.density.upper() == "D"),
                ]
            )
        out.append(np.asarray(rows, np.float64).reshape(-1, len(WHERE)))
    return out


CONVERGENCE_BANDS_MM = ((2.0, 6.0), (4.0, 12.0), (8.0, 24.0))
CONVERGENCE = (
    "logit",
    "conv_centre",
    "conv_box_max",
    "conv_any_max",
    "grad_coherence",
)


def convergence_maps(
    pixels: np.ndarray,
    spacing_mm: float,
    bands_mm: Sequence[tuple[float, float]] = CONVERGENCE_BANDS_MM,
) -> np.ndarray:
    """float[len(bands), H, W]: the convergence index of the gradient field.

    The classic CAD mass filter (Kobatake's iris / convergence-index family,
    Karssemeijer's gradient concentration): at each pixel, the mean cosine
    between the image's gradient direction at the points of an annulus
    (``bands_mm``, inner and outer radius) and the direction from each
    point back to the pixel. A bright rounded blob's edges all point at its
    centre (near 1), texture and straight structures point anywhere
    (near 0). Gradient directions only, so it is blind to the film's
    contrast and to the gray scale. One map per band; 0 outside the breast.
    """
    from scipy import ndimage as ndi
    from scipy.signal import fftconvolve

    s = ndi.gaussian_filter(pixels.astype(np.float64), max(1.0 / spacing_mm, 0.5))
    gy, gx = np.gradient(s)
    mag = np.hypot(gx, gy)
    # the breast: above a tenth of the way from the background (the minimum)
    # to the median, so neither gray scale nor offset moves it
    lo, mid = float(pixels.min()), float(np.median(pixels))
    breast = pixels > lo + 0.1 * max(mid - lo, 1e-9)
    ok = (mag > 1e-6) & breast
    ux = np.where(ok, gx / np.maximum(mag, 1e-12), 0.0)
    uy = np.where(ok, gy / np.maximum(mag, 1e-12), 0.0)
    out = []
    for r0_mm, r1_mm in bands_mm:
        r0, r1 = r0_mm / spacing_mm, r1_mm / spacing_mm
        n = int(math.ceil(r1))
        dy, dx = np.mgrid[-n : n + 1, -n : n + 1].astype(np.float64)
        d = np.hypot(dx, dy)
        ring = (d >= r0) & (d <= r1)
        # at q = p + d a blob's gradient points back along -d; correlation
        # is convolution with the flipped kernel
        kx = np.where(ring, -dx / np.maximum(d, 1e-9), 0.0)[::-1, ::-1]
        ky = np.where(ring, -dy / np.maximum(d, 1e-9), 0.0)[::-1, ::-1]
        count = fftconvolve(ok.astype(np.float64), ring[::-1, ::-1], mode="same")
        c = fftconvolve(ux, kx, mode="same") + fftconvolve(uy, ky, mode="same")
        out.append(np.where(breast, c / np.maximum(count, 1.0), 0.0))
    return np.asarray(out, np.float32)


def convergence_features(
    images: Sequence[FrocImage], cached: dict[str, CachedImage]
) -> list[np.ndarray]:
    """float[K, len(CONVERGENCE)] per image, for every detection (any class).

    Each mark's convergence index (``convergence_maps``) in the band whose
    radii hold the box's half-side (the nearest band otherwise): at the
    box's centre and its maximum over the box's middle half, the maximum of
    any band over that middle half, and the gradient's coherence there (the
    length of the mean unit gradient vector: an edge or a straight band
    scores near 1, a blob's symmetric edges cancel to near 0).
    """
    out = []
    for im in images:
        c = cached[im.key]
        maps = convergence_maps(c.pixels, im.spacing_mm)
        h, w = c.pixels.shape
        gy, gx = np.gradient(c.pixels.astype(np.float64))
        mag = np.hypot(gx, gy) + 1e-12
        ux, uy = gx / mag, gy / mag
        rows = []
        for (x0, y0, x1, y1), score in zip(im.det_boxes, im.det_scores, strict=True):
            half_mm = (x1 - x0 + y1 - y0) / 4 * im.spacing_mm
            # the band whose radii hold the half-side, else the nearest
            off = [
                0.0 if a <= half_mm <= b else min(abs(half_mm - a), abs(half_mm - b))
                for a, b in CONVERGENCE_BANDS_MM
            ]
            band = int(np.argmin(off))
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            qx, qy = (x1 - x0) / 4, (y1 - y0) / 4
            a0 = int(np.clip(math.floor(cx - qx), 0, w - 1))
            a1 = int(np.clip(math.ceil(cx + qx) + 1, a0 + 1, w))
            b0 = int(np.clip(math.floor(cy - qy), 0, h - 1))
            b1 = int(np.clip(math.ceil(cy + qy) + 1, b0 + 1, h))
            ic = int(np.clip(round(cy), 0, h - 1))
            jc = int(np.clip(round(cx), 0, w - 1))
            coherence = math.hypot(
                float(ux[b0:b1, a0:a1].mean()), float(uy[b0:b1, a0:a1].mean())
            )
            rows.append(
                [
                    _logit(score),
                    float(maps[band, ic, jc]),
                    float(maps[band, b0:b1, a0:a1].max()),
                    float(maps[:, b0:b1, a0:a1].max()),
                    coherence,
                ]
            )
        out.append(np.asarray(rows, np.float64).reshape(-1, len(CONVERGENCE)))
    return out


def fit_logistic(
    x: np.ndarray, y: np.ndarray, *, lam: float = 1.0, iters: int = 50
) -> Callable[[np.ndarray], np.ndarray]:
    """L2-penalized logistic regression (Newton steps on standardized features)."""
    mu, sd = x.mean(0), x.std(0) + 1e-9
    z = np.c_[np.ones(len(x)), (x - mu) / sd]
    w = np.zeros(z.shape[1])
    pen = lam * np.diag(np.r_[0.0, np.ones(z.shape[1] - 1)])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-z @ w))
        g = z.T @ (p - y) + pen @ w
        hess = (z * (p * (1 - p))[:, None]).T @ z + pen
        w = w - np.linalg.solve(hess, g)

    def predict(xn: np.ndarray) -> np.ndarray:
        zn = np.c_[np.ones(len(xn)), (xn - mu) / sd]
        return np.asarray(1 / (1 + np.exp(-zn @ w)))

    return predict


def nested_rescore(
    images: Sequence[FrocImage],
    folds: Sequence[int],
    features: Sequence[np.ndarray],
    columns: Sequence[int],
    label: int = MASS,
) -> list[FrocImage]:
    """Class ``label``'s detections re-scored by a logistic model fitted on the
    other folds' detections (hit = 1, false positive = 0; duplicates left out
    of the fit), so every new score is out-of-fold."""
    xs, ys, fs, where = [], [], [], []
    for i, (im, f) in enumerate(zip(images, features, strict=True)):
        sel = np.where(im.det_labels == label)[0]
        _, outcome, _ = match_image(im, label)
        for j, k in enumerate(sel):
            xs.append(f[k, list(columns)])
            ys.append(float(outcome[j] == HIT))
            fs.append(folds[i])
            where.append((i, k))
    x, y, fa = np.asarray(xs), np.asarray(ys), np.asarray(fs)
    new = np.zeros(len(y))
    for fold in np.unique(fa):
        train = fa != fold
        if y[train].min(initial=1) == y[train].max(initial=0):
            raise ValueError(f"fold {fold}: the other folds have one outcome only")
        new[~train] = fit_logistic(x[train], y[train])(x[~train])
    out = [dataclasses.replace(im, det_scores=im.det_scores.copy()) for im in images]
    for (i, k), s in zip(where, new, strict=True):
        out[i].det_scores[k] = s
    return out


# --- classic speck clusters ----------------------------------------------------------
def speck_peaks(
    stored: np.ndarray, crop: Sequence[int], *, spacing_mm: float
) -> np.ndarray:
    """float[P, 3] ``(x, y, z)`` in stored pixels: top-hat maxima with robust z."""
    from scipy import ndimage as ndi

    x0, y0, x1, y1 = crop
    c = stored[y0:y1, x0:x1].astype(np.float32)
    size = max(3, int(round(1.4 / spacing_mm)) | 1)  # a square wider than a speck
    s = ndi.gaussian_filter(c, 0.7)
    th = s - ndi.grey_opening(s, size=(size, size))
    breast = ndi.binary_erosion(c > np.percentile(c, 5) + 1, iterations=10)
    v = th[breast]
    if v.size < 100:
        return np.zeros((0, 3))
    med = float(np.median(v))
    mad = float(np.median(np.abs(v - med))) * 1.4826 + 1e-6
    z = np.where(breast, (th - med) / mad, 0.0)
    peaks = np.argwhere((z == ndi.maximum_filter(z, size=5)) & (z > 3.0))
    return np.c_[peaks[:, 1] + x0, peaks[:, 0] + y0, z[peaks[:, 0], peaks[:, 1]]]


def speck_clusters(
    peaks: np.ndarray, *, z_min: float, link_px: float, k_min: int, min_box_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """Single-linkage clusters of the peaks above ``z_min``: boxes and scores."""
    p = peaks[peaks[:, 2] > z_min]
    if len(p) < k_min:
        return np.zeros((0, 4)), np.zeros(0)
    d = np.hypot(p[:, None, 0] - p[None, :, 0], p[:, None, 1] - p[None, :, 1])
    lab = -np.ones(len(p), int)
    n = 0
    for i in range(len(p)):
        if lab[i] >= 0:
            continue
        stack, lab[i] = [i], n
        while stack:
            j = stack.pop()
            for k in np.where((d[j] < link_px) & (lab < 0))[0]:
                lab[k] = n
                stack.append(int(k))
        n += 1
    boxes, scores = [], []
    for c in range(n):
        q = p[lab == c]
        if len(q) < k_min:
            continue
        cx, cy = (
            (q[:, 0].min() + q[:, 0].max()) / 2,
            (q[:, 1].min() + q[:, 1].max()) / 2,
        )
        bw = max(float(np.ptp(q[:, 0])), min_box_px)
        bh = max(float(np.ptp(q[:, 1])), min_box_px)
        boxes.append([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2])
        scores.append(float(np.log(q[:, 2]).sum()))
    return np.asarray(boxes).reshape(-1, 4), np.asarray(scores)


# --- the run -----------------------------------------------------------------------
def _row(
    ref: Sequence[FrocImage], new: Sequence[FrocImage], label: int, n_boot: int
) -> dict[str, Any]:
    r = froc_class(new, label)
    d, ci = paired_cpm_difference(ref, new, label, n_boot=n_boot)
    return {
        "class": CLASSES[label],
        "cpm": rounded(r.cpm),
        "sens_at_1fp": rounded(r.sens_at[1.0]),
        "minus_detector": rounded(d),
        "minus_detector_ci95": [rounded(v) for v in ci],
    }


def analyse(
    oof: Path,
    cache: Path,
    *,
    analyses: Sequence[str],
    n_boot: int = 1000,
    stored_spacing_mm: float = 0.2,
    rescored: dict[tuple[str, str], tuple[list[FrocImage], list[FrocImage]]]
    | None = None,
) -> list[dict[str, Any]]:
    """Every analysis's rows for one OOF file (the detector's own rows first).

    ``rescored``, when given, receives each feature-set variant's
    ``(detector's images, re-scored images)`` under ``(analysis, variant)``,
    for pooling over several files (``pooled_rows``).
    """
    images = load_oof(oof)
    folds = [int(r.get("fold", -1)) for r in oof_records(oof)]
    if any(f < 0 for f in folds):
        # the nested re-scorer fits on the other folds: without folds it would
        # fit on nothing and score NaN without a word
        missing = sum(f < 0 for f in folds)
        raise ValueError(
            f"{oof}: {missing} of {len(folds)} records have no 'fold' (written "
            "before crossval recorded it); rerun the cross-validation"
        )
    rows: list[dict[str, Any]] = []
    for label in (MASS, CALC):
        rows.append(
            {
                "analysis": "detector",
                "variant": "as trained",
                **_row(images, images, label, 0),
            }
        )
    if "rank" in analyses:
        for mode in ("top2", "top3", "rel"):
            rows.append(
                {
                    "analysis": "rank",
                    "variant": mode,
                    **_row(images, rank_rule(images, mode), MASS, n_boot),
                }
            )
    if "suppress" in analyses:
        for mode in SUPPRESS:
            thinned = suppress_rule(images, mode)
            marks = float(np.mean([len(t.det_scores) for t in thinned]))
            for label in (MASS, CALC):
                rows.append(
                    {
                        "analysis": "suppress",
                        "variant": mode,
                        "marks_per_image": rounded(marks),
                        **_row(images, thinned, label, n_boot),
                    }
                )
    if {"bilateral", "specks", "where", "convergence"} & set(analyses):
        cached = {im.key: read_cached(cache, im.key) for im in images}
    # each feature set, with the detector's logit (column 0), re-scores the
    # mass marks out of fold
    feature_sets: dict[str, tuple[Callable[..., list[np.ndarray]], Any]] = {
        "bilateral": (
            bilateral_features,
            (
                ("detector score only (control)", [0]),
                ("score + own intensity", [0, 1, 2]),
                ("score + own + contralateral", [0, 1, 2, 3, 4, 5]),
            ),
        ),
        "where": (
            where_features,
            (
                ("detector score only (control)", [0]),
                ("score + place in the breast + size", [0, 1, 2, 3, 4, 5]),
                ("score + rank in the image + image's best", [0, 6, 7]),
                ("score + density", [0, 8]),
                ("all of them", list(range(len(WHERE)))),
            ),
        ),
        "convergence": (
            convergence_features,
            (
                ("detector score only (control)", [0]),
                ("score + convergence at the centre", [0, 1]),
                ("score + convergence over the box", [0, 2, 3]),
                ("all of them", list(range(len(CONVERGENCE)))),
            ),
        ),
    }
    for analysis, (features, variants) in feature_sets.items():
        if analysis not in analyses:
            continue
        feats = features(images, cached)
        for name, cols in variants:
            new = nested_rescore(images, folds, feats, cols)
            if rescored is not None:
                rescored[(analysis, name)] = (list(images), new)
            rows.append(
                {
                    "analysis": analysis,
                    "variant": name,
                    **_row(images, new, MASS, n_boot),
                }
            )
    if "specks" in analyses:
        from PIL import Image

        peaks = {}
        for im in images:
            c = cached[im.key]
            src = c.source if c.source.is_absolute() else Path.cwd() / c.source
            stored = np.asarray(Image.open(src).convert("L"), np.float32)
            peaks[im.key] = speck_peaks(
                stored, c.geometry.crop, spacing_mm=stored_spacing_mm
            )
        for z_min in (4.0, 6.0, 8.0):
            for link_mm in (2.5, 5.0):
                out = []
                for im in images:
                    b, s = speck_clusters(
                        peaks[im.key],
                        z_min=z_min,
                        link_px=link_mm / stored_spacing_mm,
                        k_min=3,
                        min_box_px=6.0 / stored_spacing_mm,
                    )
                    bm = cached[im.key].geometry.to_model(b) if len(b) else b
                    out.append(
                        dataclasses.replace(
                            im,
                            det_boxes=bm,
                            det_scores=s,
                            det_labels=np.full(len(s), CALC, np.int64),
                        )
                    )
                rows.append(
                    {
                        "analysis": "specks",
                        "variant": f"z>{z_min:g}, link {link_mm:g} mm, >=3 specks",
                        **_row(images, out, CALC, n_boot),
                    }
                )
    return rows


def pooled_rows(
    per_file: Sequence[dict[tuple[str, str], tuple[list[FrocImage], list[FrocImage]]]],
    n_boot: int,
) -> list[dict[str, Any]]:
    """One row per re-scoring variant that every file has: the mass CPM
    difference from the detector's own scores, the mean over the files (seeds)
    with an interval that resamples the seeds and the women
    (:func:`pooled_paired_cpm_difference`)."""
    if len(per_file) < 2:
        return []
    rows = []
    for k in per_file[0]:
        if not all(k in f for f in per_file):
            continue
        r = pooled_paired_cpm_difference(
            [f[k][0] for f in per_file],
            [f[k][1] for f in per_file],
            MASS,
            n_boot=n_boot,
        )
        rows.append(
            {
                "analysis": k[0],
                "variant": k[1],
                "class": CLASSES[MASS],
                "cpm": rounded(r["cpm_b"]),
                "pooled_over": len(per_file),
                "minus_detector": rounded(r["diff"]),
                "minus_detector_ci95": [rounded(v) for v in r["ci95"]],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--oof",
        type=Path,
        nargs="+",
        required=True,
        help="crossval oof_predictions(-detector).json files",
    )
    p.add_argument("--cache", type=Path, required=True, help="the mini-MIAS cache")
    p.add_argument("--analyses", default="rank,bilateral,specks")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--results", type=Path, default=None)
    args = p.parse_args(argv)
    analyses = [a for a in args.analyses.split(",") if a]
    known = {"rank", "suppress", "bilateral", "where", "convergence", "specks"}
    unknown = set(analyses) - known
    if unknown:
        p.error(f"--analyses: unknown {sorted(unknown)}")
    per_file: list[dict[tuple[str, str], tuple[list[FrocImage], list[FrocImage]]]] = []
    for path in args.oof:
        per_file.append({})
        for row in analyse(
            path,
            args.cache,
            analyses=analyses,
            n_boot=args.n_boot,
            rescored=per_file[-1],
        ):
            emit(
                BENCH,
                f"{row['class']}-cpm",
                row.pop("cpm"),
                "cpm",
                results_dir=args.results,
                oof=str(path),
                **row,
            )
    for row in pooled_rows(per_file, args.n_boot):
        emit(
            BENCH,
            f"{row['class']}-cpm-pooled",
            row.pop("cpm"),
            "cpm",
            results_dir=args.results,
            oof=[str(p) for p in args.oof],
            **row,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
