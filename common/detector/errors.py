"""Looking at the errors: the operating point, missed lesions, top false positives.

Inputs are :class:`common.detector.froc.FrocImage` records: boxes ``[xmin, ymin,
xmax, ymax]`` in model-space pixels of their image, ``spacing_mm`` mm per such
pixel. Hits, duplicates, ignored detections and false positives follow the hit
rule of :mod:`common.detector.froc` (:func:`~common.detector.froc.match_image_lesions`),
so the figures here agree with the FROC.

* **Operating point** of class ``c`` at ``f`` FP/image: the threshold ``t`` is
  the score of the lowest curve point with ``FP/image <= f`` (the point whose
  sensitivity ``FrocResult.sens_at[f]`` reports); a detection fires when its
  score is ``>= t``. When no detection qualifies (no detections, or already
  the highest score gives more than ``f`` FP/image) ``t = inf``: nothing fires.
* A lesion is **found** at ``t`` when the detection that hits it in the full
  sweep scores ``>= t``; otherwise it is **missed**, and that detection's
  score (below ``t``), if any, is its ``score`` ("found lower"), else ``None``
  ("never found": no detection of the class reaches it).
* **False positives** are the detections whose outcome is ``FALSE_POSITIVE``
  (duplicates and detections in ignore regions are not errors), highest
  score first, whatever the threshold.
* **Size** of a lesion = the longer side of its box in mm; size bins per class
  are :data:`SIZE_EDGES_MM` (``lo <= size < hi``). Summed over the bins, the
  found lesions over all lesions equal the FROC sensitivity at ``f``.

* **Density** of a lesion or false positive = the breast density of its
  image (``ImageMeta.density`` from the site's ``density.csv``: BI-RADS
  ``a``-``d`` or MIAS ``F``/``G``/``D`` as given, no mapping between them), or
  :data:`UNKNOWN_DENSITY`. Per density value: images, lesions, found ones,
  and the false positives that fire at ``t``; summed over the groups they
  equal the class's totals at ``f``.

:func:`class_errors` gathers all of it for one class, :func:`write_error_outputs`
writes ``errors-<class>.png`` galleries (:func:`plot_error_gallery`) and
returns the JSON of :data:`BY_SIZE_KEY`, :data:`ERRORS_KEY` and, when some
scored image has a density, :data:`BY_DENSITY_KEY`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from common.detector.froc import (
    FALSE_POSITIVE,
    FrocImage,
    froc_class,
    match_image_lesions,
)
from common.imaging.image import DENSITY_VALUES, check_density
from common.keys import CALCIFICATION, CLASSES, MASS

log = logging.getLogger(__name__)

#: Key of ``metrics.json`` / ``cv_metrics.json``: sensitivity by lesion size.
BY_SIZE_KEY = "by_size"
#: Key of ``metrics.json`` / ``cv_metrics.json``: the gallery's cases per class.
ERRORS_KEY = "errors"
#: Key of ``metrics.json`` / ``cv_metrics.json``: sensitivity by breast density
#: (present only when some scored image has a density).
BY_DENSITY_KEY = "by_density"
#: Density group of images that have none.
UNKNOWN_DENSITY = "unknown"
#: FP/image of the operating point where misses and size bins are read.
OPERATING_FP_RATE = 1.0
#: Default number of missed lesions and of false positives shown per class.
GALLERY_N = 24
#: Inner edges (mm, longer side of the ground-truth box) of the size bins.
SIZE_EDGES_MM: dict[str, tuple[float, ...]] = {
    MASS: (5.0, 10.0, 20.0),
    CALCIFICATION: (5.0, 10.0, 20.0),
}
#: Kinds of :class:`ErrorCase`.
MISS = "miss"
FALSE_POSITIVE_CASE = "false-positive"

Box = tuple[float, float, float, float]
#: Image key -> breast density (``None`` or a missing key: unknown).
Densities = Mapping[str, str | None]


def gallery_name(class_name: str) -> str:
    """File name of a class's gallery: ``errors-<class>.png``."""
    return f"errors-{class_name}.png"


