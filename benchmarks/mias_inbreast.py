"""Post hoc: drop the detections whose centre lies outside the breast.

The error galleries of the native patch recipe (``docs/detector.md``, "Hard
negatives") show film labels ("ML", "LM") among the top false positives: the
ingest crops an image to the breast's bounding box, and a label inside that
box is scored like tissue by a detector trained on breast patches. This
benchmark asks what a breast mask at inference would give, without training
anything: on a cross-validation run's out-of-fold detections, each image's
breast is the largest bright component of its cached model-space pixels
(Otsu threshold on a block-averaged copy, opened, holes filled, slightly
dilated: :func:`breast_mask`, the ingest's own rule in
``common.imaging.preprocess.find_breast`` kept as a mask), and detections
whose box centre falls outside it are dropped (:func:`inside_breast`).

Usage::

    python -m benchmarks.mias_inbreast --cache out/mini-mias/cache-native \\
        --oof out/mias-hn-seed{0,1}/oof_predictions.json --label hn

writes ``oof_predictions-inbreast.json`` beside each input (same records,
fewer detections) and, in ``--results``/compare_runs.jsonl, the paired
difference (filtered − as trained, several runs pooled as seeds) per class:
run ``benchmarks.compare_runs`` on the written files for other pairings.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from benchmarks.compare_runs import main as compare_runs_main
from benchmarks.mias_posthoc import read_cached
from common.imaging.preprocess import DETECT_MAX_SIDE, block_mean, otsu_threshold

#: Suffix of the filtered out-of-fold file written beside its input.
SUFFIX = "-inbreast"


def breast_mask(pixels: np.ndarray) -> tuple[np.ndarray, int]:
    """``(mask, factor)``: the breast on a ``factor``-times block-averaged grid.

    The largest component above Otsu's threshold, opened twice (so labels and
    film edges do not join it), holes filled and dilated by two cells. An
    image with no component keeps everything (an all-True mask).
    """
    h, w = pixels.shape
    factor = max(1, math.ceil(max(h, w) / DETECT_MAX_SIDE))
    small = block_mean(pixels.astype(np.float32, copy=False), factor)
    small = ndimage.uniform_filter(small, size=3, mode="nearest")
    lo, hi = float(small.min()), float(small.max())
    if hi - lo < 1e-6:
        return np.ones(small.shape, dtype=bool), factor
    norm = (small - lo) / (hi - lo)
    mask = ndimage.binary_opening(norm > otsu_threshold(norm), iterations=2)
    labels, n = ndimage.label(mask)
    if n == 0:
        return np.ones(small.shape, dtype=bool), factor
    biggest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    comp = ndimage.binary_fill_holes(labels == biggest)
    return ndimage.binary_dilation(comp, iterations=2), factor


def inside_breast(boxes: np.ndarray, mask: np.ndarray, factor: int) -> np.ndarray:
    """bool[K]: whether each box's centre (model pixels) lies in ``mask``."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=bool)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    cx = np.clip(((b[:, 0] + b[:, 2]) / 2 / factor).astype(int), 0, mask.shape[1] - 1)
    cy = np.clip(((b[:, 1] + b[:, 3]) / 2 / factor).astype(int), 0, mask.shape[0] - 1)
    return mask[cy, cx]


def filter_oof(path: Path, cache: Path) -> Path:
    """Write ``<path stem>-inbreast.json``: ``path``'s records, in-breast detections."""
    rows = json.loads(path.read_text())
    for r in rows:
        mask, factor = breast_mask(read_cached(cache, r["key"]).pixels)
        keep = inside_breast(np.asarray(r["det_boxes"]), mask, factor)
        for k in ("det_boxes", "det_scores", "det_labels"):
            r[k] = [v for v, ok in zip(r[k], keep, strict=True) if ok]
    out = path.with_name(path.stem + SUFFIX + path.suffix)
    out.write_text(json.dumps(rows))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: filter each ``--oof`` file and compare it with the detector as trained."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, required=True, help="the runs' site cache")
    ap.add_argument("--oof", type=Path, nargs="+", required=True)
    ap.add_argument("--label", default="inbreast")
    ap.add_argument("--results", type=Path, default=None)
    args = ap.parse_args(argv)
    filtered = [filter_oof(p, args.cache) for p in args.oof]
    results = [] if args.results is None else ["--results", str(args.results)]
    return compare_runs_main(
        ["--a", *map(str, args.oof), "--b", *map(str, filtered),
         "--label", f"mias-inbreast-{args.label}", *results]
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
