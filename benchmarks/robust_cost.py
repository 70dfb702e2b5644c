"""What robust aggregation costs in CPM when nobody attacks (issue 16).

Runs of ``fedavg`` and of a robust aggregator (``fedmedian``,
``fedtrimmedavg``) over the same seeds, all scored on the same test images
(``mammofed-sim run --seed S`` with one ``--data`` folder: the sites' split is
the cache's). Per site, class and aggregator: the mean CPM of each over the
seeds and the mean paired difference ``robust - fedavg``, with a percentile
bootstrap interval that resamples BOTH seeds and images: each resample draws
the seeds with replacement (fedavg and robust of one seed stay a pair) and the
test images with replacement (the same multiplicities for every seed and both
aggregators, as :func:`common.detector.froc.paired_cpm_difference` does for one pair).
With one seed the interval is exactly that of ``paired_cpm_difference``.

Usage::

    python -m benchmarks.robust_cost \\
        --run fedavg=out/robust-cost/seed0-fedavg/fedavg \\
        --run fedmedian=out/robust-cost/seed0-fedmedian/fedmedian ... \\
        --seeds 0,1,2   # (optional) the seed of each --run of one aggregator, in order

Runs of one aggregator pair with the other aggregator's runs in the order
given (the i-th fedavg run with the i-th robust run: give them seed by seed).
One JSON line per site x class x robust aggregator in
``benchmarks/results/robust_cost.jsonl``: ``<robust>-minus-fedavg-cpm-<class>``.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import emit, rounded
from benchmarks.seed_spread import parse_run
from common.detector.froc import (
    FrocImage,
    _collect,
    _cpm_from,
    _percentile_bootstrap,
)
from common.keys import CLASSES
from common.wire import runfolder as RF
from simulation.report import load_detections

BENCH = "robust_cost"
BASELINE = "fedavg"


def _ordered(images: Sequence[FrocImage], keys: list[str], where: str) -> list:
    by_key = {im.key: im for im in images}
    if len(by_key) != len(images) or sorted(by_key) != sorted(keys):
        raise ValueError(f"{where}: scored other test images than the first run")
    return [by_key[k] for k in keys]


def pooled_paired_difference(
    base: Sequence[Sequence[FrocImage]],
    other: Sequence[Sequence[FrocImage]],
    label: int,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Mean over seeds of ``CPM(other_s) - CPM(base_s)``; seeds and images resampled.

    ``base[s]`` and ``other[s]`` are the two aggregators' detections of seed
    ``s`` on one image set (every seed the same keys, any order). Returns
    ``{"diff", "ci95", "cpm_base", "cpm_other", "runs_base", "runs_other"}``:
    means over seeds and the per-seed CPMs (NaN when the class has no lesion).

    Raises:
        ValueError: no seeds, unequal seed counts, or differing image sets.
    """
    if not base or len(base) != len(other):
        raise ValueError(f"need the same number of runs, got {len(base)}, {len(other)}")
    keys = [im.key for im in base[0]]  # the first run's order, as paired_cpm_difference
    if len(set(keys)) != len(keys):
        raise ValueError("pooled_paired_difference: repeated image keys")
    oa = [
        _collect(_ordered(r, keys, f"base run {i}"), label) for i, r in enumerate(base)
    ]
    ob = [
        _collect(_ordered(r, keys, f"other run {i}"), label)
        for i, r in enumerate(other)
    ]
    s = len(oa)
    cpm_a = [_cpm_from(o)[0] for o in oa]
    cpm_b = [_cpm_from(o)[0] for o in ob]
    diff = statistics.fmean(b - a for a, b in zip(cpm_a, cpm_b, strict=True))
    seed_rng = np.random.default_rng([seed, 1])

    def pooled(w: np.ndarray) -> float:
        # the seed draw of this resample; the image weights w come from the helper
        draw = seed_rng.integers(0, s, size=s) if s > 1 else np.zeros(1, np.int64)
        per = {i: _cpm_from(ob[i], w)[0] - _cpm_from(oa[i], w)[0] for i in set(draw)}
        return float(np.mean([per[i] for i in draw]))

    ci = _percentile_bootstrap(len(keys), pooled, n_boot, seed, alpha)
    return {
        "diff": diff,
        "ci95": ci,
        "cpm_base": statistics.fmean(cpm_a),
        "cpm_other": statistics.fmean(cpm_b),
        "runs_base": cpm_a,
        "runs_other": cpm_b,
    }


def compare(
    runs: list[tuple[str, Path]], *, n_boot: int = 1000, seed: int = 0
) -> list[dict[str, Any]]:
    """Per robust aggregator, site and class: the pooled paired difference.

    ``runs``: ``(aggregator, regime folder)``; the ``fedavg`` runs are the
    baseline, paired in order with each other aggregator's runs.

    Raises:
        ValueError: no fedavg run, unequal run counts, or differing image sets.
    """
    by_agg: dict[str, list[Path]] = {}
    for agg, folder in runs:
        by_agg.setdefault(agg, []).append(folder)
    if BASELINE not in by_agg or len(by_agg) < 2:
        raise ValueError(f"need {BASELINE} runs and at least one other aggregator")
    loaded = {
        agg: [load_detections(f / RF.DETECTIONS_JSON) for f in folders]
        for agg, folders in by_agg.items()
    }
    base = loaded[BASELINE]
    rows = []
    for agg, other in loaded.items():
        if agg == BASELINE:
            continue
        if len(other) != len(base):
            raise ValueError(
                f"{agg}: {len(other)} runs against {len(base)} {BASELINE} runs"
            )
        sites = sorted(set.intersection(*(set(d) for d in base + other)))
        for site in sites:
            for label, cls in enumerate(CLASSES):
                r = pooled_paired_difference(
                    [d[site] for d in base],
                    [d[site] for d in other],
                    label,
                    n_boot=n_boot,
                    seed=seed,
                )
                lo, hi = r["ci95"]
                rows.append(
                    {
                        "aggregator": agg,
                        "site": site,
                        "class": cls,
                        "diff": r["diff"],
                        "cpm_fedavg": rounded(r["cpm_base"]),
                        "cpm_robust": rounded(r["cpm_other"]),
                        "runs_fedavg": [rounded(x) for x in r["runs_base"]],
                        "runs_robust": [rounded(x) for x in r["runs_other"]],
                        "paired_ci95": [rounded(lo), rounded(hi)],
                        "excludes_zero": bool(lo > 0 or hi < 0)
                        if not (math.isnan(lo) or math.isnan(hi))
                        else None,
                        "n_seeds": len(base),
                        "n_images": len(base[0][site]),
                        "n_lesions": int(
                            sum(
                                int((im.gt_labels == label).sum())
                                for im in base[0][site]
                            )
                        ),
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Emit the pooled paired differences of the given runs."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--run",
        type=parse_run,
        action="append",
        required=True,
        help="AGGREGATOR=REGIME_FOLDER (repeatable; seed by seed, in one order)",
    )
    p.add_argument("--seeds", default="", help="the seeds, for the record (0,1,2)")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--results", type=Path, default=None)
    args = p.parse_args(argv)
    for row in compare(args.run, n_boot=args.n_boot):
        emit(
            BENCH,
            f"{row['aggregator']}-minus-fedavg-cpm-{row['class']}",
            row.pop("diff"),
            "cpm",
            results_dir=args.results,
            **row,
            seeds=args.seeds,
            runs=[f"{a}={f}" for a, f in args.run],
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
