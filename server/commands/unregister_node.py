"""``mammofed-server unregister-node``: remove nodes from a running SuperLink."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "unregister-node"
HELP = "remove SuperNodes (by node id) from a SuperLink started --enable-supernode-auth"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``unregister-node``."""
    parser.add_argument(
        "node_ids",
        type=int,
        nargs="+",
        help="node ids (`register-node` printed them; `flwr supernode ls` lists them)",
    )
    parser.add_argument("--superlink", default="127.0.0.1:8000", help="host:port")
    parser.add_argument(
        "--root-certificates", type=Path, required=True, help="CA of the SuperLink"
    )


def run(args: argparse.Namespace) -> int:
    """Unregister each node; print what happened. Exit 1 if any was refused."""
    from common.wire.tls import client_tls_from_flags
    from server.launch import Connection, unregister_supernode
    from server.process import ProcessError

    ca = client_tls_from_flags(insecure=False, root_certificates=args.root_certificates)
    conn = Connection(args.superlink, False, ca)
    failed = 0
    for node_id in args.node_ids:
        try:
            unregister_supernode(node_id, conn)
        except ProcessError as exc:
            print(f"node {node_id}: refused: {exc}")
            failed += 1
        else:
            print(f"unregistered node {node_id}")
    return 1 if failed else 0
