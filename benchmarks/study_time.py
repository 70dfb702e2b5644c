"""Wall time of a finished study (``make study``) and of each of its regimes.

The study's ETA (:func:`simulation.run.regime_weight`) and the "about N min"
of the README and docs/results.md come from here. Time the whole command
yourself (the report at the end is part of it) and pass it with the run folder:

    t0=$(date +%s); make study STUDY_OUT=out/study-e2e STUDY_DATA=out/data-e2e
    python -m benchmarks.study_time --run out/study-e2e --wall-s $(($(date +%s) - t0))

One JSON line per figure in ``benchmarks/results/study_time.jsonl``: the whole
command against the 90-minute budget (the baseline), then each regime's mean
seconds over the seeds, with its ratio to ``local-only``'s in the same run
(the regime weights) and the weight the ETA used.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from benchmarks.common import emit, rounded
from common.wire import runfolder as RF
from simulation import regimes as R
from simulation.run import regime_weight

BENCH = "study_time"
#: The issue's budget for the whole study on the 2-core machine.
BUDGET_S = 90 * 60


def regime_seconds(run: Path) -> dict[str, list[float]]:
    """``{regime: [seconds in each seed]}`` from ``<run>/seed-*/run.json``.

    Reused regimes (copied from an earlier run) are left out: their time is
    not theirs. ``base-model`` and ``total`` are kept.

    Raises:
        ValueError: no seed folder with a run record under ``run``.
    """
    seeds = sorted(p for p in run.glob("seed-*") if (p / RF.RUN_JSON).is_file())
    if not seeds:
        raise ValueError(f"{run}: no seed-*/{RF.RUN_JSON} (not a finished study)")
    out: dict[str, list[float]] = {}
    for seed in seeds:
        rec = RF.read_record(RF.StudyRun, seed / RF.RUN_JSON)
        for name, s in rec.seconds.items():
            if name not in rec.reused:
                out.setdefault(name, []).append(float(s))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="the study's --out")
    ap.add_argument(
        "--wall-s", type=float, required=True, help="the whole command's seconds"
    )
    ap.add_argument("--parallel", type=int, default=3, help="seeds at a time")
    args = ap.parse_args(argv)
    if not args.wall_s > 0:
        ap.error(f"--wall-s: must be > 0, got {args.wall_s}")
    try:
        secs = regime_seconds(args.run)
    except ValueError as exc:
        ap.error(str(exc))
    regimes = [r for r in secs if r in R.REGIMES]
    ctx: dict[str, Any] = {
        "run": str(args.run),
        "seeds": len(secs.get("total", [])),
        "parallel": args.parallel,
        "regimes": regimes,
    }
    emit(
        BENCH, "study_wall_s", args.wall_s, "s",
        budget_s=BUDGET_S, within_budget=args.wall_s <= BUDGET_S, **ctx,
    )  # fmt: skip
    unit = statistics.mean(secs[R.LOCAL_ONLY]) if R.LOCAL_ONLY in secs else None
    for name in ["base-model", *regimes, "total"]:
        if name not in secs:
            continue
        mean = statistics.mean(secs[name])
        extra: dict[str, Any] = {"per_seed": secs[name]}
        if name in R.REGIMES:
            extra["eta_weight"] = regime_weight(R.REGIMES[name])
            if unit:
                extra["over_local_only"] = rounded(mean / unit, 2)
        emit(BENCH, f"regime_s/{name}", mean, "s", **extra, **ctx)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
