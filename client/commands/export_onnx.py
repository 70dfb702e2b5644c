"""``mammofed-client export-onnx``: a model checkpoint -> ONNX + contract + card."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

NAME = "export-onnx"
HELP = (
    "export a model checkpoint to ONNX with its preprocessing contract and "
    "model card (for onnxruntime and other tools)"
)

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mammofed-client export-onnx``."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        action="append",
        help="model checkpoint (.pt from 'export' or 'mammofed-sim train'); give "
        "it twice or more for an ensemble whose findings are fused (the "
        "recommended regime: the federation's model, that model fine-tuned "
        "here, and the site's own)",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help=".onnx file to write; with several --checkpoint an .ensemble.json "
        "manifest (members are written beside it as <name>.m<i>.onnx)",
    )
    parser.add_argument(
        "--eval",
        type=Path,
        help="a 'mammofed-client evaluate' folder of this checkpoint (CPM in the card)",
    )
    parser.add_argument("--ema", action="store_true", help="export the EMA weights")
    parser.add_argument(
        "--opset",
        type=int,
        default=17,  # client.onnx_export.DEFAULT_OPSET (a test keeps them equal)
        help="ONNX opset",
    )


def run(args: argparse.Namespace) -> int:
    """Export; exit 0 when the graph, its contract and its card were written."""
    from client.onnx_export import export_onnx

    if len(args.checkpoint) > 1:
        from client.onnx_ensemble import export_onnx_ensemble
        from common.errors import ConfigError

        if args.eval is not None:
            raise ConfigError(
                "command line", "--eval", "applies to one checkpoint, not an ensemble"
            )
        manifest = export_onnx_ensemble(
            args.checkpoint, args.out, opset=args.opset, use_ema=args.ema
        )
        log.info("wrote %s and its %d members", manifest, len(args.checkpoint))
        return 0
    res = export_onnx(
        args.checkpoint[0],
        args.out,
        opset=args.opset,
        use_ema=args.ema,
        eval_dir=args.eval,
    )
    log.info("wrote %s, %s, %s", res.onnx, res.contract.name, res.card_json.name)
    return 0