def _box(b: np.ndarray) -> Box:
    x0, y0, x1, y1 = (float(v) for v in b)
    return (x0, y0, x1, y1)


def longer_side_mm(box: Sequence[float], spacing_mm: float) -> float:
    """Longer side of ``box`` (model-space pixels) in mm."""
    return float(max(box[2] - box[0], box[3] - box[1]) * spacing_mm)


def _check_label(label: int) -> None:
    if not 0 <= label < len(CLASSES):
        raise ValueError(f"label must be in [0, {len(CLASSES)}), got {label!r}")


@dataclass(frozen=True)
class OperatingPoint:
    """Where class ``label`` is read: the threshold at ``fp_rate`` FP/image.

    Attributes:
        label: class index.
        fp_rate: the target FP/image.
        threshold: detections with score ``>= threshold`` fire (``inf``: none).
        fp_per_image: the FP/image actually reached there (``<= fp_rate``).
        sensitivity: found / lesions there (NaN without lesions or images).
    """

    label: int
    fp_rate: float
    threshold: float
    fp_per_image: float
    sensitivity: float


def operating_point(
    images: Sequence[FrocImage], label: int, fp_rate: float = OPERATING_FP_RATE
) -> OperatingPoint:
    """The operating point of class ``label`` (module docstring).

    No images gives ``threshold = inf`` and NaN sensitivity.

    Raises:
        ValueError: ``label`` is no class index, or ``fp_rate`` is not finite
            and >= 0.
    """
    _check_label(label)
    if not (math.isfinite(fp_rate) and fp_rate >= 0):
        raise ValueError(f"fp_rate must be finite and >= 0, got {fp_rate!r}")
    if not images:
        return OperatingPoint(label, fp_rate, math.inf, 0.0, math.nan)
    r = froc_class(images, label, n_boot=0)
    ok = np.nonzero(r.fp_per_image <= fp_rate + 1e-12)[0]
    i = int(ok[-1])  # the origin (index 0) always qualifies
    return OperatingPoint(
        label=label,
        fp_rate=fp_rate,
        threshold=float(r.thresholds[i]),
        fp_per_image=float(r.fp_per_image[i]),
        sensitivity=float(r.sensitivity[i]),
    )


@dataclass(frozen=True)
class LesionOutcome:
    """One ground-truth lesion at a threshold.

    Attributes:
        key: image key; ``index`` the lesion's row in ``FrocImage.gt_boxes``.
        label: class index.
        box: the lesion box, model-space pixels.
        spacing_mm: mm per pixel of the box's image.
        size_mm: longer side of ``box`` in mm.
        found: hit by a detection scoring ``>= threshold``.
        score: score of the detection that hits it in the full sweep, or
            ``None`` when no detection of the class ever does.
        det_box: that detection's box (model-space pixels), or ``None``.
    """

    key: str
    index: int
    label: int
    box: Box
    spacing_mm: float
    size_mm: float
    found: bool
    score: float | None
    det_box: Box | None


def lesion_outcomes(
    images: Sequence[FrocImage], label: int, threshold: float
) -> list[LesionOutcome]:
    """Every lesion of class ``label`` in ``images``, found or missed at ``threshold``.

    Order: images as given, lesions in ``gt_boxes`` order.
    """
    _check_label(label)
    out: list[LesionOutcome] = []
    for im in images:
        scores, _, hit_by = match_image_lesions(im, label)
        dets = im.det_boxes[im.det_labels == label]
        rows = np.nonzero(im.gt_labels == label)[0]
        for j, row in enumerate(rows):
            box = _box(im.gt_boxes[row])
            d = int(hit_by[j])
            score = float(scores[d]) if d >= 0 else None
            out.append(
                LesionOutcome(
                    key=im.key,
                    index=int(row),
                    label=label,
                    box=box,
                    spacing_mm=im.spacing_mm,
                    size_mm=longer_side_mm(box, im.spacing_mm),
                    found=score is not None and score >= threshold,
                    score=score,
                    det_box=_box(dets[d]) if d >= 0 else None,
                )
            )
    return out


