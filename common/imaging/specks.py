"""Calcification specks at the stored resolution, and the clusters they form.

At the 0.4 mm working spacing a calcification speck (0.1-0.5 mm) is averaged
into its neighbours and the detector's cluster class barely works on real film
(docs/detector.md, "Calcification clusters at the stored resolution"). The
classic CAD answer is knowledge-driven: find bright specks at the finest
resolution the file has, then call a group of them a cluster (the clinical
definition: at least three specks within about 1 cm). This module does both:

* :func:`find_specks` runs once per image at ingest (and in ``predict``), on
  the stored pixels of the breast crop (chest wall left, as the model sees it),
  at ``max(stored spacing, SPECK_SPACING_MM)``. A speck is a local maximum of
  the white top-hat (``x - opening(x)``, a 1 mm square: bright detail smaller
  than 1 mm without the tissue behind it), lightly smoothed, inside the breast
  (eroded by 2 mm, so the skin line does not count), whose contrast is at least
  ``MIN_Z`` robust standard deviations (median and MAD over the breast) above
  the image's typical top-hat. It returns float32[N, 3] ``(x, y, z)``: the
  speck's centre in **model-space** pixels and its contrast ``z``. The cache
  keeps them beside the pixels (``images/<key>.specks.npy``).
* :func:`speck_clusters` turns an image's specks into cluster candidates: for
  each speck, the ``CLUSTER_K``-th brightest speck within ``CLUSTER_RADIUS_MM``
  of it (itself included) is the neighbourhood's evidence, so one bright dot or
  a pair (dust, a film scratch, a vessel wall) does not make a cluster. The
  evidence is divided by the image's ``REF_RANK``-th brightest speck, because
  film grain makes a fatty breast's specks far "brighter" in ``z`` than a dense
  one's; greedy suppression keeps the best neighbourhoods (at most
  ``MAX_CLUSTERS``, none centred within ``CLUSTER_RADIUS_MM`` of a better
  one). The box is that of the neighbourhood's specks at least as bright as
  the evidence, plus 1 mm; the score is :func:`cluster_probability` of the
  ratio: calibrated on mini-MIAS film, a rank elsewhere.
* :func:`with_speck_clusters` puts them in place of a detector's
  calcification findings (``ModelConfig.speck_clusters``).

The settings were looked at on the mini-MIAS development split; the figure
that did not see them is a nested cross-validation over a small grid
(``benchmarks.speck_clusters``, benchmarks/results/mias_04_specks/,
docs/detector.md "Calcification clusters at the stored resolution").
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from common.imaging.geometry import Geometry
from common.imaging.preprocess import breast_mask
from common.keys import CALCIFICATION, CLASS_TO_LABEL

#: Finest spacing the specks are looked for at (mm); finer files are averaged
#: in whole blocks down to at least this.
SPECK_SPACING_MM = 0.1
#: Side of the top-hat's square structuring element (mm).
TOPHAT_MM = 1.0
#: Gaussian smoothing of the top-hat (sigma, mm).
SMOOTH_MM = 0.14
#: A speck is the maximum of its square of this side (mm).
PEAK_WINDOW_MM = 1.0
#: The breast mask is eroded by this much (mm) before specks count.
ERODE_MM = 2.0
#: Least contrast of a speck kept (robust standard deviations).
MIN_Z = 3.0
#: Most specks kept per image (brightest first).
MAX_SPECKS = 4096
#: A cluster's evidence: its ``CLUSTER_K``-th brightest speck...
CLUSTER_K = 3
#: ... within this distance (mm) of the candidate's speck.
CLUSTER_RADIUS_MM = 5.0
#: The image's reference: its ``REF_RANK + 1``-th brightest speck (0-based).
REF_RANK = 10
#: Most cluster candidates per image.
MAX_CLUSTERS = 20
#: Margin added around a cluster's specks (mm).
BOX_MARGIN_MM = 1.0
#: Score calibration (:func:`cluster_probability`): a logistic fit of "the
#: candidate lies on a cluster" on the log of its evidence ratio, over the
#: 3060 candidates of the 222 mini-MIAS development images (11 on a cluster;
#: stop 46, out/calc exploration): ratio 1 -> 0.007, 1.5 -> 0.04, 2 -> 0.12,
#: 3 -> 0.42. Few candidates deserve a mark that a reader must see.
CALIBRATION_A = -4.9
CALIBRATION_B = 4.2

_CALC = CLASS_TO_LABEL[CALCIFICATION]


def _empty() -> np.ndarray:
    return np.zeros((0, 3), dtype=np.float32)


def find_specks(
    pixels01: np.ndarray, geometry: Geometry, stored_spacing_mm: float
) -> np.ndarray:
    """Specks of a stored image, in model space: float32[N, 3] ``(x, y, z)``.

    Args:
        pixels01: float[H, W] stored-space pixels in ``[0, 1]``, dense bright
            (what :func:`common.imaging.preprocess.standardize` was given).
        geometry: the stored -> model :class:`Geometry` of that image.
        stored_spacing_mm: mm per stored pixel.

    Returns:
        Brightest first, at most :data:`MAX_SPECKS`; empty when the image has
        no breast large enough to hold one.
    """
    if not (math.isfinite(stored_spacing_mm) and stored_spacing_mm > 0):
        raise ValueError(f"stored_spacing_mm must be > 0, got {stored_spacing_mm!r}")
    x0, y0, x1, y1 = geometry.crop
    crop = np.asarray(pixels01, dtype=np.float32)[y0:y1, x0:x1]
    if geometry.flip:
        crop = crop[:, ::-1]
    block = max(1, int(SPECK_SPACING_MM / stored_spacing_mm + 1e-9))
    if block > 1:
        h, w = (crop.shape[0] // block) * block, (crop.shape[1] // block) * block
        if h == 0 or w == 0:
            return _empty()
        crop = crop[:h, :w].reshape(h // block, block, w // block, block).mean((1, 3))
    sp = stored_spacing_mm * block

    def px(mm: float) -> int:
        return max(1, int(round(mm / sp)))

    size = max(3, px(TOPHAT_MM))
    if min(crop.shape) < 4 * size:
        return _empty()
    tophat = crop - ndimage.grey_opening(crop, size=(size, size))
    smooth = ndimage.gaussian_filter(tophat, SMOOTH_MM / sp)
    mask, factor = breast_mask(crop)
    full = np.kron(mask, np.ones((factor, factor), dtype=bool))
    inside = np.zeros(crop.shape, dtype=bool)
    hh, ww = min(full.shape[0], crop.shape[0]), min(full.shape[1], crop.shape[1])
    inside[:hh, :ww] = full[:hh, :ww]
    inside = ndimage.binary_erosion(inside, iterations=px(ERODE_MM))
    values = smooth[inside]
    if values.size < 16:
        return _empty()
    med = float(np.median(values))
    mad = float(np.median(np.abs(values - med))) * 1.4826
    if not mad > 0:
        return _empty()
    z = (smooth - med) / mad
    window = max(3, px(PEAK_WINDOW_MM))
    peaks = (z == ndimage.maximum_filter(z, size=window)) & inside & (z > MIN_Z)
    rows, cols = np.nonzero(peaks)
    zs = z[rows, cols]
    order = np.argsort(-zs, kind="stable")[:MAX_SPECKS]
    # pixel centres, crop pixels at ``sp`` -> model pixels
    sx, sy = geometry.scale
    x = (cols[order] + 0.5) * block * sx
    y = (rows[order] + 0.5) * block * sy
    return np.stack([x, y, zs[order]], axis=1).astype(np.float32)


def check_specks(specks: object, what: str) -> np.ndarray:
    """``specks`` as float32[N, 3] of finite values (``ValueError`` names ``what``)."""
    a = np.asarray(specks)
    if a.ndim != 2 or a.shape[1] != 3 or a.dtype.kind != "f":
        raise ValueError(f"{what}: specks must be float[N, 3], got {a.dtype} {a.shape}")
    if a.shape[0] > MAX_SPECKS:
        raise ValueError(f"{what}: {a.shape[0]} specks, more than {MAX_SPECKS}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what}: specks hold non-finite values")
    return a.astype(np.float32, copy=False)


def speck_clusters(
    specks: np.ndarray,
    spacing_mm: float,
    *,
    k: int = CLUSTER_K,
    radius_mm: float = CLUSTER_RADIUS_MM,
    ref_rank: int = REF_RANK,
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster candidates ``(boxes float32[K, 4], scores float32[K])`` in model pixels.

    ``specks``: :func:`find_specks`' array; ``spacing_mm``: mm per model pixel.
    Best first; empty when the image has fewer than ``k`` specks. ``k``,
    ``radius_mm`` and ``ref_rank`` default to the module's settings (the
    benchmark's nested cross-validation varies them).
    """
    if not (k >= 1 and radius_mm > 0 and ref_rank >= 0 and spacing_mm > 0):
        raise ValueError(
            f"speck_clusters: need k >= 1, radius_mm > 0, ref_rank >= 0, "
            f"spacing_mm > 0; got {k!r}, {radius_mm!r}, {ref_rank!r}, {spacing_mm!r}"
        )
    s = check_specks(specks, "speck_clusters")
    if len(s) < k:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    xy, z = s[:, :2].astype(np.float64), s[:, 2].astype(np.float64)
    ref = float(np.sort(z)[::-1][min(ref_rank, len(z) - 1)])
    near = cKDTree(xy).query_ball_point(xy, radius_mm / spacing_mm)
    evidence = np.array(
        [np.sort(z[n])[::-1][k - 1] if len(n) >= k else 0.0 for n in near]
    )
    margin = BOX_MARGIN_MM / spacing_mm
    reach = radius_mm / spacing_mm
    taken = np.zeros(len(z), dtype=bool)
    boxes: list[list[float]] = []
    centres: list[np.ndarray] = []
    scores: list[float] = []
    for i in np.argsort(-evidence, kind="stable"):
        if evidence[i] <= MIN_Z or taken[i] or len(scores) >= MAX_CLUSTERS:
            continue
        n = np.asarray(near[i])
        taken[n] = True
        p = xy[n[z[n] >= evidence[i]]]
        lo, hi = p.min(0) - margin, p.max(0) + margin
        centre = (lo + hi) / 2
        # one cluster, one mark: a candidate centred within the cluster radius
        # of a better one is the same cluster seen from another speck
        if any(np.hypot(*(centre - c)) <= reach for c in centres):
            continue
        boxes.append([lo[0], lo[1], hi[0], hi[1]])
        centres.append(centre)
        scores.append(cluster_probability(evidence[i] / ref))
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32)


