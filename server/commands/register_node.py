"""``mammofed-server register-node``: allow SuperNode keys on a running SuperLink."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "register-node"
HELP = "register SuperNode public keys on a SuperLink started --enable-supernode-auth"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``register-node``."""
    parser.add_argument(
        "keys", type=Path, nargs="+", help="*.pub files or directories of them"
    )
    parser.add_argument("--superlink", default="127.0.0.1:8000", help="host:port")
    parser.add_argument(
        "--root-certificates", type=Path, required=True, help="CA of the SuperLink"
    )


def run(args: argparse.Namespace) -> int:
    """Register each key; print its node id."""
    from common.wire.tls import client_tls_from_flags, public_keys_in
    from server.launch import Connection, register_supernodes

    keys = public_keys_in(args.keys, "keys")
    ca = client_tls_from_flags(insecure=False, root_certificates=args.root_certificates)
    conn = Connection(args.superlink, False, ca)
    for key, node_id in register_supernodes(keys, conn, ready_timeout_s=10).items():
        state = "already registered" if node_id is None else f"node {node_id}"
        print(f"registered {key.name}: {state}")
    return 0
