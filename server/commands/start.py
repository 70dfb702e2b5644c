"""``mammofed-server start``: run the SuperLink in the foreground."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from common.federation import flower_env
from common.tls import check_superlink_auth_flags, server_tls_from_flags
from server.launch import Connection, register_supernodes
from server.process import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    connect_address,
    run_foreground,
    superlink_command,
)

NAME = "start"
HELP = "start the SuperLink (Fleet, Control and Runtime APIs on one port)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``start``."""
    parser.add_argument("--host", default=DEFAULT_HOST, help="listen address")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="listen port")
    parser.add_argument("--insecure", action="store_true", help="no TLS (tests only)")
    parser.add_argument(
        "--tls-dir",
        type=Path,
        help="directory from `mammofed-server certs` (ca.crt, server.pem, server.key)",
    )
    parser.add_argument("--ssl-ca-certfile", type=Path, help="instead of --tls-dir")
    parser.add_argument("--ssl-certfile", type=Path, help="instead of --tls-dir")
    parser.add_argument("--ssl-keyfile", type=Path, help="instead of --tls-dir")
    parser.add_argument("--database", type=Path, help="SuperLink state database")
    parser.add_argument(
        "--enable-supernode-auth",
        action="store_true",
        help="only registered SuperNode keys may connect (needs TLS)",
    )
    parser.add_argument(
        "--register-keys",
        type=Path,
        nargs="+",
        default=[],
        metavar="PUB",
        help="SuperNode public keys (*.pub files or directories of them) to "
        "register once the SuperLink is up (needs --enable-supernode-auth)",
    )
    parser.add_argument(
        "--flwr-home", type=Path, help="FLWR_HOME of the SuperLink (default: inherit)"
    )


def run(args: argparse.Namespace) -> int:
    """Start the SuperLink, register the given node keys, wait for it to exit."""
    tls = server_tls_from_flags(
        insecure=args.insecure,
        tls_dir=args.tls_dir,
        ca_certfile=args.ssl_ca_certfile,
        certfile=args.ssl_certfile,
        keyfile=args.ssl_keyfile,
    )
    keys = check_superlink_auth_flags(
        tls=tls,
        enable_supernode_auth=args.enable_supernode_auth,
        register_keys=args.register_keys,
    )
    cmd = superlink_command(
        host=args.host,
        port=args.port,
        insecure=tls is None,
        tls=tls,
        database=args.database,
        enable_supernode_auth=args.enable_supernode_auth,
    )

    def _register(_proc: subprocess.Popen[bytes]) -> None:
        assert tls is not None  # keys imply auth, auth implies TLS
        conn = Connection(
            connect_address(args.host, args.port), False, tls.ca_certfile.resolve()
        )
        for key, node_id in register_supernodes(keys, conn).items():
            state = "already registered" if node_id is None else f"node {node_id}"
            print(f"registered {key.name}: {state}", flush=True)

    return run_foreground(
        cmd, env=flower_env(args.flwr_home), on_start=_register if keys else None
    )
