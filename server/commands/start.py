"""``mammofed-server start``: run the SuperLink in the foreground.

The SuperLink (Fleet, Control and Runtime APIs on one listener) binds to
loopback only; ``--fleet-host/--fleet-port`` opens the one public listener,
a gateway that forwards the Fleet API alone (``server.fleet_gateway``);
``--signed-apps`` serves the coordinator's signed apps to the SuperLink on
loopback (``server.app_registry``) so ``mammofed-server run --app
@mammofed/mammofed==x.y.z`` reaches hospitals with its signature.
"""

from __future__ import annotations

import argparse
import subprocess
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import ConfigError, one_line
from server.process import DEFAULT_HOST, DEFAULT_PORT

if TYPE_CHECKING:
    from common.wire.tls import TlsFiles

NAME = "start"
HELP = (
    "start the SuperLink on loopback, the public Fleet gateway and the "
    "signed-app registry"
)
DEFAULT_FLEET_PORT = 9092


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``start``."""
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="SuperLink listen address: loopback only (Control and Runtime APIs "
        "are unauthenticated)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="SuperLink port on loopback (mammofed-server run/status/register-node)",
    )
    parser.add_argument(
        "--fleet-host",
        help="public address of the Fleet gateway SuperNodes dial (e.g. 0.0.0.0); "
        "without it nothing listens beyond loopback",
    )
    parser.add_argument(
        "--fleet-port",
        type=int,
        default=DEFAULT_FLEET_PORT,
        help="port of the Fleet gateway",
    )
    parser.add_argument(
        "--signed-apps",
        type=Path,
        help="directory from `mammofed-server sign-app`: served to the SuperLink "
        "(loopback) so hospitals get signed FABs",
    )
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


def check_tls_contents(tls: TlsFiles, *, tls_dir: bool) -> None:
    """Refuse TLS files whose contents the SuperLink and the gateway cannot load.

    ``ca.crt`` and ``server.pem`` must hold PEM certificates, ``server.key``
    an unencrypted PEM private key whose public half is the server
    certificate's (the first one in ``server.pem``). Raises
    :class:`ConfigError` naming the flag (``--tls-dir`` or the ``--ssl-*``
    flag given) and the file, before anything starts: otherwise ``ssl`` fails
    later with a traceback (``NO_CERTIFICATE_OR_CRL_FOUND``) or the SuperLink
    exits with its own.
    """
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    from common.wire.tls import COMMAND_LINE

    def flag(own: str) -> str:
        return "--tls-dir" if tls_dir else own

    def read(path: Path, own: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(
                COMMAND_LINE, flag(own), f"{path} is not readable ({one_line(exc)})"
            ) from None

    certs: dict[str, list[x509.Certificate]] = {}
    for path, own in (
        (tls.ca_certfile, "--ssl-ca-certfile"),
        (tls.certfile, "--ssl-certfile"),
    ):
        try:
            certs[own] = x509.load_pem_x509_certificates(read(path, own))
        except ValueError:
            raise ConfigError(
                COMMAND_LINE, flag(own), f"{path} is not a PEM certificate"
            ) from None
    try:
        key = serialization.load_pem_private_key(
            read(tls.keyfile, "--ssl-keyfile"), password=None
        )
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            COMMAND_LINE,
            flag("--ssl-keyfile"),
            f"{tls.keyfile} is not an unencrypted PEM private key",
        ) from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != certs["--ssl-certfile"][
        0
    ].public_key().public_bytes(der, spki):
        raise ConfigError(
            COMMAND_LINE,
            flag("--ssl-keyfile"),
            f"{tls.keyfile} is not the private key of {tls.certfile}",
        )


def run(args: argparse.Namespace) -> int:
    """Start registry and gateway, then the SuperLink; stop all when it exits."""
    from common.flower_cli import flower_env
    from common.wire.tls import (
        COMMAND_LINE,
        check_superlink_auth_flags,
        is_loopback,
        server_tls_from_flags,
    )
    from server.app_registry import HUB_URL_ENV, AppRegistry
    from server.fleet_gateway import FleetGateway, GatewayConfig
    from server.launch import Connection, register_supernodes
    from server.process import connect_address, run_foreground, superlink_command

    tls = server_tls_from_flags(
        insecure=args.insecure,
        tls_dir=args.tls_dir,
        ca_certfile=args.ssl_ca_certfile,
        certfile=args.ssl_certfile,
        keyfile=args.ssl_keyfile,
    )
    if tls is not None:
        check_tls_contents(tls, tls_dir=args.tls_dir is not None)
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
    gateway_cfg = None
    if args.fleet_host is not None:
        if tls is None and not is_loopback(args.fleet_host):
            raise ConfigError(
                COMMAND_LINE,
                "--fleet-host",
                f"{args.fleet_host}: a public Fleet gateway needs TLS, not --insecure",
            )
        if not args.enable_supernode_auth and not is_loopback(args.fleet_host):
            # without it the SuperLink lets any caller register a node: anyone
            # holding the public ca.crt would get every round's global model
            # and could send updates
            raise ConfigError(
                COMMAND_LINE,
                "--fleet-host",
                f"{args.fleet_host}: a public Fleet gateway needs "
                "--enable-supernode-auth (only registered node keys may join)",
            )
        gateway_cfg = GatewayConfig(args.fleet_host, args.fleet_port, args.port, tls)
    env = flower_env(args.flwr_home)

    def _register(_proc: subprocess.Popen[bytes]) -> None:
        assert tls is not None  # keys imply auth, auth implies TLS
        conn = Connection(
            connect_address(args.host, args.port), False, tls.ca_certfile.resolve()
        )
        for key, node_id in register_supernodes(keys, conn).items():
            state = "already registered" if node_id is None else f"node {node_id}"
            print(f"registered {key.name}: {state}", flush=True)

    with ExitStack() as stack:
        if args.signed_apps is not None:
            registry = stack.enter_context(AppRegistry(args.signed_apps))
            env[HUB_URL_ENV] = registry.url
            print(f"signed apps from {args.signed_apps} (registry {registry.url})")
        if gateway_cfg is not None:
            stack.enter_context(FleetGateway(gateway_cfg))
            print(
                f"Fleet gateway on {args.fleet_host}:{args.fleet_port} "
                "(the only port SuperNodes need)",
                flush=True,
            )
        print(f"Control API (this host only): {connect_address(args.host, args.port)}")
        return run_foreground(cmd, env=env, on_start=_register if keys else None)