@dataclass(frozen=True)
class ErrorCase:
    """One thumbnail of the gallery: a missed lesion or a false positive.

    Attributes:
        kind: :data:`MISS` or :data:`FALSE_POSITIVE_CASE`.
        key: image key.
        label: class index.
        box: the error's box (the lesion for a miss, the detection for a false
            positive), model-space pixels; the thumbnail is centred on it.
        score: the detection's score (for a miss: of the detection that hits
            it below the threshold, ``None`` when there is none).
        size_mm: longer side of ``box`` in mm.
        spacing_mm: mm per pixel of the image.
        gt_boxes: lesions to draw in the ground-truth colour (model space).
        det_boxes: detections to draw in the detection colour (model space).
    """

    kind: str
    key: str
    label: int
    box: Box
    score: float | None
    size_mm: float
    spacing_mm: float
    gt_boxes: tuple[Box, ...]
    det_boxes: tuple[Box, ...]

    @property
    def caption(self) -> str:
        """``"<class> miss|FP, score s|none, n.n mm"`` and the image key below.

        Keys longer than 16 characters are cut to 15 and an ellipsis.
        """
        what = "miss" if self.kind == MISS else "FP"
        score = "none" if self.score is None else f"{self.score:.2f}"
        key = self.key if len(self.key) <= 16 else f"{self.key[:15]}\u2026"
        return (
            f"{CLASSES[self.label]} {what}, score {score}, {self.size_mm:.1f} mm\n{key}"
        )

    def to_json(self) -> dict[str, Any]:
        """Where to look: kind, image key, box (model pixels), score, size."""
        return {
            "kind": self.kind,
            "key": self.key,
            "box": [round(v, 2) for v in self.box],
            "score": None if self.score is None else round(self.score, 5),
            "size_mm": round(self.size_mm, 2),
        }


def missed_lesions(
    outcomes: Sequence[LesionOutcome], n: int = GALLERY_N
) -> list[ErrorCase]:
    """The ``n`` largest missed lesions (ties: image key, lesion index).

    The largest misses come first: they are the most conspicuous. A miss
    shows its lesion and, when some detection hits it below the threshold,
    that detection.

    Raises:
        ValueError: ``n < 0``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    missed = sorted(
        (o for o in outcomes if not o.found),
        key=lambda o: (-o.size_mm, o.key, o.index),
    )
    return [
        ErrorCase(
            kind=MISS,
            key=o.key,
            label=o.label,
            box=o.box,
            score=o.score,
            size_mm=o.size_mm,
            spacing_mm=o.spacing_mm,
            gt_boxes=(o.box,),
            det_boxes=() if o.det_box is None else (o.det_box,),
        )
        for o in missed[:n]
    ]


def top_false_positives(
    images: Sequence[FrocImage], label: int, n: int = GALLERY_N
) -> list[ErrorCase]:
    """The ``n`` highest-scoring false positives of class ``label``.

    Ties: image order, then detection order. Each shows its detection and the
    image's lesions of the class.

    Raises:
        ValueError: ``n < 0`` or ``label`` is no class index.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return _false_positives(images, label)[:n]


def _false_positives(images: Sequence[FrocImage], label: int) -> list[ErrorCase]:
    """Every false positive of ``label``, in :func:`top_false_positives` order."""
    _check_label(label)
    found: list[tuple[float, int, int, ErrorCase]] = []
    for i, im in enumerate(images):
        scores, outcomes, _ = match_image_lesions(im, label)
        dets = im.det_boxes[im.det_labels == label]
        lesions = tuple(_box(b) for b in im.gt_boxes[im.gt_labels == label])
        for d in np.nonzero(outcomes == FALSE_POSITIVE)[0]:
            box = _box(dets[d])
            case = ErrorCase(
                kind=FALSE_POSITIVE_CASE,
                key=im.key,
                label=label,
                box=box,
                score=float(scores[d]),
                size_mm=longer_side_mm(box, im.spacing_mm),
                spacing_mm=im.spacing_mm,
                gt_boxes=lesions,
                det_boxes=(box,),
            )
            found.append((-float(scores[d]), i, int(d), case))
    found.sort(key=lambda t: t[:3])
    return [t[3] for t in found]


