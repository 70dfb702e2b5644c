"""``mammofed-client ingest SITE_DIR --out CACHE_DIR``: check and cache a site."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from common.errors import MammofedError

NAME = "ingest"
HELP = "decode a site's images once into a hash-keyed cache (manifest + report)"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments: SITE_DIR, --out, --site-config, --workers, --force."""
    parser.add_argument(
        "site_dir", nargs="?", help="site image tree (default: data_dir of the config)"
    )
    parser.add_argument(
        "--out",
        dest="cache_dir",
        help="cache folder (default: cache_dir of the config)",
    )
    parser.add_argument(
        "--site-config", type=Path, help="site YAML (configs/sites/*.yaml)"
    )
    parser.add_argument(
        "--workers", type=int, help="decode processes (default: config)"
    )
    parser.add_argument("--force", action="store_true", help="decode every file again")


def run(args: argparse.Namespace) -> int:
    """Ingest; 0 when at least one image is in the cache, 1 when none could be."""
    from client.ingest import ingest_site
    from common.config.site import load_site_config

    cfg = load_site_config(args.site_config)
    site = args.site_dir or cfg.data_dir
    cache = args.cache_dir or cfg.cache_dir
    if site is None:
        raise MammofedError("SITE_DIR missing (give it or set data_dir in the config)")
    if cache is None:
        raise MammofedError("--out CACHE_DIR missing (or set cache_dir in the config)")
    if args.workers is not None and args.workers < 1:
        raise MammofedError(f"--workers must be >= 1, got {args.workers}")
    result = ingest_site(
        Path(site), Path(cache), cfg, workers=args.workers, force=args.force
    )
    if not result.entries:
        log.error(
            "nothing could be ingested from %s (see %s)", site, result.report_path
        )
        return 1
    return 0
