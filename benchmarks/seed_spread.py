"""Training noise: one regime over several runs (seeds) on the same test images.

A run's bootstrap interval covers the test images it happened to be scored
on, not the luck of its training (initialisation, sampling, augmentation, the
order of float sums). This benchmark takes several finished runs of the same
regimes (``mammofed-sim run --seed S``) and reports, per regime, site and
class, the CPM of every run, its mean, standard deviation and range; and per
site, the ratio of two regimes' mean CPMs (e.g. personalized / oracle, the
issue's goal) with the range of the per-run ratios.

Usage::

    python -m benchmarks.seed_spread \\
        --run personalized=out/cpu-study/run/personalized \\
        --run personalized=out/cpu-study/seed1/personalized \\
        --run oracle=out/cpu-study/run/oracle \\
        --run oracle=out/cpu-study/seed1-oracle/oracle \\
        --ratio personalized/oracle

One JSON line per figure in ``benchmarks/results/seed_spread.jsonl``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import emit, rounded
from common.detector.froc import froc_class
from common.keys import CLASSES
from common.wire import runfolder as RF
from simulation.report import load_detections

BENCH = "seed_spread"


def parse_run(text: str) -> tuple[str, Path]:
    """``REGIME=FOLDER`` -> ``(REGIME, FOLDER)``; the folder must hold detections."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--run: expected REGIME=FOLDER, got {text!r}")
    if not (Path(path) / RF.DETECTIONS_JSON).is_file():
        raise argparse.ArgumentTypeError(
            f"--run {name}: no {RF.DETECTIONS_JSON} in {path}"
        )
    return name, Path(path)


def cpms(runs: list[tuple[str, Path]]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{regime: {site: {class: [CPM of each run, in the order given]}}}``.

    Raises:
        ValueError: two runs of the test set of a site differ (not pairable).
    """
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    keys: dict[str, list[str]] = {}
    for regime, folder in runs:
        for site, images in load_detections(folder / RF.DETECTIONS_JSON).items():
            ks = sorted(im.key for im in images)
            if keys.setdefault(site, ks) != ks:
                raise ValueError(f"{folder}: site {site} scored other test images")
            for label, cls in enumerate(CLASSES):
                cpm = froc_class(images, label).cpm
                out.setdefault(regime, {}).setdefault(site, {}).setdefault(
                    cls, []
                ).append(cpm)
    return out


def summary(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation, min and max of the finite values."""
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return {"mean": math.nan, "sd": None, "min": None, "max": None, "n": 0}
    return {
        "mean": statistics.fmean(v),
        "sd": rounded(statistics.stdev(v)) if len(v) > 1 else None,
        "min": rounded(min(v)),
        "max": rounded(max(v)),
        "n": len(v),
    }


def main(argv: list[str] | None = None) -> int:
    """Emit every regime's spread over runs and the requested ratios."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=parse_run, action="append", required=True)
    p.add_argument(
        "--ratio",
        action="append",
        default=[],
        help="A/B: mean CPM of regime A over mean CPM of regime B, per site",
    )
    p.add_argument("--results", type=Path, default=None)
    args = p.parse_args(argv)
    table = cpms(args.run)
    for regime, sites in table.items():
        for site, classes in sites.items():
            for cls, values in classes.items():
                s = summary(values)
                emit(
                    BENCH,
                    f"{regime}-cpm-{cls}",
                    s.pop("mean"),
                    "cpm",
                    results_dir=args.results,
                    regime=regime,
                    site=site,
                    runs=[rounded(x) for x in values],
                    **s,
                )
    for spec in args.ratio:
        a, _, b = spec.partition("/")
        if a not in table or b not in table:
            raise SystemExit(f"--ratio {spec}: no runs of {a!r} or {b!r}")
        for site in sorted(set(table[a]) & set(table[b])):
            for cls in CLASSES:
                va, vb = table[a][site][cls], table[b][site][cls]
                ma, mb = summary(va)["mean"], summary(vb)["mean"]
                pairs = [
                    x / y
                    for x, y in itertools.product(va, vb)
                    if y > 0 and not math.isnan(x)
                ]
                emit(
                    BENCH,
                    f"{a}-over-{b}-cpm-{cls}",
                    ma / mb if mb > 0 else math.nan,
                    "x",
                    results_dir=args.results,
                    site=site,
                    range_over_run_pairs=[rounded(min(pairs)), rounded(max(pairs))]
                    if pairs
                    else None,
                    runs_a=len(va),
                    runs_b=len(vb),
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
