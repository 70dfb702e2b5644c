"""``mammofed-client evaluate``: FROC metrics of a checkpoint on a site cache."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

NAME = "evaluate"
HELP = "evaluate a detector checkpoint on a site cache (FROC, CPM, AP, plots)"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mammofed-client evaluate``."""
    parser.add_argument("--checkpoint", required=True, type=Path, help="model file")
    parser.add_argument(
        "--cache", required=True, type=Path, help="site cache folder (ingest --out)"
    )
    parser.add_argument(
        "--view", default="test", choices=("test", "all"), help="images to score"
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="test women")
    parser.add_argument("--split-seed", type=int, default=0, help="test split seed")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap draws")
    parser.add_argument("--boot-seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda...")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights")


def run(args: argparse.Namespace) -> int:
    """Evaluate and write ``OUT/metrics.json`` and FROC plots."""
    from client.evaluate import evaluate_checkpoint

    evaluate_checkpoint(
        args.checkpoint,
        args.cache,
        args.out,
        view=args.view,
        test_fraction=args.test_fraction,
        split_seed=args.split_seed,
        n_boot=args.n_boot,
        seed=args.boot_seed,
        device=args.device,
        use_ema=args.ema,
    )
    log.info("wrote %s", args.out / "metrics.json")
    return 0
