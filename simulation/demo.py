"""``make demo``: the whole system on an embedded default, in minutes on 2 CPU cores.

Generates the demo phantom scenario (four synthetic vendors: a base site, a
few-shot site, a semi-supervised site and a partly labeled one), ingests every
site, runs the base, local-only and recommended regimes
(``simulation.regimes.RECOMMENDED``: each site runs three models and fuses
their findings: the federation's personalized model, FedBN + personal heads
with few-shot head tuning where labels are few and the mean teacher's
consistency on unlabeled images; that model fine-tuned on the site's own
labels; and its own local-only model; the personalized-ssl and
personalized-ssl-tuned members are reported too) with the detector from the
shipped vendor-H base model, and writes the comparison report: per site, base
vs local-only vs the recommended regime with paired intervals on the same
test women. The oracle, FedAvg and the other regimes are in the three-seed
study (``make study``, docs/results.md, "The study"); with them the demo would not fit
its 15 minutes.
Usage: ``python -m simulation.demo --out out/demo``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from common.cli import setup_logging
from common.errors import MammofedError
from simulation import regimes as R

REPO = Path(__file__).resolve().parents[1]
SCENARIO = REPO / "configs" / "simulation" / "demo.yaml"
FEDERATION = REPO / "configs" / "federation" / "sim-demo.yaml"
#: The project's vendor-H base model for the demo (``make base-model``): the
#: demo starts where a real federation starts, from a model developed on H.
BASE_MODEL = REPO / "models" / "demo-base-h.pt"
DEMO_REGIMES = (
    R.BASE,
    R.LOCAL_ONLY,
    R.RECOMMENDED,
)

log = logging.getLogger("simulation.demo")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo study and print where the report is."""
    parser = argparse.ArgumentParser(prog="python -m simulation.demo")
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    setup_logging()
    from simulation.report import write_report
    from simulation.run import RunRequest, run_study

    t0 = time.monotonic()
    try:
        run = run_study(
            RunRequest(
                scenario=SCENARIO,
                federation=FEDERATION,
                out=args.out / "run",
                regimes=DEMO_REGIMES,
                data=args.out / "data",
                workers=args.workers,
                rounds=args.rounds,
                n_boot=500,
                base_checkpoint=BASE_MODEL if BASE_MODEL.is_file() else None,
            )
        )
        report = write_report([run], args.out / "report")
    except MammofedError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    minutes = (time.monotonic() - t0) / 60
    print(f"\ndemo finished in {minutes:.1f} min")
    print(f"report: {report}")
    print(f"machine-readable: {report.parent / 'report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
