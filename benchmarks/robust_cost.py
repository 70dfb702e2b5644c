"""What robust aggregation costs in CPM when nobody attacks (issue 16).

Runs of ``fedavg`` and of a robust aggregator (``fedmedian``,
``fedtrimmedavg``) over the same seeds, all scored on the same test images
(``mammofed-sim run --seed S`` with one ``--data`` folder: the sites' split is
the cache's). Per site, class and aggregator: the mean CPM of each over the
seeds and the mean paired difference ``robust - fedavg``, with a percentile
bootstrap interval that resamples BOTH seeds and images: each resample draws
the seeds with replacement (fedavg and robust of one seed stay a pair) and the
test images with replacement (the same multiplicities for every seed and both
aggregators): :func:`common.detector.froc.pooled_paired_cpm_difference`.

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
from pathlib import Path
from typing import Any

from benchmarks.common import emit, rounded
from benchmarks.seed_spread import parse_run
from common.detector.froc import pooled_paired_cpm_difference
from common.keys import CLASSES
from common.wire import runfolder as RF
from simulation.report import load_detections

BENCH = "robust_cost"
BASELINE = "fedavg"


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
                r = pooled_paired_cpm_difference(
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
                        "cpm_fedavg": rounded(r["cpm_a"]),
                        "cpm_robust": rounded(r["cpm_b"]),
                        "runs_fedavg": [rounded(x) for x in r["runs_a"]],
                        "runs_robust": [rounded(x) for x in r["runs_b"]],
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
