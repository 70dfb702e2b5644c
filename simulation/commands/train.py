"""``mammofed-sim train``: central training on one or more site caches."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from common.cli import add_set_argument, folder_arg
from common.errors import MammofedError

if TYPE_CHECKING:
    from simulation.train import TrainConfig

NAME = "train"
HELP = "train the detector centrally on site caches (base / local / oracle regimes)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mammofed-sim train``."""
    parser.add_argument("--config", required=True, type=Path, help="TrainConfig YAML")
    add_override_arguments(parser)


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags overriding the TrainConfig (:func:`apply_overrides`); also crossval's."""
    parser.add_argument("--out", type=folder_arg, help="override out_dir")
    parser.add_argument("--epochs", type=int, help="override epochs")
    parser.add_argument("--device", help="override device (auto/cpu/cuda)")
    parser.add_argument(
        "--init-checkpoint",
        type=Path,
        help="override init_checkpoint: start from this pretrained model file",
    )
    parser.add_argument(
        "--labeled-patients",
        type=int,
        help="override labeled_patients: train on at most N labeled women per cache",
    )
    add_set_argument(parser, "the TrainConfig", "augment.paste_p=0.25")


def apply_overrides(cfg: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """``cfg`` with the flags of :func:`add_override_arguments` that were given.

    ``--set KEY=VALUE`` settings go first, then the named flags (which win).

    The flags are validated like the YAML's keys (``--epochs 0``,
    ``--labeled-patients 0`` or an ``--init-checkpoint`` that is not a file
    raise :class:`common.errors.ConfigError` naming the flag's field).
    """
    from common.config import apply_settings, replace_validated

    if args.init_checkpoint is not None and not args.init_checkpoint.is_file():
        raise MammofedError(f"--init-checkpoint: no such file {args.init_checkpoint}")
    flags = {
        "out_dir": args.out,
        "epochs": args.epochs,
        "device": args.device,
        "init_checkpoint": args.init_checkpoint,
        "labeled_patients": args.labeled_patients,
    }
    given = {k: v for k, v in flags.items() if v is not None}
    cfg = apply_settings(cfg, args.settings, "--set")
    return replace_validated(cfg, "command-line flags", **given)


def run(args: argparse.Namespace) -> int:
    """Load the config, train, evaluate; print the per-site CPMs as JSON."""
    from simulation.train import load_train_config, run_training

    cfg = apply_overrides(load_train_config(args.config), args)
    results = run_training(cfg)
    summary = {
        site: None if r is None else r["metrics"].get("cpm-mean")
        for site, r in results.items()
    }
    print(json.dumps({"out_dir": str(cfg.out_dir), "cpm_mean": summary}))
    return 0
