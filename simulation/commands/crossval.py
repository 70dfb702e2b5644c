"""``mammofed-sim crossval``: patient-level k-fold CV of the central training recipe."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.errors import MammofedError
from simulation.commands.train import add_override_arguments, apply_overrides

NAME = "crossval"
HELP = (
    "patient-level k-fold cross-validation of a TrainConfig: out-of-fold FROC "
    "per class with bootstrap CI, per-fold CPMs"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mammofed-sim crossval``."""
    parser.add_argument("--config", required=True, type=Path, help="TrainConfig YAML")
    parser.add_argument("--folds", type=int, default=5, help="number of folds k")
    parser.add_argument(
        "--only-folds",
        help="comma-separated fold indices (0-based, as in fold-<f>/) to train "
        "without pooling, so several processes can share the folds; a last run "
        "without it pools them",
    )
    add_override_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Load the config, run the CV; print the pooled per-class CPMs as JSON."""
    from simulation.crossval import run_crossval
    from simulation.train import load_train_config

    cfg = apply_overrides(load_train_config(args.config), args)
    if args.folds < 2:
        raise MammofedError(f"--folds must be >= 2, got {args.folds}")
    only = None
    if args.only_folds is not None:
        try:
            only = [int(x) for x in args.only_folds.split(",") if x.strip()]
        except ValueError as exc:
            raise MammofedError(
                f"--only-folds: expected comma-separated integers, got "
                f"{args.only_folds!r}"
            ) from exc
    doc = run_crossval(cfg, k=args.folds, only=only)
    if doc.get("partial"):
        print(json.dumps({"out_dir": str(cfg.out_dir), **doc}))
        return 0
    summary = {
        name: {"cpm": c["cpm"], "cpm_ci95": c["cpm_ci95"]}
        for name, c in doc["classes"].items()
    }
    print(json.dumps({"out_dir": str(cfg.out_dir), "k": doc["k"], "classes": summary}))
    return 0
