"""Vendor shift: a detector trained on the base vendor (H) alone, on every vendor.

Runs the ``base`` and ``local-only`` regimes of a scenario through the study
harness (``simulation.run``) and emits, per site and class, the base model's
CPM, the site's own local-only CPM, and the drop of the base model relative to
its home site (site A): ``drop = CPM(base on A) - CPM(base on site)``.

Usage: ``python -m benchmarks.shift [--scenario F] [--federation F] [--rounds N]
[--out DIR]`` (defaults: the demo scenario and ``sim-demo.yaml``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from benchmarks.common import emit
from simulation import regimes as R
from simulation.run import RunRequest, run_study

REPO = Path(__file__).resolve().parents[1]
BENCH = "shift"


def main() -> None:
    """Run the two regimes and emit one JSON line per figure."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", default=str(REPO / "configs/simulation/demo.yaml"))
    ap.add_argument(
        "--federation", default=str(REPO / "configs/federation/sim-demo.yaml")
    )
    ap.add_argument("--rounds", type=int, default=30, help="passes over the data")
    ap.add_argument("--out", default=str(REPO / "out/shift"))
    ap.add_argument("--data", default=None, help="reuse sites/caches from here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    run = run_study(
        RunRequest(
            scenario=Path(args.scenario),
            federation=Path(args.federation),
            out=out,
            regimes=(R.BASE, R.LOCAL_ONLY),
            data=Path(args.data) if args.data else out / "data",
            rounds=args.rounds,
            n_boot=500,
        )
    )
    meta = json.loads((run / R.RUN_JSON).read_text())
    home = meta["base_sites"][0]
    base = json.loads((run / R.BASE / R.METRICS_JSON).read_text())["sites"]
    local = json.loads((run / R.LOCAL_ONLY / R.METRICS_JSON).read_text())["sites"]
    ctx = {
        "scenario": Path(args.scenario).name,
        "federation": Path(args.federation).name,
        "epochs": args.rounds,
        "home": home,
    }
    for site, m in base.items():
        for cls, c in m["classes"].items():
            if c["cpm"] is None:
                continue
            emit(
                BENCH,
                "base_cpm",
                c["cpm"],
                "cpm",
                site=site,
                cls=cls,
                ci=c["cpm_ci"],
                **ctx,
            )
            own = local.get(site, {}).get("classes", {}).get(cls, {}).get("cpm")
            if own is not None:
                emit(BENCH, "local_only_cpm", own, "cpm", site=site, cls=cls, **ctx)
            home_cpm = base[home]["classes"][cls]["cpm"]
            if site != home and home_cpm is not None:
                emit(
                    BENCH,
                    "drop_vs_home",
                    home_cpm - c["cpm"],
                    "cpm",
                    site=site,
                    cls=cls,
                    **ctx,
                )


if __name__ == "__main__":
    main()
