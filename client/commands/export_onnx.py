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
        help="model checkpoint (.pt from 'export' or 'mammofed-sim train')",
    )
    parser.add_argument("--out", required=True, type=Path, help=".onnx file to write")
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

    res = export_onnx(
        args.checkpoint,
        args.out,
        opset=args.opset,
        use_ema=args.ema,
        eval_dir=args.eval,
    )
    log.info("wrote %s, %s, %s", res.onnx, res.contract.name, res.card_json.name)
    return 0