def size_bin_names(edges: Sequence[float]) -> list[str]:
    """Names of the bins of ``edges``: ``(5, 10)`` -> ``["<5", "5-10", ">=10"]``."""
    e = [f"{v:g}" for v in edges]
    if not e:
        return ["all"]
    return [f"<{e[0]}", *(f"{a}-{b}" for a, b in pairwise(e)), f">={e[-1]}"]


@dataclass(frozen=True)
class SizeBin:
    """Lesions of one size bin (``lo_mm <= size < hi_mm``) at the operating point.

    ``hi_mm`` is ``None`` for the last bin; ``sensitivity`` is
    ``n_found / n_lesions``, ``None`` when the bin is empty.
    """

    name: str
    lo_mm: float
    hi_mm: float | None
    n_lesions: int
    n_found: int
    sensitivity: float | None


def size_table(
    outcomes: Sequence[LesionOutcome], edges: Sequence[float]
) -> list[SizeBin]:
    """Found / all lesions per size bin (``edges`` in mm, increasing, > 0).

    Raises:
        ValueError: ``edges`` not strictly increasing, or not all finite > 0.
    """
    e = [float(v) for v in edges]
    if any(not (math.isfinite(v) and v > 0) for v in e) or any(
        b <= a for a, b in pairwise(e)
    ):
        raise ValueError(
            f"size edges must be finite, > 0 and strictly increasing, got {list(edges)}"
        )
    lows = [0.0, *e]
    highs: list[float | None] = [*e, None]
    n = np.zeros(len(lows), np.int64)
    hit = np.zeros(len(lows), np.int64)
    for o in outcomes:
        b = int(np.searchsorted(e, o.size_mm, side="right"))
        n[b] += 1
        hit[b] += int(o.found)
    return [
        SizeBin(
            name=name,
            lo_mm=lo,
            hi_mm=hi,
            n_lesions=int(n[b]),
            n_found=int(hit[b]),
            sensitivity=float(hit[b] / n[b]) if n[b] else None,
        )
        for b, (name, lo, hi) in enumerate(
            zip(size_bin_names(e), lows, highs, strict=True)
        )
    ]


def _num(v: float) -> float | None:
    return None if not math.isfinite(v) else float(v)


@dataclass(frozen=True)
class SizeTable:
    """The JSON record of one class under :data:`BY_SIZE_KEY`.

    ``threshold`` is ``None`` when nothing fires (``inf``), ``sensitivity``
    ``None`` without lesions.
    """

    fp_rate: float
    threshold: float | None
    fp_per_image: float
    sensitivity: float | None
    n_images: int
    n_lesions: int
    n_found: int
    bins: list[SizeBin]

    def to_json(self) -> dict[str, Any]:
        """JSON-safe mapping (bins as mappings)."""
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SizeTable:
        """Inverse of :meth:`to_json`; a missing or unknown key raises TypeError."""
        return cls(**{**d, "bins": [SizeBin(**b) for b in d["bins"]]})


@dataclass(frozen=True)
class DensityGroup:
    """The images of one breast density at the operating point.

    Attributes:
        density: a value of :data:`common.imaging.image.DENSITY_VALUES`, or
            :data:`UNKNOWN_DENSITY`.
        n_images: scored images of that density.
        n_lesions, n_found: their lesions of the class, and those found.
        sensitivity: ``n_found / n_lesions``; ``None`` without lesions.
        n_false_positives: their false positives that fire (score ``>= t``).
        fp_per_image: ``n_false_positives / n_images``.
    """

    density: str
    n_images: int
    n_lesions: int
    n_found: int
    sensitivity: float | None
    n_false_positives: int
    fp_per_image: float


