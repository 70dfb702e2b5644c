"""``mammofed-client evaluate``: FROC metrics and error galleries of a checkpoint."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from common.cli import count_arg, folder_arg, fraction_arg
from common.detector.errors import GALLERY_N  # numpy only: --help stays fast

NAME = "evaluate"
HELP = (
    "evaluate a detector checkpoint on a site cache (FROC, CPM, AP, plots, "
    "error galleries, sensitivity by lesion size and breast density)"
)
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mammofed-client evaluate``."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        action="append",
        help="model file; give it again to score several models run together, "
        "findings fused (as predict runs them)",
    )
    parser.add_argument(
        "--cache", required=True, type=Path, help="site cache folder (ingest --out)"
    )
    parser.add_argument(
        "--view", default="test", choices=("test", "all"), help="images to score"
    )
    parser.add_argument("--out", required=True, type=folder_arg, help="output folder")
    parser.add_argument(
        "--test-fraction",
        type=fraction_arg,
        default=None,
        help="share of women held out as test in a cache without split.json "
        "(default: the one the checkpoint was trained under, else 0.2)",
    )
    parser.add_argument(
        "--split-seed",
        type=int,
        default=None,
        help="seed of that split (default: the one the checkpoint was trained "
        "under, the federation's seed; else 0)",
    )
    parser.add_argument(
        "--other-split",
        action="store_true",
        help="score the split of --split-seed / --test-fraction although the "
        "checkpoint records another training split (some 'test' women were "
        "then trained on); without it that is refused",
    )
    parser.add_argument(
        "--n-boot", type=count_arg, default=1000, help="bootstrap draws"
    )
    parser.add_argument("--boot-seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda...")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights")
    parser.add_argument(
        "--gallery-missed",
        type=count_arg,
        default=GALLERY_N,
        metavar="N",
        help="missed lesions (at 1 FP/image) shown per class in errors-<class>.png, "
        "largest first",
    )
    parser.add_argument(
        "--gallery-fp",
        type=count_arg,
        default=GALLERY_N,
        metavar="N",
        help="top-scoring false positives shown per class; 0 for both: no gallery",
    )


def run(args: argparse.Namespace) -> int:
    """Evaluate and write ``OUT/metrics.json``, FROC plots and error galleries."""
    from client.evaluate import evaluate_checkpoint

    evaluate_checkpoint(
        args.checkpoint,
        args.cache,
        args.out,
        view=args.view,
        test_fraction=args.test_fraction,
        split_seed=args.split_seed,
        allow_other_split=args.other_split,
        n_boot=args.n_boot,
        seed=args.boot_seed,
        device=args.device,
        use_ema=args.ema,
        gallery_missed=args.gallery_missed,
        gallery_fp=args.gallery_fp,
    )
    log.info("wrote %s", args.out / "metrics.json")
    return 0
