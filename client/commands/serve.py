"""``mammofed-client serve``: the site's DICOM storage node.

Images in; a CAD SR per exam (and, with ``dicom_node.presentation_states``, a
presentation state per image) out.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

NAME = "serve"
HELP = (
    "run the DICOM storage node: receive mammograms, cache them (unlabeled), "
    "send a CAD SR per exam (and presentation states, dicom_node.presentation_states)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mammofed-client serve``."""
    parser.add_argument(
        "--site-config",
        required=True,
        type=Path,
        help="site YAML with data_dir, cache_dir and a dicom_node section",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        action="append",
        default=None,
        help="model file; give it more than once to fuse several models' "
        "findings (default: dicom_node.checkpoint and dicom_node.fuse_with of "
        "the site config)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda...")


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C or SIGTERM; 0 on a clean stop."""
    from client.dicom_node import DicomNode
    from common.config.site import load_site_config

    if not args.verbose:  # pynetdicom logs every PDU at INFO
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    cfg = load_site_config(args.site_config)
    node = DicomNode(
        cfg,
        checkpoint=args.checkpoint,
        device=args.device,
        source=str(args.site_config),
    )
    node.serve_forever()
    return 0