def _density_order(value: str) -> int:
    return (
        DENSITY_VALUES.index(value) if value in DENSITY_VALUES else len(DENSITY_VALUES)
    )


def density_groups(
    images: Sequence[FrocImage],
    lesions: Sequence[LesionOutcome],
    false_positives: Sequence[ErrorCase],
    threshold: float,
    densities: Densities,
) -> list[DensityGroup]:
    """Images, lesions found / all and firing false positives per breast density.

    ``lesions`` are the class's outcomes at ``threshold`` (:func:`lesion_outcomes`)
    and ``false_positives`` all its false positives (any score); both name
    their image by key. Groups: every density of ``images`` in
    :data:`~common.imaging.image.DENSITY_VALUES` order, then
    :data:`UNKNOWN_DENSITY` when some image has none.

    Raises:
        ValueError: a density in ``densities`` that is not one of
            :data:`~common.imaging.image.DENSITY_VALUES` (quoted with its key).
    """
    dens: dict[str, str] = {}
    for im in images:
        value = densities.get(im.key)
        try:
            check_density(value)
        except ValueError as exc:
            raise ValueError(f"image {im.key!r}: {exc}") from None
        dens[im.key] = UNKNOWN_DENSITY if value is None else value

    def of(key: str, what: str) -> str:
        if key not in dens:
            raise ValueError(f"{what} of image {key!r}, which is not among the images")
        return dens[key]

    n_img = Counter(dens[im.key] for im in images)
    n_les = Counter(of(o.key, "a lesion") for o in lesions)
    n_hit = Counter(of(o.key, "a lesion") for o in lesions if o.found)
    n_fp = Counter(
        of(c.key, "a false positive")
        for c in false_positives
        if c.score is not None and c.score >= threshold
    )
    return [
        DensityGroup(
            density=d,
            n_images=n_img[d],
            n_lesions=n_les[d],
            n_found=n_hit[d],
            sensitivity=n_hit[d] / n_les[d] if n_les[d] else None,
            n_false_positives=n_fp[d],
            fp_per_image=n_fp[d] / n_img[d],
        )
        for d in sorted(n_img, key=_density_order)
    ]


@dataclass(frozen=True)
class DensityTable:
    """The JSON record of one class under :data:`BY_DENSITY_KEY`.

    ``threshold`` is ``None`` when nothing fires (``inf``); ``groups`` as
    :func:`density_groups` orders them.
    """

    fp_rate: float
    threshold: float | None
    groups: list[DensityGroup]

    def to_json(self) -> dict[str, Any]:
        """JSON-safe mapping (groups as mappings)."""
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DensityTable:
        """Inverse of :meth:`to_json`; a missing or unknown key raises TypeError."""
        return cls(**{**d, "groups": [DensityGroup(**g) for g in d["groups"]]})


@dataclass(frozen=True)
class ClassErrors:
    """Everything :func:`class_errors` found for one class.

    ``densities`` is ``None`` when no density was asked for.
    """

    label: int
    n_images: int
    point: OperatingPoint
    lesions: list[LesionOutcome]
    bins: list[SizeBin]
    missed: list[ErrorCase]
    false_positives: list[ErrorCase]
    n_false_positives: int
    densities: list[DensityGroup] | None = None

    @property
    def name(self) -> str:
        """The class name."""
        return CLASSES[self.label]

    @property
    def n_missed(self) -> int:
        """All missed lesions (the gallery may show fewer)."""
        return sum(not o.found for o in self.lesions)

    def size_record(self) -> SizeTable:
        """The :data:`BY_SIZE_KEY` record of this class."""
        return SizeTable(
            fp_rate=self.point.fp_rate,
            threshold=_num(self.point.threshold),
            fp_per_image=self.point.fp_per_image,
            sensitivity=_num(self.point.sensitivity),
            n_images=self.n_images,
            n_lesions=len(self.lesions),
            n_found=sum(o.found for o in self.lesions),
            bins=self.bins,
        )

    def density_record(self) -> DensityTable | None:
        """The :data:`BY_DENSITY_KEY` record of this class (``None``: not asked)."""
        if self.densities is None:
            return None
        return DensityTable(
            fp_rate=self.point.fp_rate,
            threshold=_num(self.point.threshold),
            groups=self.densities,
        )

    def errors_json(self, gallery: str | None) -> dict[str, Any]:
        """The :data:`ERRORS_KEY` record: gallery file and the cases it shows."""
        return {
            "gallery": gallery,
            "n_missed": self.n_missed,
            "n_false_positives": self.n_false_positives,
            "missed": [c.to_json() for c in self.missed],
            "false_positives": [c.to_json() for c in self.false_positives],
        }

    def empty_reason(self) -> str | None:
        """Why the gallery has nothing to show, or ``None`` when it has."""
        if self.missed or self.false_positives:
            return None
        if self.n_images == 0:
            return "no images were scored"
        if self.n_missed or self.n_false_positives:
            return "the gallery sizes are 0"
        if not self.lesions:
            return f"no {self.name} lesion and no {self.name} false positive"
        return (
            f"every {self.name} lesion found at {self.point.fp_rate:g} FP/image "
            "and no false positive"
        )


