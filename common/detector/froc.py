"""FROC, CPM and AP for lesion detection, per class (the definition is below).

Inputs are per image (:class:`FrocImage`), all boxes ``[xmin, ymin, xmax,
ymax]`` in the SAME pixel space (model space in this project) with
``spacing_mm`` = mm per pixel of that space.

Hit rule (per class): a detection hits a lesion of its class when the distance
between the two box centres, in mm (pixels x ``spacing_mm``), is at most
``max(half the lesion box's diagonal, 5 mm)``. Within one image detections are
processed in decreasing score (ties: original order), and each gets one
outcome:

* **hit**: its centre is within reach of a lesion not yet hit; it hits the
  nearest such lesion (distance in mm, ties: lower lesion index);
* **duplicate** (ignored, not a false positive): it is only within reach of
  lesions already hit;
* **ignored**: not within reach of any lesion and its centre lies inside an
  ignore box (closed interval ``xmin <= cx <= xmax``, same for y);
* **false positive**: everything else.

Detections of one image are matched highest score first; detections with
the same score in order of their box (x1, y1, x2, y2), not of the list, so
that which of two tied detections takes a lesion does not depend on the
order a model returned them in.

Because a detection's outcome depends only on detections scored at least as
high, the threshold sweep uses these fixed outcomes. Thresholds are the
distinct detection scores, high to low; all detections with the same score
enter together, so ties give ONE curve point (deterministic, order-free). The
curve starts at ``(0 FP/image, 0)`` (threshold above every score).

* ``FP/image`` divides by every image given (normal images included).
* Sensitivity at ``f`` FP/image = the highest sensitivity at any curve point
  with ``FP/image <= f`` (no interpolation); CPM = mean over
  ``common.keys.CPM_FP_RATES``.
* AP uses the same outcomes (duplicates and ignored detections drop out):
  all-point interpolated area under precision-recall (precision made monotone
  from the right), one point per distinct score.
* A class with no lesion in the image set has undefined sensitivity: every
  sensitivity, the CPM and the AP are ``NaN``.
* The 95% CI of CPM is a percentile bootstrap over cases (seeded; resamples
  without any lesion are dropped): a case is a woman (``FrocImage.case``), all
  of her images drawn together; an image without a case is its own.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.keys import CLASSES, CPM_FP_RATES, FROC_FP_RATES

log = logging.getLogger(__name__)

#: Minimum hit radius in mm (reach of a lesion: max(half its diagonal, this)).
MIN_HIT_RADIUS_MM = 5.0

HIT, DUPLICATE, IGNORED, FALSE_POSITIVE = 1, 2, 3, 0


def _boxes(a: object, name: str, key: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"FrocImage {key!r}: {name} must be [N, 4], got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"FrocImage {key!r}: {name} has non-finite values")
    return arr


@dataclass(frozen=True)
class FrocImage:
    """Ground truth and detections of one image (all boxes in one pixel space).

    Attributes:
        key: image identifier (for messages).
        spacing_mm: mm per pixel of the box space (> 0).
        gt_boxes: float[N, 4] lesion boxes; ``gt_labels`` int[N] class indices.
        ignore_boxes: float[M, 4] regions where detections count for nothing.
        det_boxes: float[K, 4]; ``det_scores`` float[K]; ``det_labels`` int[K].
        case: the case the image belongs to (the woman: her ``patient_id``).
            Bootstrap intervals resample whole cases, because a woman's views
            show the same lesions and are not independent; ``""``: the image
            is a case of its own.
    """

    key: str
    spacing_mm: float
    gt_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    gt_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    ignore_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    det_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    det_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    det_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    case: str = ""

    def __post_init__(self) -> None:
        k = self.key
        if not (math.isfinite(self.spacing_mm) and self.spacing_mm > 0):
            raise ValueError(
                f"FrocImage {k!r}: spacing_mm must be > 0, got {self.spacing_mm!r}"
            )
        for name in ("gt_boxes", "ignore_boxes", "det_boxes"):
            object.__setattr__(self, name, _boxes(getattr(self, name), name, k))
        gl = np.asarray(self.gt_labels, dtype=np.int64).reshape(-1)
        ds = np.asarray(self.det_scores, dtype=np.float64).reshape(-1)
        dl = np.asarray(self.det_labels, dtype=np.int64).reshape(-1)
        if len(gl) != len(self.gt_boxes):
            raise ValueError(
                f"FrocImage {k!r}: {len(gl)} gt_labels for "
                f"{len(self.gt_boxes)} gt_boxes"
            )
        if not (len(ds) == len(dl) == len(self.det_boxes)):
            raise ValueError(
                f"FrocImage {k!r}: det_boxes/scores/labels lengths "
                f"{len(self.det_boxes)}/{len(ds)}/{len(dl)} differ"
            )
        if not np.all(np.isfinite(ds)):
            raise ValueError(f"FrocImage {k!r}: det_scores has non-finite values")
        object.__setattr__(self, "gt_labels", gl)
        object.__setattr__(self, "det_scores", ds)
        object.__setattr__(self, "det_labels", dl)

    def to_json(self) -> dict[str, object]:
        """JSON-safe dict (boxes rounded to 0.01 px, scores exact).

        :meth:`from_json` reads it back; the rounding changes no hit or miss
        at the 5 mm / box-centre rule beyond 0.01 px. Scores are kept to the
        last bit: rounded, two nearby scores could tie and move an FROC point,
        so a curve re-scored from the file (paired comparisons, ``--reuse``)
        would differ from the one scored in memory.
        """
        return {
            "key": self.key,
            "spacing_mm": self.spacing_mm,
            "gt_boxes": np.round(self.gt_boxes, 2).tolist(),
            "gt_labels": self.gt_labels.tolist(),
            "ignore_boxes": np.round(self.ignore_boxes, 2).tolist(),
            "det_boxes": np.round(self.det_boxes, 2).tolist(),
            "det_scores": self.det_scores.tolist(),
            "det_labels": self.det_labels.tolist(),
            "case": self.case,
        }

    @classmethod
    def from_json(cls, d: dict[str, object]) -> FrocImage:
        """The image :meth:`to_json` wrote (validated like any FrocImage).

        Raises:
            ValueError: a field is missing or malformed (named with the key).
        """
        try:
            return cls(
                key=str(d["key"]),
                spacing_mm=float(d["spacing_mm"]),  # type: ignore[arg-type]
                gt_boxes=np.asarray(d["gt_boxes"], np.float64).reshape(-1, 4),
                gt_labels=np.asarray(d["gt_labels"], np.int64),
                ignore_boxes=np.asarray(d["ignore_boxes"], np.float64).reshape(-1, 4),
                det_boxes=np.asarray(d["det_boxes"], np.float64).reshape(-1, 4),
                det_scores=np.asarray(d["det_scores"], np.float64),
                det_labels=np.asarray(d["det_labels"], np.int64),
                case=str(d.get("case", "")),  # files written before cases: ""
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"FrocImage {d.get('key', '?')!r}: bad JSON record: {exc}"
            ) from exc


def _centres(b: np.ndarray) -> np.ndarray:
    return np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1)


def centres_and_reach_mm(
    boxes: np.ndarray, spacing_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(centres float[N, 2], reach float[N])`` of boxes float[N, 4], in mm.

    A box's reach is the hit rule's radius: ``max(half its diagonal,
    MIN_HIT_RADIUS_MM)``. The FROC uses it for lesions; weighted box fusion
    and the post hoc suppression rules use it between detections.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    half = 0.5 * np.hypot(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) * spacing_mm
    return _centres(b) * spacing_mm, np.maximum(half, MIN_HIT_RADIUS_MM)


def match_image(image: FrocImage, label: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Outcomes of one image's detections of class ``label``.

    Returns:
        ``(scores float[K], outcomes int[K], n_lesions)`` where outcomes are
        ``HIT``, ``DUPLICATE``, ``IGNORED`` or ``FALSE_POSITIVE`` (module
        docstring) and ``n_lesions`` counts this class's lesions.
    """
    scores, outcomes, hit_by = match_image_lesions(image, label)
    return scores, outcomes, int(len(hit_by))


