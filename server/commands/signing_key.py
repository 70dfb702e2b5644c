"""``mammofed-server signing-key``: the coordinator's app-signing key."""

from __future__ import annotations

import argparse

from common.cli import folder_arg
from common.wire.app_signing import generate_signing_key

NAME = "signing-key"
HELP = "make the Ed25519 key that signs apps, and the hospitals' trusted-entities file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``signing-key``."""
    parser.add_argument(
        "--out", type=folder_arg, required=True, help="output directory"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace existing files"
    )


def run(args: argparse.Namespace) -> int:
    """Write the files and say which goes where."""
    files = generate_signing_key(args.out, overwrite=args.overwrite)
    print(f"key id {files.key_id}")
    print(f"{files.private_key} -> coordinator only: mammofed-server sign-app --key")
    print(f"{files.public_key} -> public half (kept for reference)")
    print(
        f"{files.trusted_entities} -> every hospital: mammofed-client start "
        "--trusted-entities"
    )
    return 0
