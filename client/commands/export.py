"""``mammofed-client export``: a federation round -> a model checkpoint."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from common.errors import ConfigError

NAME = "export"
HELP = (
    "turn a federation round (+ this site's personal layers) into a model "
    "checkpoint for predict / evaluate"
)

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mammofed-client export``."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="RUN/checkpoints (last complete round) or a round-NNNNN.json",
    )
    parser.add_argument("--out", required=True, type=Path, help="model file to write")
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--site-name", help="site name (its state is STATE_DIR/NAME)")
    who.add_argument(
        "--site-config", type=Path, help="site YAML (its name and state_dir)"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="with --site-name: the state folder (default: the run's state_dir)",
    )
    parser.add_argument(
        "--global-only",
        action="store_true",
        help="the global model (under FedBN a site must lend its norm layers)",
    )
    parser.add_argument(
        "--onnx",
        type=Path,
        help="also write this .onnx file (+ .contract.json, model card), see "
        "docs/models.md",
    )
    parser.add_argument(
        "--eval",
        type=Path,
        help="a 'mammofed-client evaluate' folder of this model: its CPM goes "
        "to the model cards",
    )


#: The flags that supply what the export lacks (``client.export.ExportNeeds``).
_NEEDS = {
    "site": (
        "--site-name",
        "--site-name NAME [--state-dir DIR] or --site-config FILE, or --global-only",
    ),
    "lending-site": ("--site-name", "--site-name NAME or --site-config FILE"),
    "state-dir": ("--state-dir", "--state-dir DIR or --site-config FILE"),
}


def run(args: argparse.Namespace) -> int:
    """Export; exit 0 when the checkpoint was written."""
    from client.export import ExportNeeds, export_model
    from client.model_card import write_model_card
    from client.onnx_export import export_onnx
    from common.config.site import load_site_config
    from common.detector.checkpoint import load_checkpoint

    site, state_dir = args.site_name, args.state_dir
    if args.onnx is not None and args.onnx.suffix != ".onnx":
        raise ConfigError("command line", "--onnx", f"must end in .onnx: {args.onnx}")
    if state_dir is not None and site is None:
        raise ConfigError(
            "command line",
            "--state-dir",
            "needs --site-name NAME (a --site-config names its own state_dir)",
        )
    if args.site_config is not None:
        cfg = load_site_config(args.site_config)
        if cfg.state_dir is None:
            raise ConfigError(
                str(args.site_config),
                "state_dir",
                "is required to export this site's model (it holds personal.npz)",
            )
        site, state_dir = cfg.name, cfg.state_dir
    try:
        res = export_model(
            args.checkpoint,
            args.out,
            site=site,
            state_dir=state_dir,
            global_only=args.global_only,
        )
    except ExportNeeds as exc:
        flag, hint = _NEEDS[exc.what]
        raise ConfigError("command line", flag, f"{exc}; give {hint}") from exc
    log.info("wrote %s (%s model, round %d)", res.path, res.kind, res.round)
    ck = load_checkpoint(res.path)
    write_model_card(res.path, ck, kind="torch-checkpoint", eval_dir=args.eval)
    if args.onnx is not None:
        export_onnx(res.path, args.onnx, eval_dir=args.eval)
    return 0
