"""``mammofed-sim run``: phantom sites -> ingest -> regimes -> per-site FROC."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import add_set_argument, count_arg, folder_arg
from simulation import regimes as R

NAME = "run"
HELP = "run a multi-vendor study on one machine (phantom, ingest, regimes, FROC)"

DEFAULT_REGIMES = (R.BASE, R.LOCAL_ONLY, R.FEDAVG, R.PERSONALIZED, R.ORACLE)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``run``."""
    parser.add_argument("--scenario", type=Path, required=True, help="scenario YAML")
    parser.add_argument(
        "--federation", type=Path, required=True, help="federation YAML (detector)"
    )
    parser.add_argument("--out", type=folder_arg, required=True, help="run folder")
    parser.add_argument(
        "--regime",
        action="append",
        choices=R.ORDER,
        help=f"regime to run (repeatable; default: {', '.join(DEFAULT_REGIMES)})",
    )
    parser.add_argument(
        "--data", type=Path, help="where sites and caches live (default OUT/data)"
    )
    parser.add_argument("--rounds", type=int, help="override num_rounds")
    parser.add_argument(
        "--seed",
        type=int,
        help="override the federation's seed (initialisation, sampling, "
        "augmentation; the sites' train/test split stays the cache's)",
    )
    parser.add_argument(
        "--seeds",
        type=parse_seeds,
        help="run every regime once per seed (comma-separated, e.g. 0,1,2) into "
        "OUT/seed-<s>/ on the same test women; the report pools paired "
        "differences over seeds and images",
    )
    parser.add_argument(
        "--base-checkpoint",
        type=Path,
        help="the base model (a detector checkpoint for the federation's model "
        "options) instead of training one on the base sites",
    )
    parser.add_argument(
        "--reuse",
        type=Path,
        action="append",
        default=[],
        help="a finished run of the same scenario, federation config and base "
        "model (with --seeds: the folder of its seed-<s>/; repeatable, the "
        "first that scored a regime gives it): the regimes it scored are read "
        "from it, not trained again, e.g. to add one regime or an ensemble of "
        "its regimes to a study",
    )
    parser.add_argument(
        "--from-scratch",
        action="store_true",
        help="start every regime from a random model (default: the two-phase "
        "protocol, every regime starts from the base model)",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="with --seeds: run this many seeds at once, one process each "
        "(a regime mostly keeps one core busy; 2 on a 2-core machine)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads per run (default: the federation config's "
        "trainer.options.threads; with --parallel, the cores shared out)",
    )
    parser.add_argument("--workers", type=int, default=2, help="phantom/ingest workers")
    parser.add_argument(
        "--n-boot", type=count_arg, default=500, help="bootstrap resamples"
    )
    parser.add_argument(
        "--engine",
        choices=R.ENGINES,
        default="inprocess",
        help="federated regimes: in-process grid (default); 'ray': Flower's "
        "simulation engine (flwr run, local simulation SuperLink, Ray; one node per "
        "site); 'deployment': a loopback SuperLink and one SuperNode process per "
        "site, training in parallel (what a GPU box without Ray uses)",
    )
    parser.add_argument(
        "--engine-timeout",
        type=float,
        default=3600.0,
        help="seconds one federated regime may take on --engine ray/deployment",
    )
    parser.add_argument(
        "--dp-epsilon",
        type=float,
        default=8.0,
        help="target epsilon of every site in the personalized-dp regime "
        "(patient-level DP-SGD; see docs/privacy.md)",
    )
    parser.add_argument(
        "--fedprox-mu",
        type=_positive_float,
        default=0.01,
        help="weight of FedProx's proximal term in the fedprox regime "
        "(strategy.proximal_mu; docs/federation.md)",
    )
    parser.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default=None,
        help="the learning rate the server sends over the rounds (default: the "
        "federation config's trainer.lr_schedule; docs/federation.md)",
    )
    # --reuse pairs only runs whose recorded settings are the same
    add_set_argument(
        parser, "the federation config", "trainer.options.ssl_unsup_weight=0"
    )
    parser.add_argument(
        "--report", type=Path, help="also write the report here (default OUT/report)"
    )


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``; distinct non-negative integers."""
    try:
        seeds = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds: expected integers separated by commas, got {text!r}"
        ) from None
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(
            f"--seeds: expected distinct non-negative integers, got {text!r}"
        )
    return seeds


def run(args: argparse.Namespace) -> int:
    """Run the study (once, or once per seed), then write the report."""
    from simulation.report import write_report
    from simulation.run import RunRequest, run_seeds

    if args.seeds is not None and args.seed is not None:
        raise SystemExit("mammofed-sim run: give --seed or --seeds, not both")
    req = RunRequest(
        scenario=args.scenario,
        federation=args.federation,
        out=args.out,
        regimes=tuple(args.regime or DEFAULT_REGIMES),
        data=args.data,
        workers=args.workers,
        rounds=args.rounds,
        seed=args.seed,
        n_boot=args.n_boot,
        engine=args.engine,
        engine_timeout_s=args.engine_timeout,
        dp_epsilon=args.dp_epsilon,
        fedprox_mu=args.fedprox_mu,
        start_from_base=not args.from_scratch,
        base_checkpoint=args.base_checkpoint,
        reuse=tuple(args.reuse),
        threads=args.threads,
        lr_schedule=args.lr_schedule,
        settings=tuple(args.settings),
    )
    runs = run_seeds(req, args.seeds, parallel=args.parallel)
    report = write_report(runs, args.report or args.out / "report")
    for run_dir in runs:
        print(f"run folder: {run_dir}")
    print(f"report: {report}")
    return 0