def class_errors(
    images: Sequence[FrocImage],
    label: int,
    *,
    fp_rate: float = OPERATING_FP_RATE,
    n_missed: int = GALLERY_N,
    n_fp: int = GALLERY_N,
    edges: Sequence[float] | None = None,
    densities: Densities | None = None,
) -> ClassErrors:
    """Operating point, lesion outcomes, size bins and gallery cases of ``label``.

    ``edges`` defaults to :data:`SIZE_EDGES_MM` of the class. With
    ``densities`` (image key -> density) the groups of :func:`density_groups`
    are filled in too.
    """
    _check_label(label)
    if n_fp < 0:
        raise ValueError(f"n_fp must be >= 0, got {n_fp}")
    point = operating_point(images, label, fp_rate)
    lesions = lesion_outcomes(images, label, point.threshold)
    fps = _false_positives(images, label)
    return ClassErrors(
        label=label,
        n_images=len(images),
        point=point,
        lesions=lesions,
        bins=size_table(
            lesions, SIZE_EDGES_MM[CLASSES[label]] if edges is None else edges
        ),
        missed=missed_lesions(lesions, n_missed),
        false_positives=fps[:n_fp],
        n_false_positives=len(fps),
        densities=(
            None
            if densities is None
            else density_groups(images, lesions, fps, point.threshold, densities)
        ),
    )


# --- the gallery -------------------------------------------------------------
#: Ground truth and detection colours of the gallery.
GT_COLOUR = "#2ca02c"
DET_COLOUR = "#ff7f0e"
#: A thumbnail shows at least this many mm around the box's centre, each side.
MIN_HALF_CROP_MM = 8.0
#: Boxes narrower than this (pixels) also get a cross at their centre.
MARK_BELOW_PX = 4.0
GALLERY_COLUMNS = 6

PixelLoader = Callable[[str], np.ndarray]


