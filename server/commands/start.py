"""``mammofed-server start``: run the SuperLink in the foreground."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.federation import flower_env
from server.process import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    TlsFiles,
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
    parser.add_argument("--ssl-ca-certfile", type=Path)
    parser.add_argument("--ssl-certfile", type=Path)
    parser.add_argument("--ssl-keyfile", type=Path)
    parser.add_argument("--database", type=Path, help="SuperLink state database")
    parser.add_argument("--enable-supernode-auth", action="store_true")
    parser.add_argument(
        "--flwr-home", type=Path, help="FLWR_HOME of the SuperLink (default: inherit)"
    )


def run(args: argparse.Namespace) -> int:
    """Start the SuperLink and wait for it to exit."""
    tls_parts = (args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile)
    tls = TlsFiles(*tls_parts) if all(tls_parts) else None
    cmd = superlink_command(
        host=args.host,
        port=args.port,
        insecure=args.insecure,
        tls=tls,
        database=args.database,
        enable_supernode_auth=args.enable_supernode_auth,
    )
    return run_foreground(cmd, env=flower_env(args.flwr_home))
