"""``mammofed-client status``: last round, model version, DP budget, outbox, health."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from client.commands.start import DEFAULT_HEALTH_ADDRESS

NAME = "status"
HELP = "this site's last round, model version, DP budget spent, DICOM outbox, health"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``status``."""
    parser.add_argument(
        "--site-config", type=Path, required=True, help="the site's YAML"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object")
    parser.add_argument(
        "--health-address",
        default=DEFAULT_HEALTH_ADDRESS,
        help="the SuperNode's gRPC health service ('' skips the check)",
    )


def run(args: argparse.Namespace) -> int:
    """Print the status; exit 0 when healthy, 1 when a problem was found."""
    from client.site_status import site_status
    from common.config.site import load_site_config

    site = load_site_config(args.site_config)
    status = site_status(site, args.health_address or None)
    if args.json:
        print(json.dumps(status.to_json(), indent=2, sort_keys=True))
    else:
        print(status.to_text())
    return 0 if status.healthy else 1