def crop_window(
    box: Sequence[float], shape: tuple[int, int], spacing_mm: float
) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` integer pixels of a thumbnail around ``box``.

    A square centred on the box, half side ``max(box's longer side,
    MIN_HALF_CROP_MM)``, clipped to the image of ``shape`` ``(H, W)``.
    """
    h, w = shape
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    half = max(box[2] - box[0], box[3] - box[1], MIN_HALF_CROP_MM / spacing_mm)
    x0, x1 = max(0, math.floor(cx - half)), min(w, math.ceil(cx + half))
    y0, y1 = max(0, math.floor(cy - half)), min(h, math.ceil(cy + half))
    return (x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))


def _draw_case(ax: Any, case: ErrorCase, pixels: np.ndarray | None) -> None:
    from matplotlib.patches import Rectangle

    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(case.caption, fontsize=6)
    if pixels is None:
        ax.text(0.5, 0.5, "image\nunavailable", ha="center", va="center", fontsize=7)
        return
    x0, y0, x1, y1 = crop_window(case.box, pixels.shape[:2], case.spacing_mm)
    crop = pixels[y0:y1, x0:x1]
    lo, hi = (float(v) for v in np.percentile(crop, [1, 99]))
    ax.imshow(
        crop,
        cmap="gray",
        vmin=lo,
        vmax=hi if hi > lo else lo + 1e-6,
        extent=(x0, x1, y1, y0),
        interpolation="nearest",
    )
    for boxes, colour, style in (
        (case.gt_boxes, GT_COLOUR, "-"),
        (case.det_boxes, DET_COLOUR, "--" if case.kind == MISS else "-"),
    ):
        for b in boxes:
            ax.add_patch(
                Rectangle(
                    (b[0], b[1]),
                    b[2] - b[0],
                    b[3] - b[1],
                    fill=False,
                    edgecolor=colour,
                    linewidth=1.2,
                    linestyle=style,
                )
            )
            if min(b[2] - b[0], b[3] - b[1]) < MARK_BELOW_PX:  # too small to see
                cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
                ax.plot([cx], [cy], marker="+", color=colour, markersize=8)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)


def plot_error_gallery(
    errors: ClassErrors,
    load_pixels: PixelLoader,
    path: str | Path,
    title: str = "errors",
) -> Path:
    """Write the gallery of ``errors`` to a PNG at ``path``.

    Two sections: the missed lesions at the operating point and the top false
    positives, each thumbnail a crop of the model-space image
    (``load_pixels(key)`` -> float[H, W]) with the lesion(s) in
    :data:`GT_COLOUR` and the detection in :data:`DET_COLOUR` (dashed for the
    below-threshold detection of a miss). An image that cannot be loaded
    gives a thumbnail saying so (logged). Nothing to show gives a PNG holding
    :meth:`ClassErrors.empty_reason`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    cache: dict[str, np.ndarray | None] = {}

    def pixels(key: str) -> np.ndarray | None:
        if key not in cache:
            try:
                cache[key] = np.asarray(load_pixels(key), dtype=np.float32)
            except (OSError, KeyError, ValueError) as exc:
                log.warning("error gallery: image %s not loaded: %s", key, exc)
                cache[key] = None
        return cache[key]

    p = errors.point
    thr = "none fires" if math.isinf(p.threshold) else f"score >= {p.threshold:.3f}"
    head = (
        f"{title}: {errors.name}, {errors.n_missed} of {len(errors.lesions)} "
        f"lesions missed at {p.fp_rate:g} FP/image ({thr})"
    )
    cols = GALLERY_COLUMNS
    sections = [
        (
            f"missed lesions: the largest {len(errors.missed)} of {errors.n_missed}"
            if errors.missed
            else f"missed lesions: none shown ({errors.n_missed} missed)",
            errors.missed,
        ),
        (
            f"false positives: the top {len(errors.false_positives)} of "
            f"{errors.n_false_positives} by score"
            if errors.false_positives
            else f"false positives: none shown ({errors.n_false_positives} in all)",
            errors.false_positives,
        ),
    ]
    rows = [math.ceil(len(cases) / cols) or 0.3 for _, cases in sections]
    reason = errors.empty_reason()
    if reason is not None:
        fig = plt.figure(figsize=(8, 1.5), dpi=100)
        try:
            fig.text(0.5, 0.65, head, ha="center", fontsize=9)
            fig.text(0.5, 0.3, f"nothing to show: {reason}", ha="center", fontsize=9)
            fig.savefig(out)
        finally:
            plt.close(fig)
        return out
    fig = plt.figure(figsize=(1.7 * cols, 1.9 * sum(rows) + 0.4), dpi=100)
    try:
        grid: Any = fig.subfigures(3, 1, height_ratios=[0.2, *rows], squeeze=False)
        header, *subs = grid[:, 0]
        header.text(0.5, 0.5, head, ha="center", va="center", fontsize=9)
        for sub, (name, cases) in zip(subs, sections, strict=True):
            if not cases:
                sub.text(0.5, 0.5, name, ha="center", va="center", fontsize=8)
                continue
            sub.suptitle(name, fontsize=8)
            axes = np.atleast_1d(
                sub.subplots(math.ceil(len(cases) / cols), cols, squeeze=False)
            ).ravel()
            for ax, case in zip(axes, cases, strict=False):
                _draw_case(ax, case, pixels(case.key))
            for ax in axes[len(cases) :]:
                ax.set_axis_off()
        fig.savefig(out)
    finally:
        plt.close(fig)
    return out


def log_size_table(errors: ClassErrors) -> None:
    """One INFO line: sensitivity per size bin at the operating point."""
    cells = ", ".join(
        f"{b.name} mm {b.n_found}/{b.n_lesions}" for b in errors.bins if b.n_lesions
    )
    p = errors.point
    log.info(
        "%s at %g FP/image: %d/%d lesions found by size (%s); %d missed",
        errors.name, p.fp_rate, len(errors.lesions) - errors.n_missed,
        len(errors.lesions), cells or "no lesions", errors.n_missed,
    )  # fmt: skip


def log_density_table(errors: ClassErrors) -> None:
    """One INFO line: sensitivity per breast density at the operating point."""
    if errors.densities is None:
        return
    cells = ", ".join(
        f"{g.density} {g.n_found}/{g.n_lesions} ({g.n_images} images, "
        f"{g.fp_per_image:.2f} FP/image)"
        for g in errors.densities
    )
    log.info(
        "%s at %g FP/image by density: %s",
        errors.name, errors.point.fp_rate, cells or "no images",
    )  # fmt: skip


def write_error_outputs(
    images: Sequence[FrocImage],
    out_dir: str | Path,
    load_pixels: PixelLoader,
    *,
    title: str = "errors",
    fp_rate: float = OPERATING_FP_RATE,
    n_missed: int = GALLERY_N,
    n_fp: int = GALLERY_N,
    densities: Densities | None = None,
) -> dict[str, Any]:
    """Galleries ``out_dir/errors-<class>.png`` and the JSON of the error keys.

    Returns ``{BY_SIZE_KEY: {class: SizeTable JSON}, ERRORS_KEY: {class:
    gallery cases}}``, plus ``BY_DENSITY_KEY: {class: DensityTable JSON}``
    when ``densities`` (image key -> breast density) gives some scored image
    a density; without one the key is absent. A class with nothing to show
    still gets its PNG (a note saying why, also logged); no images at all, or
    ``n_missed = n_fp = 0``, writes no PNG and logs why.
    """
    out = Path(out_dir)
    if densities is not None and not any(densities.get(im.key) for im in images):
        densities = None  # no scored image has one: no table
    by_size: dict[str, Any] = {}
    by_density: dict[str, Any] = {}
    cases: dict[str, Any] = {}
    for label, name in enumerate(CLASSES):
        ce = class_errors(
            images, label, fp_rate=fp_rate, n_missed=n_missed, n_fp=n_fp,
            densities=densities,
        )  # fmt: skip
        by_size[name] = ce.size_record().to_json()
        log_size_table(ce)
        record = ce.density_record()
        if record is not None:
            by_density[name] = record.to_json()
            log_density_table(ce)
        gallery: str | None = None
        if not images:
            log.info("%s: no error gallery: no images were scored", name)
        elif n_missed == 0 and n_fp == 0:
            log.info("%s: no error gallery: its sizes are 0", name)
        else:
            reason = ce.empty_reason()
            if reason is not None:
                log.info("%s: error gallery empty: %s", name, reason)
            plot_error_gallery(ce, load_pixels, out / gallery_name(name), title)
            gallery = gallery_name(name)
        cases[name] = ce.errors_json(gallery)
    doc: dict[str, Any] = {BY_SIZE_KEY: by_size, ERRORS_KEY: cases}
    if densities is not None:
        doc[BY_DENSITY_KEY] = by_density
    return doc
