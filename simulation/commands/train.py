"""``mammofed-sim train``: central training on one or more site caches."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from simulation.train import load_train_config, run_training, with_overrides

NAME = "train"
HELP = "train the detector centrally on site caches (base / local / oracle regimes)"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mammofed-sim train``."""
    parser.add_argument("--config", required=True, type=Path, help="TrainConfig YAML")
    add_override_arguments(parser)


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """``--out``, ``--epochs``, ``--device`` (``with_overrides``); also crossval's."""
    parser.add_argument("--out", type=Path, default=None, help="override out_dir")
    parser.add_argument("--epochs", type=int, default=None, help="override epochs")
    parser.add_argument(
        "--device", default=None, help="override device (auto/cpu/cuda)"
    )


def run(args: argparse.Namespace) -> int:
    """Load the config, train, evaluate; print the per-site CPMs as JSON."""
    cfg = load_train_config(args.config)
    cfg = with_overrides(cfg, out_dir=args.out, epochs=args.epochs, device=args.device)
    results = run_training(cfg)
    summary = {
        site: None if r is None else r["metrics"].get("cpm-mean")
        for site, r in results.items()
    }
    sys.stdout.write(
        json.dumps({"out_dir": str(cfg.out_dir), "cpm_mean": summary}) + "\n"
    )
    return 0
