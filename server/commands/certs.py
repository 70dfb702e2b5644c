"""``mammofed-server certs``: a self-signed CA and the SuperLink's TLS certificate."""

from __future__ import annotations

import argparse

from common.cli import folder_arg
from common.wire.tls import (
    DEFAULT_DAYS,
    DEFAULT_HOSTS,
    LOOPBACK_HOSTS,
    generate_certificates,
    generate_node_key,
    parse_hosts,
)

NAME = "certs"
HELP = "make a CA and a SuperLink TLS certificate (and optionally node auth keys)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``certs``."""
    parser.add_argument(
        "--out", type=folder_arg, required=True, help="output directory"
    )
    parser.add_argument(
        "--hosts",
        default=",".join(DEFAULT_HOSTS),
        help="comma-separated names/IPs SuperNodes dial (certificate SANs); "
        "localhost and 127.0.0.1 are added (the coordinator's own flwr calls)",
    )
    parser.add_argument(
        "--no-loopback",
        action="store_true",
        help="do not add localhost and 127.0.0.1 to --hosts",
    )
    parser.add_argument(
        "--days", type=int, default=DEFAULT_DAYS, help="validity in days"
    )
    parser.add_argument(
        "--sites",
        default="",
        help="comma-separated site names: also write <site>.key/<site>.pub node "
        "auth keys (demos; normally each hospital runs `node-key` itself)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace existing files"
    )


def run(args: argparse.Namespace) -> int:
    """Write the files and say which goes where."""
    hosts = parse_hosts(args.hosts)
    if not args.no_loopback:
        hosts += [h for h in LOOPBACK_HOSTS if h not in hosts]
    files = generate_certificates(
        args.out, hosts, days=args.days, overwrite=args.overwrite
    )
    print(f"server certificate names: {', '.join(hosts)}")
    where = (
        (files.ca_cert, "every SuperNode and flwr user (--root-certificates)"),
        (files.ca_key, "keep offline; only signs a new server certificate"),
        (files.server_cert, "SuperLink only (--ssl-certfile)"),
        (files.server_key, "SuperLink only (--ssl-keyfile)"),
    )
    for path, use in where:
        print(f"{path} -> {use}")
    print(f"start the SuperLink with: mammofed-server start --tls-dir {args.out}")
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    for site in sites:
        keys = generate_node_key(args.out, site, overwrite=args.overwrite)
        print(
            f"node key {site}: {keys.private_key} -> that hospital only "
            f"(--auth-key); {keys.public_key} -> --register-keys"
        )
    return 0
