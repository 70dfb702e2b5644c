"""``mammofed-sim report RUN_DIR... --out DIR``: the comparison report."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import folder_arg

NAME = "report"
HELP = "write report.md/report.json (CPM table, FROC plots, rounds, bytes) from runs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``report``."""
    parser.add_argument("runs", nargs="+", type=Path, help="run folders")
    parser.add_argument("--out", type=folder_arg, required=True, help="report folder")


def run(args: argparse.Namespace) -> int:
    """Write the report and print where it is."""
    from simulation.report import write_report

    path = write_report(list(args.runs), args.out)
    print(f"report: {path}")
    return 0
