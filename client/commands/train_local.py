"""``mammofed-client train-local``: the site's own model on its own labels.

From the base model, or from the site's exported federated model
(fine-tuning after federation).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

NAME = "train-local"
HELP = (
    "train this site's own model on its labeled women alone, from the base "
    "model or, with --init the exported federated model, fine-tune that one "
    "(two of the recommended regime's three models; fuse them with the "
    "exported model in predict / evaluate / serve)"
)

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mammofed-client train-local``."""
    parser.add_argument(
        "--site-config",
        required=True,
        type=Path,
        help="site YAML (its name and cache_dir: run ingest first)",
    )
    parser.add_argument(
        "--federation",
        required=True,
        type=Path,
        help="the federation's config (recipe, learning rate, batch size, seed "
        "and split; the coordinator ships it with the base model)",
    )
    parser.add_argument(
        "--init",
        required=True,
        type=Path,
        help="the model to start from: the coordinator's base model, or the "
        "site's exported federated model (checked against the federation's "
        "model options)",
    )
    parser.add_argument("--out", required=True, type=Path, help="model file to write")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="training epochs (default: num_rounds x local_epochs, as the "
        "study's local-only regime)",
    )
    parser.add_argument(
        "--head-only",
        action="store_true",
        help="tune the base model's detection head only, every other tensor "
        "kept (the study's local-head regime, for a site with few labeled women)",
    )
    parser.add_argument(
        "--lr-factor",
        type=float,
        default=1.0,
        help="learning rate = the federation's x this (default 1); 0.3 with "
        "--init the site's exported federated model: fine-tuning after "
        "federation, the study's personalized-ssl-tuned regime",
    )
    parser.add_argument(
        "--pseudo-label-with",
        nargs="+",
        type=Path,
        default=[],
        metavar="MODEL",
        help="self-training: these models (the site's exported federated model, "
        "its tuned one and its own, say) label the site's unlabeled training "
        "images, their findings fused, and the model trains on those beside the "
        "labeled ones (the study's personalized-ssl-tuned-pseudo regime)",
    )
    parser.add_argument(
        "--pseudo-keep",
        type=float,
        default=0.5,
        help="a fused finding scoring at least this is a lesion box (default 0.5)",
    )
    parser.add_argument(
        "--pseudo-ignore",
        type=float,
        default=0.2,
        help="one scoring at least this (and below --pseudo-keep) is an ignore "
        "region; the rest of the image is background (default 0.2)",
    )
    parser.add_argument("--device", default=None, help="auto, cpu, cuda...")


def run(args: argparse.Namespace) -> int:
    """Train and write the model; 0 when written."""
    from client.local_training import train_local_model
    from common.config.site import load_site_config
    from common.detector.adapt.pseudo import PseudoConfig
    from common.errors import ConfigError
    from common.wire.federation import load_federation_config

    site = load_site_config(args.site_config)
    fed = load_federation_config(args.federation)
    try:
        pseudo = PseudoConfig(keep=args.pseudo_keep, ignore=args.pseudo_ignore)
    except ValueError as exc:
        raise ConfigError("--pseudo-keep/--pseudo-ignore", "pseudo", str(exc)) from exc
    train_local_model(
        site,
        fed,
        init=args.init,
        out=args.out,
        epochs=args.epochs,
        head_only=args.head_only,
        lr_factor=args.lr_factor,
        device=args.device,
        source=str(args.federation),
        site_source=str(args.site_config),
        pseudo_label_with=args.pseudo_label_with,
        pseudo=pseudo,
    )
    return 0
