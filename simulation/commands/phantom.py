"""``mammofed-sim phantom``: write synthetic multi-vendor sites from a scenario."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from common.progress import format_seconds

NAME = "phantom"
HELP = "generate synthetic multi-vendor mammography sites (DICOM + annotations)"
PREVIEW_PNG = "preview.png"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mammofed-sim phantom``."""
    parser.add_argument(
        "--scenario", required=True, type=Path, help="scenario YAML file"
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="output root (one folder per site)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="processes rendering images (>= 1)"
    )
    parser.add_argument(
        "--site-name",
        action="append",
        help="generate only this site (repeatable; default: all)",
    )
    parser.add_argument(
        "--preview",
        action="store_true",
        help="write OUT/preview.png (one image per vendor and view, boxes drawn)",
    )
    parser.add_argument(
        "--preview-only",
        action="store_true",
        help="write the preview without generating the sites",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar on stderr"
    )


class _Bar:
    """A one-line stderr progress bar per site."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self, site: str, done: int, total: int) -> None:
        width = 30
        fill = int(width * done / max(total, 1))
        rate = done / max(time.monotonic() - self.start, 1e-6)
        left = format_seconds((total - done) / rate) if done < total else "0 s"
        sys.stderr.write(
            f"\rsite {site}: [{'#' * fill}{'.' * (width - fill)}] "
            f"{done}/{total} ({rate:.1f} img/s, ETA {left})  "
        )
        if done == total:
            sys.stderr.write("\n")
            self.start = time.monotonic()
        sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    """Generate the sites (and/or the preview); returns the exit status."""
    from common.errors import MammofedError
    from simulation.phantom import generate_scenario, load_scenario
    from simulation.phantom.preview import write_preview

    if args.workers < 1:
        raise MammofedError(f"--workers must be >= 1, got {args.workers}")
    scenario = load_scenario(args.scenario)
    names = [s.name for s in scenario.sites]
    unknown = [n for n in args.site_name or () if n not in names]
    if unknown:
        raise MammofedError(
            f"unknown --site-name {unknown}; scenario {args.scenario} has {names}"
        )
    if not args.preview_only:
        progress = True if args.no_progress or not sys.stderr.isatty() else _Bar()
        sites = generate_scenario(
            scenario,
            args.out,
            workers=args.workers,
            progress=progress,
            sites=args.site_name,
        )
        for name, path in sites.items():
            log.info("site %s -> %s", name, path)
    if args.preview or args.preview_only:
        write_preview(scenario, Path(args.out) / PREVIEW_PNG)
    return 0
