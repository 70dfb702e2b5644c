"""What limits a detector: the most a re-scoring of its own marks could reach.

A detector misses a lesion in one of two ways: no mark reaches it (candidate
generation), or the mark that reaches it scores below too many false ones
(ranking). :func:`oracle_ranked` keeps every mark where it is and ranks each
mark that hits a lesion above every other mark of the class, so its FROC is
the ceiling of any second stage that re-scores these marks (a false-positive
reducer, a calibration, an ensemble's vote): if the ceiling is near the goal,
the marks hold the lesions and the scores are the problem; if it is far below,
no re-scoring can get there. :func:`lesion_reach` says, per lesion, at which
FP/image the detector finds it (``None``: never) and, given each image's
calcification specks (:mod:`common.imaging.specks`), what specks lie within
its hit radius.

Figures (one JSON line per run and class, ``froc_ceiling.jsonl``):
``<class>-cpm-ceiling`` with the CPM and sensitivity at 1 FP/image as scored
and at the ceiling, how many lesions some mark reaches and the class's
marks per image (a detector that leaves a hundred marks on every image
reaches many lesions by chance: read the reach and the ceiling with it),
and the ceiling with each image's 20 best marks only.

Usage (the stop-44 baseline's three kept seeds)::

    R=benchmarks/results
    python -m benchmarks.froc_ceiling \\
        --oof $R/mias_04_pretrain/oof_predictions-base-seed{0,1,2}.json.gz \\
        --results $R/mias_04_ensemble

``benchmarks.speck_clusters`` reports the same for its speck clusters.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import emit, rounded
from benchmarks.ensemble import load_oof
from common.detector.froc import (
    FALSE_POSITIVE,
    HIT,
    MIN_HIT_RADIUS_MM,
    FrocImage,
    froc_class,
    match_image_lesions,
)
from common.keys import CLASSES

BENCH = "froc_ceiling"


def oracle_ranked(images: Sequence[FrocImage], label: int) -> list[FrocImage]:
    """``images`` with every hit of ``label`` ranked above every other detection.

    A detection of the class that hits a lesion (:func:`match_image_lesions`)
    scores ``1 + score``, every other one keeps its score (in ``[0, 1]``), so
    the same marks give the best FROC any re-scoring of them could: the
    ceiling of a second stage over these candidates.
    """
    from dataclasses import replace

    out = []
    for im in images:
        scores, outcomes, _ = match_image_lesions(im, label)
        new = np.asarray(im.det_scores, dtype=np.float64).copy()
        idx = np.flatnonzero(im.det_labels == label)
        new[idx] = np.where(outcomes == HIT, 1.0 + scores, scores)
        out.append(replace(im, det_scores=new))
    return out


def lesion_reach(
    images: Sequence[FrocImage], specks: dict[str, np.ndarray], label: int
) -> list[dict[str, Any]]:
    """Per lesion of ``label``: where the finder finds it and what specks it holds.

    ``fp_per_image``: the false positives per image scoring at least the
    mark that hits it (the curve's point where it is found), ``None`` when
    no mark does; ``specks`` / ``max_z``: the specks within the FROC hit
    radius of its centre (``max(half its diagonal, MIN_HIT_RADIUS_MM)``);
    ``rank_in_image``: how many of the image's specks are brighter than the
    brightest of those (0: it is the image's brightest), ``None`` without one.
    """
    fps: list[float] = []
    found: list[tuple[FrocImage, int, float | None]] = []
    for im in images:
        scores, outcomes, hit_by = match_image_lesions(im, label)
        fps += [float(x) for x in scores[outcomes == FALSE_POSITIVE]]
        for j, h in enumerate(hit_by):
            found.append((im, j, float(scores[h]) if h >= 0 else None))
    fp = np.asarray(fps)
    rows = []
    for im, j, score in found:
        b = im.gt_boxes[im.gt_labels == label][j]
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        half = 0.5 * float(np.hypot(b[2] - b[0], b[3] - b[1])) * im.spacing_mm
        reach_px = max(half, MIN_HIT_RADIUS_MM) / im.spacing_mm
        s = specks.get(im.key, np.zeros((0, 3), np.float32))
        inside = s[np.hypot(s[:, 0] - cx, s[:, 1] - cy) <= reach_px]
        rows.append(
            {
                "key": im.key,
                "case": im.case,
                "fp_per_image": None
                if score is None
                else rounded(float((fp >= score).sum()) / len(images)),
                "specks": int(len(inside)),
                "max_z": rounded(float(inside[:, 2].max())) if len(inside) else None,
                "rank_in_image": int((s[:, 2] > inside[:, 2].max()).sum())
                if len(inside)
                else None,
            }
        )
    return rows


#: The ceiling is also given with each image's best marks only, as many as
#: :data:`common.imaging.specks.MAX_CLUSTERS` (the speck finder's cap), so
#: detectors that leave different numbers of marks compare.
TOP_MARKS = 20


def top_marks(images: Sequence[FrocImage], label: int, n: int) -> list[FrocImage]:
    """``images`` keeping only the ``n`` best-scoring marks of ``label`` each."""
    from dataclasses import replace

    out = []
    for im in images:
        idx = np.flatnonzero(im.det_labels == label)
        drop = idx[np.argsort(-im.det_scores[idx], kind="stable")[n:]]
        keep = np.setdiff1d(np.arange(len(im.det_labels)), drop)
        out.append(
            replace(
                im,
                det_boxes=im.det_boxes[keep],
                det_scores=im.det_scores[keep],
                det_labels=im.det_labels[keep],
            )
        )
    return out


def ceiling_row(images: Sequence[FrocImage], label: int) -> dict[str, Any]:
    """As scored and at the ceiling: CPM, sensitivity at 1 FP/image, reach."""
    now, best = (
        froc_class(images, label),
        froc_class(oracle_ranked(images, label), label),
    )
    rows = lesion_reach(images, {}, label)
    return {
        "cpm": rounded(now.cpm),
        "cpm_ceiling": rounded(best.cpm),
        "sens_at_1fp": rounded(now.sens_at[1.0]),
        "sens_at_1fp_ceiling": rounded(best.sens_at[1.0]),
        f"cpm_ceiling_top{TOP_MARKS}": rounded(
            froc_class(
                oracle_ranked(top_marks(images, label, TOP_MARKS), label), label
            ).cpm
        ),
        "n_lesions": len(rows),
        "reached_by_a_mark": sum(r["fp_per_image"] is not None for r in rows),
        "found_at_fp_per_image": sorted(
            r["fp_per_image"] for r in rows if r["fp_per_image"] is not None
        ),
        "n_images": now.n_images,
        # many marks reach many lesions by chance: read the reach with this
        "marks_per_image": rounded(
            sum(int(np.sum(im.det_labels == label)) for im in images)
            / max(1, len(images))
        ),
    }


def main(argv: list[str] | None = None) -> int:
    """Emit the ceiling of each run's marks, per class."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--oof", type=Path, nargs="+", required=True)
    p.add_argument("--results", type=Path, default=None)
    args = p.parse_args(argv)
    for f in args.oof:
        images = load_oof(f)
        for label, cls in enumerate(CLASSES):
            row = ceiling_row(images, label)
            if row["n_lesions"] == 0:
                continue
            emit(
                BENCH,
                f"{cls}-cpm-ceiling",
                row.pop("cpm_ceiling"),
                "cpm",
                results_dir=args.results,
                **row,
                oof=str(f),
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
