"""``mammofed-client start``: run this site's SuperNode in the foreground."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
from pathlib import Path

from common.config.site import load_site_config
from common.errors import ConfigError
from common.federation import NODE_SITE_CONFIG, flower_env, supernode_argv
from common.tls import client_tls_from_flags

NAME = "start"
HELP = "start this site's SuperNode (connects to the SuperLink, runs the ClientApp)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``start``."""
    parser.add_argument("--site", type=Path, required=True, help="site YAML")
    parser.add_argument("--superlink", default="127.0.0.1:8000", help="host:port")
    parser.add_argument("--insecure", action="store_true", help="no TLS (tests only)")
    parser.add_argument("--root-certificates", type=Path, help="CA of the SuperLink")
    parser.add_argument(
        "--auth-key",
        type=Path,
        help="node auth private key (`mammofed-server node-key`; needs TLS)",
    )
    parser.add_argument(
        "--port", type=int, default=9094, help="local ClientApp runtime port"
    )
    parser.add_argument("--flwr-home", type=Path, help="FLWR_HOME of the SuperNode")


def supernode_command(args: argparse.Namespace) -> list[str]:
    """``flower-supernode`` argv for the site named by ``args.site``.

    Exactly one of ``--insecure`` or ``--root-certificates`` (the SuperLink's
    CA); ``--auth-key`` (OpenSSH EC private key whose public half the
    coordinator registered) needs TLS. Raises :class:`ConfigError` naming the
    flag otherwise.
    """
    site_path = Path(args.site).resolve()
    site = load_site_config(site_path)
    if site.state_dir is None:
        raise ConfigError(str(site_path), "state_dir", "is required to federate")
    ca = client_tls_from_flags(
        insecure=args.insecure,
        root_certificates=args.root_certificates,
        auth_key=args.auth_key,
    )
    return supernode_argv(
        args.superlink,
        {NODE_SITE_CONFIG: str(site_path)},
        args.port,
        root_certificates=ca,
        auth_key=None if args.auth_key is None else Path(args.auth_key).resolve(),
    )


def run(args: argparse.Namespace) -> int:
    """Run the SuperNode until it exits or is interrupted."""
    cmd = supernode_command(args)
    proc = subprocess.Popen(cmd, env=flower_env(args.flwr_home), start_new_session=True)

    def _stop(*_: object) -> None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        _stop()
        proc.wait(timeout=15)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            _stop()