def match_image_lesions(
    image: FrocImage, label: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`match_image`, plus which detection hit each lesion of ``label``.

    Returns:
        ``(scores float[K], outcomes int[K], hit_by int[N])``: the first two as
        in :func:`match_image` (detections of class ``label`` in their original
        order), and for each lesion of the class (in ``gt_boxes`` order among
        that class's lesions) the index into those K detections of the one
        that hit it, or ``-1`` when none did. A lesion hit by detection ``i``
        is found at every threshold ``<= scores[i]`` and missed above it.
    """
    gt = image.gt_boxes[image.gt_labels == label]
    dmask = image.det_labels == label
    dets = image.det_boxes[dmask]
    scores = image.det_scores[dmask]
    # highest score first; ties broken by the box (not by list order), so the
    # outcome does not depend on the order the detections were given in
    order = np.lexsort((dets[:, 3], dets[:, 2], dets[:, 1], dets[:, 0], -scores))
    outcomes = np.full(len(dets), FALSE_POSITIVE, dtype=np.int64)
    hit_by = np.full(len(gt), -1, dtype=np.int64)
    if len(dets) == 0:
        return scores, outcomes, hit_by
    sp = image.spacing_mm
    dc = _centres(dets) * sp
    if len(gt):
        gc, radius = centres_and_reach_mm(gt, sp)
        dist = np.linalg.norm(dc[:, None, :] - gc[None, :, :], axis=2)  # [K, N]
        reach = dist <= radius[None, :]
    else:
        dist = np.zeros((len(dets), 0))
        reach = np.zeros((len(dets), 0), dtype=bool)
    hit = np.zeros(len(gt), dtype=bool)
    ig = image.ignore_boxes * sp
    for i in order:
        free = reach[i] & ~hit
        if free.any():
            d = np.where(free, dist[i], np.inf)
            j = int(np.argmin(d))
            hit[j] = True
            hit_by[j] = i
            outcomes[i] = HIT
        elif reach[i].any():
            outcomes[i] = DUPLICATE
        elif len(ig) and np.any(
            (ig[:, 0] <= dc[i, 0])
            & (dc[i, 0] <= ig[:, 2])
            & (ig[:, 1] <= dc[i, 1])
            & (dc[i, 1] <= ig[:, 3])
        ):
            outcomes[i] = IGNORED
    return scores, outcomes, hit_by


@dataclass(frozen=True)
class FrocResult:
    """FROC of one class over a set of images.

    Attributes:
        label: class index; ``name`` its name.
        fp_per_image, sensitivity, thresholds: curve points (first point is the
            origin at threshold ``+inf``), one per distinct score.
        sens_at: sensitivity at each of ``common.keys.FROC_FP_RATES``.
        cpm: mean sensitivity at ``common.keys.CPM_FP_RATES``.
        ap: average precision with the same hit rule.
        n_images, n_lesions, n_detections: counts.
        cpm_ci: 95% bootstrap interval ``(lo, hi)``, or ``None`` if not computed.
    """

    label: int
    name: str
    fp_per_image: np.ndarray
    sensitivity: np.ndarray
    thresholds: np.ndarray
    sens_at: dict[float, float]
    cpm: float
    ap: float
    n_images: int
    n_lesions: int
    n_detections: int
    cpm_ci: tuple[float, float] | None = None


@dataclass(frozen=True)
class _Outcomes:
    """All detections of one class, globally sorted by score (descending)."""

    scores: np.ndarray  # float[D]
    tp: np.ndarray  # float[D] 1 for hits
    fp: np.ndarray  # float[D] 1 for false positives
    image_of: np.ndarray  # int[D]
    lesions: np.ndarray  # int[I] lesions per image
    group_end: np.ndarray  # int[G] index of the last detection of each score


def _collect(images: Sequence[FrocImage], label: int) -> _Outcomes:
    matched = [match_image(im, label) for im in images]
    of_image = [np.full(len(s), i, np.int64) for i, (s, _, _) in enumerate(matched)]
    none = [np.zeros(0, np.int64)]
    scores = np.concatenate([s for s, _, _ in matched] or [np.zeros(0)])
    outc = np.concatenate([o for _, o, _ in matched] or none)
    img = np.concatenate(of_image or none)
    order = np.argsort(-scores, kind="stable")
    scores, outc, img = scores[order], outc[order], img[order]
    if len(scores):
        change = np.nonzero(np.diff(scores) != 0)[0]
        group_end = np.concatenate([change, [len(scores) - 1]])
    else:
        group_end = np.zeros(0, np.int64)
    return _Outcomes(
        scores=scores,
        tp=(outc == HIT).astype(np.float64),
        fp=(outc == FALSE_POSITIVE).astype(np.float64),
        image_of=img,
        lesions=np.asarray([n for _, _, n in matched], dtype=np.int64),
        group_end=group_end,
    )


def _curve(
    oc: _Outcomes, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float]:
    """Cumulative (TP, FP) at each score group, with image weights (bootstrap).

    Returns ``(tp, fp, thresholds, n_images, n_lesions)`` (weighted counts).
    """
    w_img = np.ones(len(oc.lesions)) if weights is None else weights
    w = w_img[oc.image_of] if len(oc.image_of) else np.zeros(0)
    ctp = np.cumsum(oc.tp * w)[oc.group_end] if len(w) else np.zeros(0)
    cfp = np.cumsum(oc.fp * w)[oc.group_end] if len(w) else np.zeros(0)
    n_img = float(w_img.sum())
    n_les = float((oc.lesions * w_img).sum())
    tp = np.concatenate([[0.0], ctp])
    fp = np.concatenate([[0.0], cfp])
    thr = np.concatenate([[np.inf], oc.scores[oc.group_end]])
    return tp, fp, thr, n_img, n_les


def _sens_at(fp_rate: np.ndarray, sens: np.ndarray, rates: Sequence[float]) -> list:
    """Best sensitivity at ``FP/image <= f`` for each rate (0 when none is)."""
    return [float(np.max(sens[fp_rate <= f + 1e-12], initial=0.0)) for f in rates]


def _ap(tp: np.ndarray, fp: np.ndarray, n_les: float) -> float:
    if n_les <= 0:
        return float("nan")
    recall = tp / n_les
    denom = tp + fp
    precision = np.divide(tp, denom, out=np.ones_like(tp), where=denom > 0)
    # all-point interpolation: monotone precision envelope from the right
    mrec = np.concatenate([[0.0], recall[1:]])
    mpre = np.concatenate([[1.0], precision[1:]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    return float(np.sum((mrec[1:] - mrec[:-1]) * mpre[1:]))


def _cpm_from(
    oc: _Outcomes, weights: np.ndarray | None = None
) -> tuple[float, list[float]]:
    tp, fp, _, n_img, n_les = _curve(oc, weights)
    if n_les <= 0 or n_img <= 0:
        return float("nan"), [float("nan")] * len(FROC_FP_RATES)
    sens = tp / n_les
    fpr = fp / n_img
    at = _sens_at(fpr, sens, FROC_FP_RATES)
    cpm = float(np.mean(_sens_at(fpr, sens, CPM_FP_RATES)))
    return cpm, at


def froc_class(
    images: Sequence[FrocImage],
    label: int,
    *,
    n_boot: int = 0,
    seed: int = 0,
    alpha: float = 0.05,
) -> FrocResult:
    """FROC, sensitivities, CPM and AP of class ``label`` over ``images``.

    ``n_boot > 0`` adds a ``1 - alpha`` percentile bootstrap interval of the CPM
    (cases, :attr:`FrocImage.case`, resampled with replacement,
    ``numpy.random.default_rng(seed)``).
    """
    if not 0 <= label < len(CLASSES):
        raise ValueError(f"label must be in [0, {len(CLASSES)}), got {label!r}")
    if len(images) == 0:
        raise ValueError("froc_class: no images given")
    oc = _collect(images, label)
    tp, fp, thr, _, n_les = _curve(oc)
    n_img = len(images)
    sens = tp / n_les if n_les > 0 else np.full(len(tp), np.nan)
    fpr = fp / n_img
    cpm, at = _cpm_from(oc)
    ci = None
    if n_boot > 0:
        ci = _percentile_bootstrap(
            case_index(images), lambda w: _cpm_from(oc, w)[0], n_boot, seed, alpha
        )
    return FrocResult(
        label=label,
        name=CLASSES[label],
        fp_per_image=fpr,
        sensitivity=sens,
        thresholds=thr,
        sens_at=dict(zip(FROC_FP_RATES, at, strict=True)),
        cpm=cpm,
        ap=_ap(tp, fp, n_les),
        n_images=n_img,
        n_lesions=int(n_les),
        n_detections=int(len(oc.scores)),
        cpm_ci=ci,
    )


def case_index(images: Sequence[FrocImage]) -> np.ndarray:
    """int[I]: the case of each image, numbered in order of first appearance.

    An image without a :attr:`FrocImage.case` is a case of its own.
    """
    ids: dict[str, int] = {}
    return np.asarray(
        [
            ids.setdefault(im.case if im.case else f"\0{i}", len(ids))
            for i, im in enumerate(images)
        ],
        dtype=np.int64,
    )


def _percentile_bootstrap(
    cases: np.ndarray,
    statistic: Callable[[np.ndarray], float],
    n_boot: int,
    seed: int,
    alpha: float,
) -> tuple[float, float]:
    """``1 - alpha`` percentile interval of ``statistic(image weights)``.

    ``cases`` int[I] numbers each image's case (:func:`case_index`). Each
    resample draws as many cases as there are, with replacement
    (``numpy.random.default_rng(seed)``); every image weighs its case's
    multiplicity. With one image per case this is the image bootstrap. NaN
    statistics are left out, and all-NaN gives NaN bounds.
    """
    rng = np.random.default_rng(seed)
    n = int(cases.max()) + 1 if len(cases) else 0
    vals = []
    for _ in range(n_boot):
        counts = np.bincount(rng.integers(0, n, size=n), minlength=n)
        v = statistic(counts[cases].astype(np.float64))
        if not math.isnan(v):
            vals.append(v)
    if not vals:
        return (float("nan"), float("nan"))
    lo, hi = np.quantile(np.asarray(vals), [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def paired_cpm_difference(
    a: Sequence[FrocImage],
    b: Sequence[FrocImage],
    label: int,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, tuple[float, float]]:
    """``CPM(b) - CPM(a)`` of class ``label`` on the same images, paired bootstrap.

    Two detectors' outputs on ONE image set (matched by ``FrocImage.key``, any
    order): each resample draws the same images, with the same multiplicity,
    for both, so the interval reflects the difference between the detectors
    and not the luck of the draw (tighter than comparing two unpaired
    intervals). Returns ``(difference, (lo, hi))``, the ``1 - alpha``
    percentile interval (NaN when undefined: no lesion of the class).

    Raises:
        ValueError: the two lists do not hold the same image keys, exactly once each.
    """
    r = pooled_paired_cpm_difference(
        [a], [b], label, n_boot=n_boot, seed=seed, alpha=alpha
    )
    return r["diff"], r["ci95"]


def froc_all(
    images: Sequence[FrocImage], *, n_boot: int = 1000, seed: int = 0
) -> dict[str, FrocResult]:
    """:func:`froc_class` for every class in ``common.keys.CLASSES``, by name."""
    return {
        name: froc_class(images, i, n_boot=n_boot, seed=seed)
        for i, name in enumerate(CLASSES)
    }


def _num(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


@dataclass(frozen=True)
class FrocCurve:
    """FROC points: false positives per image and sensitivity, one per score."""

    fp_per_image: list[float]
    sensitivity: list[float]


@dataclass(frozen=True)
class ClassMetrics:
    """The one JSON record of a :class:`FrocResult` (NaN written as ``null``).

    Written by ``mammofed-client evaluate``, cross-validation and the study's
    ``<regime>/metrics.json`` (``common.wire.runfolder.SiteMetrics``), read back by
    :meth:`from_json`. ``curve`` is kept (not ``None``) only where a plot
    needs it.
    """

    cpm: float | None
    cpm_ci95: list[float | None] | None
    ap: float | None
    sensitivity_at_fp: dict[str, float | None]
    n_images: int
    n_lesions: int
    n_detections: int
    curve: FrocCurve | None = None

    @classmethod
    def from_result(cls, r: FrocResult, *, curve: bool = False) -> ClassMetrics:
        """The record of ``r``; with ``curve`` its FROC points too."""
        return cls(
            cpm=_num(r.cpm),
            cpm_ci95=None if r.cpm_ci is None else [_num(x) for x in r.cpm_ci],
            ap=_num(r.ap),
            sensitivity_at_fp={f"{f:g}": _num(s) for f, s in r.sens_at.items()},
            n_images=r.n_images,
            n_lesions=r.n_lesions,
            n_detections=r.n_detections,
            curve=FrocCurve(r.fp_per_image.tolist(), r.sensitivity.tolist())
            if curve
            else None,
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-safe mapping (every field; ``curve`` a mapping or ``null``)."""
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ClassMetrics:
        """Inverse of :meth:`to_json`; a missing or unknown key raises TypeError."""
        curve = d.get("curve")
        return cls(**{**d, "curve": None if curve is None else FrocCurve(**curve)})


def plot_froc(
    results: Sequence[FrocResult], path: str | Path, title: str = "FROC"
) -> Path:
    """Write FROC curves (log FP/image axis, 1/8..8) of ``results`` to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    try:
        for r in results:
            if r.n_lesions == 0:
                continue
            x = np.maximum(r.fp_per_image, 1e-3)
            label = f"{r.name} (CPM {r.cpm:.3f}, n={r.n_lesions})"
            ax.step(x, r.sensitivity, where="post", label=label)
            ax.plot(list(r.sens_at), list(r.sens_at.values()), "o", ms=3, color="gray")
        ax.set_xscale("log", base=2)
        ax.set_xlim(1 / 16, 8)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("false positives per image")
        ax.set_ylabel("sensitivity")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if any(r.n_lesions for r in results):
            ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(out)
    finally:
        plt.close(fig)
    return out


def _in_key_order(
    images: Sequence[FrocImage], keys: Sequence[str], where: str, first: str
) -> list[FrocImage]:
    """``images`` in the order of ``keys`` (the image set of run ``first``).

    Raises:
        ValueError: another image set, or a key twice (``where`` named).
    """
    by_key = {im.key: im for im in images}
    if len(by_key) != len(images) or sorted(by_key) != sorted(keys):
        raise ValueError(
            f"{where}: scored other images than {first}, or a key twice: the "
            f"image sets differ ({len(images)} and {len(keys)} images, "
            f"{len(set(by_key) ^ set(keys))} keys in only one)"
        )
    return [by_key[k] for k in keys]


def _draw_runs(rng: np.random.Generator, n: int) -> np.ndarray:
    """One bootstrap draw of ``n`` runs with replacement (one run: itself)."""
    return rng.integers(0, n, size=n) if n > 1 else np.zeros(1, np.int64)


def pooled_paired_cpm_difference(
    a_runs: Sequence[Sequence[FrocImage]],
    b_runs: Sequence[Sequence[FrocImage]],
    label: int,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Mean over runs (seeds) of ``CPM(b_s) - CPM(a_s)``; runs and cases resampled.

    ``a_runs[s]`` and ``b_runs[s]`` are two detectors' outputs of run ``s`` on
    one image set (every run the same keys, any order). Each bootstrap
    resample draws the runs with replacement (a and b of one run stay a pair)
    and the cases (:attr:`FrocImage.case`, the women) with replacement (the
    same multiplicities for every run and both detectors), so the interval
    holds both the training noise and the test-set noise. With one run it is
    :func:`paired_cpm_difference`.
    Returns ``{"diff", "ci95", "cpm_a", "cpm_b", "runs_a", "runs_b"}``: means
    over runs and the per-run CPMs (NaN when the class has no lesion).

    Raises:
        ValueError: no runs, unequal run counts, or differing image sets.
    """
    if not a_runs or len(a_runs) != len(b_runs):
        raise ValueError(
            f"need the same number of runs, got {len(a_runs)} and {len(b_runs)}"
        )
    keys = [im.key for im in a_runs[0]]

    def ordered(images: Sequence[FrocImage], where: str) -> list[FrocImage]:
        return _in_key_order(images, keys, where, "run 0 (a)")

    a0 = ordered(a_runs[0], "run 0 (a)")  # the image order every run follows
    oa = [_collect(a0, label)] + [
        _collect(ordered(r, f"run {i} (a)"), label)
        for i, r in enumerate(a_runs[1:], start=1)
    ]
    ob = [_collect(ordered(r, f"run {i} (b)"), label) for i, r in enumerate(b_runs)]
    n = len(oa)
    cpm_a = [_cpm_from(o)[0] for o in oa]
    cpm_b = [_cpm_from(o)[0] for o in ob]
    diff = float(np.mean([b - a for a, b in zip(cpm_a, cpm_b, strict=True)]))
    run_rng = np.random.default_rng([seed, 1])

    def pooled(w: np.ndarray) -> float:
        draw = _draw_runs(run_rng, n)
        per = {i: _cpm_from(ob[i], w)[0] - _cpm_from(oa[i], w)[0] for i in set(draw)}
        return float(np.mean([per[i] for i in draw]))

    return {
        "diff": diff,
        "ci95": _percentile_bootstrap(case_index(a0), pooled, n_boot, seed, alpha),
        "cpm_a": float(np.mean(cpm_a)),
        "cpm_b": float(np.mean(cpm_b)),
        "runs_a": cpm_a,
        "runs_b": cpm_b,
    }


#: A gap (CPM ``high - low``) at or below this is no gap: means of CPMs that are
#: fractions of few lesions can cancel to a rounding residue (~1e-17), and a
#: ratio over it would be ~1e15.
GAP_EPS = 1e-9


def pooled_gap_closed(
    low_runs: Sequence[Sequence[FrocImage]],
    mid_runs: Sequence[Sequence[FrocImage]],
    high_runs: Sequence[Sequence[FrocImage]],
    label: int,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Share of the gap ``high - low`` that ``mid`` closes, on the same images.

    ``(mean CPM(mid) - mean CPM(low)) / (mean CPM(high) - mean CPM(low))``,
    means over runs (seeds): e.g. how much of the distance between a regime
    trained on its labeled women and the same regime with every woman
    labeled its semi-supervised version covers. The interval resamples runs
    (the three of one run stay together) and cases as
    :func:`pooled_paired_cpm_difference` does; a resample whose gap is not
    above :data:`GAP_EPS` has no ratio and is left out (counted in
    ``undefined``). Returns ``{"closed", "ci95", "cpm_low", "cpm_mid",
    "cpm_high", "undefined"}`` (``closed`` NaN when the gap is not above
    :data:`GAP_EPS`).

    Raises:
        ValueError: no runs, unequal run counts, or differing image sets.
    """
    if not low_runs or not len(low_runs) == len(mid_runs) == len(high_runs):
        raise ValueError(
            f"need the same number of runs, got {len(low_runs)}, "
            f"{len(mid_runs)} and {len(high_runs)}"
        )
    keys = [im.key for im in low_runs[0]]

    def outcomes(runs: Sequence[Sequence[FrocImage]], name: str) -> list[_Outcomes]:
        return [
            _collect(_in_key_order(r, keys, f"run {i} ({name})", "run 0 (low)"), label)
            for i, r in enumerate(runs)
        ]

    lo, mid, hi = (
        outcomes(low_runs, "low"),
        outcomes(mid_runs, "mid"),
        outcomes(high_runs, "high"),
    )
    n = len(lo)

    def ratio(w: np.ndarray | None, draw: Sequence[int]) -> float:
        c = {i: [_cpm_from(o[i], w)[0] for o in (lo, mid, hi)] for i in set(draw)}
        gap = float(np.mean([c[i][2] - c[i][0] for i in draw]))
        if not gap > GAP_EPS:  # a gap of 0 can come out as a rounding residue
            return math.nan
        return float(np.mean([c[i][1] - c[i][0] for i in draw])) / gap

    everything = list(range(n))
    closed = ratio(None, everything)
    run_rng = np.random.default_rng([seed, 2])
    undefined = 0

    def resampled(w: np.ndarray) -> float:
        nonlocal undefined
        v = ratio(w, [int(i) for i in _draw_runs(run_rng, n)])
        undefined += math.isnan(v)
        return v

    ci = _percentile_bootstrap(case_index(low_runs[0]), resampled, n_boot, seed, alpha)
    means = [float(np.mean([_cpm_from(x)[0] for x in o])) for o in (lo, mid, hi)]
    return {
        "closed": closed,
        "ci95": ci,
        "cpm_low": means[0],
        "cpm_mid": means[1],
        "cpm_high": means[2],
        "undefined": undefined,
    }