def cluster_probability(ratio: float) -> float:
    """The score of a cluster candidate whose evidence is ``ratio`` x the reference.

    ``sigmoid(CALIBRATION_A + CALIBRATION_B * log(ratio))``: on mini-MIAS film
    the share of candidates with that ratio that lie on a cluster (logistic
    fit over the development split's out-of-fold candidates; see the
    constants). Monotone, so it ranks as the ratio does; on another kind of
    image it is a rank more than a probability.
    """
    if not ratio > 0:
        return 0.0
    return float(
        1.0 / (1.0 + math.exp(-(CALIBRATION_A + CALIBRATION_B * math.log(ratio))))
    )


def with_speck_clusters(
    det: dict[str, np.ndarray],
    specks: np.ndarray,
    spacing_mm: float,
    *,
    k: int = CLUSTER_K,
    radius_mm: float = CLUSTER_RADIUS_MM,
    ref_rank: int = REF_RANK,
) -> dict[str, np.ndarray]:
    """``det`` (boxes/scores/labels) with its calcifications replaced by clusters.

    The detector's other classes are kept as they are (their values to the
    last bit); the result is sorted by score like
    :func:`common.detector.engine.predict_images`' output. ``k``,
    ``radius_mm``, ``ref_rank``: :func:`speck_clusters`' settings.
    """
    boxes, scores = speck_clusters(
        specks, spacing_mm, k=k, radius_mm=radius_mm, ref_rank=ref_rank
    )
    keep = np.asarray(det["labels"]) != _CALC
    old_boxes, old_scores = np.asarray(det["boxes"]), np.asarray(det["scores"])
    # the kept findings' values unchanged, to the last bit (float64 stays so)
    all_boxes = np.concatenate([old_boxes.reshape(-1, 4)[keep], boxes]).astype(
        np.result_type(old_boxes.dtype, np.float32)
    )
    all_scores = np.concatenate([old_scores[keep], scores]).astype(
        np.result_type(old_scores.dtype, np.float32)
    )
    labels = np.concatenate(
        [np.asarray(det["labels"], np.int64)[keep], np.full(len(scores), _CALC)]
    )
    order = np.argsort(-all_scores, kind="stable")
    return {
        "boxes": all_boxes[order].reshape(-1, 4),
        "scores": all_scores[order],
        "labels": labels[order].astype(np.int64),
    }
