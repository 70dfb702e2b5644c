"""``mammofed-client start``: run this site's SuperNode in the foreground, supervised.

The SuperNode is restarted whenever it exits without being asked to (after a
SuperLink restart Flower's SuperNode shuts itself down on a refused heartbeat):
one log line per restart, waiting ``--restart-delay`` seconds doubled after
each quick failure up to ``--restart-max-delay`` (a SuperNode that ran at least
``--restart-max-delay`` seconds restarts after the first delay again).
SIGTERM or Ctrl-C stops the SuperNode's whole process group and ends the
command with status 0 (SIGTERM) or 130 (Ctrl-C). Flower's gRPC health service
(``grpc.health.v1``, always SERVING while the SuperNode runs) listens on
``--health-address``; see docs/install.md, Operating the daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from common.errors import ConfigError

log = logging.getLogger(__name__)

#: Default address of the SuperNode's gRPC health service (loopback only).
DEFAULT_HEALTH_ADDRESS = "127.0.0.1:9095"

NAME = "start"
HELP = "start this site's SuperNode (connects to the SuperLink, runs the ClientApp)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``start``."""
    parser.add_argument("--site-config", type=Path, required=True, help="site YAML")
    parser.add_argument("--superlink", default="127.0.0.1:8000", help="host:port")
    parser.add_argument("--insecure", action="store_true", help="no TLS (tests only)")
    parser.add_argument("--root-certificates", type=Path, help="CA of the SuperLink")
    parser.add_argument(
        "--auth-key",
        type=Path,
        help="node auth private key (`mammofed-server node-key`; needs TLS)",
    )
    parser.add_argument(
        "--trusted-entities",
        type=Path,
        help="trusted-entities.yaml from the coordinator (`mammofed-server "
        "signing-key`): run only apps signed by its key (required with TLS)",
    )
    parser.add_argument(
        "--allow-unsigned-apps",
        action="store_true",
        help="run any app the SuperLink sends (no --trusted-entities; demos only)",
    )
    parser.add_argument(
        "--port", type=int, default=9094, help="local ClientApp runtime port"
    )
    parser.add_argument("--flwr-home", type=Path, help="FLWR_HOME of the SuperNode")
    parser.add_argument(
        "--health-address",
        default=DEFAULT_HEALTH_ADDRESS,
        help="host:port of the SuperNode's gRPC health service ('' disables it)",
    )
    parser.add_argument(
        "--restart-delay",
        type=float,
        default=2.0,
        help="seconds before the first restart of an exited SuperNode",
    )
    parser.add_argument(
        "--restart-max-delay",
        type=float,
        default=120.0,
        help="longest wait between restarts (the delay doubles up to it)",
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="give up after this many restarts in a row (0: never give up)",
    )


def supernode_command(args: argparse.Namespace) -> list[str]:
    """``flower-supernode`` argv for the site of ``args.site_config``.

    Exactly one of ``--insecure`` or ``--root-certificates`` (the SuperLink's
    CA); ``--auth-key`` (OpenSSH EC private key whose public half the
    coordinator registered) needs TLS. With TLS, ``--trusted-entities`` (the
    node runs only apps signed by those keys) is required unless
    ``--allow-unsigned-apps``. Raises :class:`ConfigError` naming the flag
    otherwise.
    """
    from client.supernode import supernode_argv
    from common.config.site import load_site_config
    from common.wire.federation import NODE_SITE_CONFIG
    from common.wire.tls import (
        COMMAND_LINE,
        client_tls_from_flags,
        is_loopback,
        split_host,
    )

    site_path = Path(args.site_config).resolve()
    site = load_site_config(site_path)
    if site.state_dir is None:
        raise ConfigError(str(site_path), "state_dir", "is required to federate")
    ca = client_tls_from_flags(
        insecure=args.insecure,
        root_certificates=args.root_certificates,
        auth_key=args.auth_key,
    )
    host = split_host(str(args.superlink))
    if ca is None and not is_loopback(host):
        # --insecure is for tests and demos on one machine: a site's updates
        # and the global model would cross the network in the clear, and any
        # machine on the path could pose as the SuperLink
        raise ConfigError(
            COMMAND_LINE,
            "--insecure",
            f"only to a SuperLink on this machine (loopback), not {host!r}; "
            "a remote one needs --root-certificates (the coordinator's ca.crt)",
        )
    trusted = trusted_entities_from_flags(
        tls=ca is not None,
        trusted_entities=getattr(args, "trusted_entities", None),
        allow_unsigned=getattr(args, "allow_unsigned_apps", False),
    )
    policy = None if site.apps is None else site.apps.policy()
    if policy is not None and policy.active and trusted is None:
        raise ConfigError(
            str(site_path),
            "apps",
            "limits when apps were signed, which needs --trusted-entities "
            "(the coordinator's trusted-entities.yaml)",
        )
    return supernode_argv(
        args.superlink,
        {NODE_SITE_CONFIG: str(site_path)},
        args.port,
        root_certificates=ca,
        auth_key=None if args.auth_key is None else Path(args.auth_key).resolve(),
        trusted_entities=trusted,
        app_policy=policy,
    )


