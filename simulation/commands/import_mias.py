"""``mammofed-sim import-mias SRC OUT_SITE_DIR``: mini-MIAS -> site folder."""

from __future__ import annotations

import argparse

NAME = "import-mias"
HELP = "convert a mini-MIAS folder (png/ + Info.txt) into a site folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments: source folder, output site folder, --keep-words."""
    parser.add_argument("src", help="folder with Info.txt and png/mdbNNN.png")
    parser.add_argument("out", help="site folder to write (PNG copies + tables)")
    parser.add_argument(
        "--keep-words",
        action="store_true",
        help="write MIAS class words (CIRC, CALC...) for a site config to map",
    )


def run(args: argparse.Namespace) -> int:
    """Import; exit 1 when no image was imported."""
    from simulation.importers.mias import import_mias

    summary = import_mias(args.src, args.out, keep_words=args.keep_words)
    return 0 if summary.images else 1
