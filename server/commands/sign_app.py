"""``mammofed-server sign-app``: build this app's FAB and sign it for the hospitals."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "sign-app"
HELP = "build the Flower app bundle (FAB), sign it, store it for `start --signed-apps`"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``sign-app``."""
    parser.add_argument(
        "--key", type=Path, required=True, help="app-signing.key (signing-key)"
    )
    parser.add_argument(
        "--apps-dir",
        type=Path,
        required=True,
        help="where signed FABs live (mammofed-server start --signed-apps)",
    )
    parser.add_argument(
        "--app-dir",
        type=Path,
        help="the Flower app to build (default: this installation)",
    )


def run(args: argparse.Namespace) -> int:
    """Sign and say how to run it."""
    from server.app_registry import sign_app
    from server.launch import APP_DIR

    signed = sign_app(args.app_dir or APP_DIR, args.key, args.apps_dir)
    print(f"signed {signed.spec}: {signed.fab_path} (sha256 {signed.fab_sha256})")
    print(f"run it with: mammofed-server run --app {signed.spec} ...")
    return 0