def trusted_entities_from_flags(
    *, tls: bool, trusted_entities: Path | None, allow_unsigned: bool
) -> Path | None:
    """The checked ``--trusted-entities`` file (absolute), or ``None``.

    A SuperNode without it runs whatever app the SuperLink sends, so over TLS
    (a real deployment) it is required unless ``--allow-unsigned-apps``.
    """
    if trusted_entities is not None and allow_unsigned:
        raise ConfigError(
            "command line",
            "--allow-unsigned-apps",
            "cannot be combined with --trusted-entities",
        )
    if trusted_entities is None:
        if tls and not allow_unsigned:
            raise ConfigError(
                "command line",
                "--trusted-entities",
                "required with TLS: the coordinator's trusted-entities.yaml "
                "(or --allow-unsigned-apps to run any app, demos only)",
            )
        return None
    from common.wire.app_signing import read_trusted_entities

    read_trusted_entities(trusted_entities)  # Flower only exits with a code
    return Path(trusted_entities).resolve()


def health_argv(address: str) -> list[str]:
    """``--health-server-address`` for ``flower-supernode`` (none when empty)."""
    address = address.strip()
    if not address:
        return []
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            "command line", "--health-address", f"not host:port: {address!r}"
        )
    return ["--health-server-address", address]


@dataclass(frozen=True)
class RestartPolicy:
    """How an exited SuperNode is restarted.

    Attributes:
        delay_s: wait before the first restart.
        max_delay_s: the wait doubles after each restart up to this; a
            SuperNode that ran at least this long starts over at ``delay_s``.
        max_restarts: restarts in a row before giving up (0: never).
    """

    delay_s: float = 2.0
    max_delay_s: float = 120.0
    max_restarts: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.delay_s <= self.max_delay_s:
            raise ConfigError(
                "command line",
                "--restart-delay",
                f"must be > 0 and <= --restart-max-delay ({self.max_delay_s}), "
                f"got {self.delay_s}",
            )
        if self.max_restarts < 0:
            raise ConfigError(
                "command line",
                "--max-restarts",
                f"must be >= 0, got {self.max_restarts}",
            )


def _stop_group(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> int:
    """SIGTERM the process group of ``proc``, SIGKILL it after ``timeout_s``."""
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    # the leader is gone; make sure nothing of its group outlives it
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def supervise(
    cmd: Sequence[str],
    env: Mapping[str, str] | None,
    policy: RestartPolicy,
    *,
    stop: threading.Event | None = None,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> int:
    """Run ``cmd`` (own process group), restarting it when it exits on its own.

    Returns 0 once ``stop`` is set (SIGTERM sets it when called from the main
    thread), or the last exit status after ``policy.max_restarts`` restarts in
    a row. Ctrl-C stops the group and propagates. The process group is stopped
    on every way out.
    """
    stop = stop or threading.Event()
    proc: subprocess.Popen[bytes] | None = None

    def _on_sigterm(signum: int, frame: FrameType | None) -> None:
        stop.set()
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    delay, restarts = policy.delay_s, 0
    try:
        while not stop.is_set():
            started = time.monotonic()
            proc = subprocess.Popen(list(cmd), env=env, start_new_session=True)
            log.info("SuperNode started (pid %d)", proc.pid)
            if on_start is not None:
                on_start(proc)
            while proc.poll() is None and not stop.wait(0.2):
                pass
            if stop.is_set():
                break
            code = proc.returncode
            _stop_group(proc)  # what it left behind (flwr-clientapp, ...)
            ran = time.monotonic() - started
            if ran >= policy.max_delay_s:
                delay, restarts = policy.delay_s, 0
            if policy.max_restarts and restarts >= policy.max_restarts:
                log.error(
                    "SuperNode exited with status %d after %.0f s; %d restarts in a "
                    "row, giving up",
                    code,
                    ran,
                    restarts,
                )
                return code if code != 0 else 1
            restarts += 1
            log.warning(
                "SuperNode exited with status %d after %.0f s; restart %d in %.0f s",
                code,
                ran,
                restarts,
                delay,
            )
            if stop.wait(delay):
                break
            delay = min(delay * 2, policy.max_delay_s)
        return 0
    finally:
        if proc is not None:
            _stop_group(proc)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if stop.is_set():
            log.info("SuperNode stopped")


def run(args: argparse.Namespace) -> int:
    """Run the SuperNode, restarted when it exits, until SIGTERM or Ctrl-C."""
    from common.flower_cli import flower_env

    policy = RestartPolicy(
        args.restart_delay, args.restart_max_delay, args.max_restarts
    )
    cmd = supernode_command(args) + health_argv(args.health_address)
    try:
        return supervise(cmd, flower_env(args.flwr_home), policy)
    except KeyboardInterrupt:
        return 130
