"""``mammofed-server node-key``: a SuperNode's authentication key pair."""

from __future__ import annotations

import argparse

from common.cli import folder_arg
from common.wire.tls import generate_node_key

NAME = "node-key"
HELP = "make a SuperNode auth key pair (<site>.key stays, <site>.pub is registered)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``node-key``."""
    parser.add_argument(
        "--out", type=folder_arg, required=True, help="output directory"
    )
    parser.add_argument("--site-name", required=True, help="site name (file stem)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace existing files"
    )


def run(args: argparse.Namespace) -> int:
    """Write the pair and say which goes where."""
    keys = generate_node_key(args.out, args.site_name, overwrite=args.overwrite)
    print(f"private key {keys.private_key} -> this site only: mammofed-client start")
    print(f"                                  --auth-key {keys.private_key}")
    print(f"public key  {keys.public_key} -> the coordinator: mammofed-server start")
    print("                                  --register-keys (or register-node)")
    return 0
