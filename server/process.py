"""Starting and stopping Flower processes (SuperLink, ``flwr`` CLI) safely.

Every child starts in its own session (process group), so :func:`stop_process`
can end it together with whatever it spawned (``flower-superexec``,
``flwr-serverapp``) and nothing is left running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from common.errors import MammofedError
from common.flower_cli import flower_bin
from common.wire.tls import TlsFiles, is_loopback

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


class ProcessError(MammofedError):
    """A Flower process could not be started or did not come up."""


def superlink_command(
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    insecure: bool = False,
    tls: TlsFiles | None = None,
    database: Path | None = None,
    enable_supernode_auth: bool = False,
    extra: Sequence[str] = (),
) -> list[str]:
    """``flower-superlink`` argv (runtime dependency installation disabled).

    ``host`` must be a loopback address: Flower 1.42 serves the Fleet, Control
    (unauthenticated: register nodes, start runs, i.e. ship code to every
    hospital) and Runtime APIs on this one listener, so it never faces the
    network; SuperNodes reach the Fleet API through
    :class:`server.fleet_gateway.FleetGateway` on the public address.
    Exactly one of ``insecure`` or ``tls`` (files must exist; passed as absolute
    paths). ``enable_supernode_auth`` needs ``tls``: Flower 1.42 exits otherwise.
    """
    if not is_loopback(host):
        raise ProcessError(
            f"--host {host}: the SuperLink listens on loopback only (its Control "
            "API is unauthenticated); SuperNodes dial the Fleet gateway "
            "(mammofed-server start --fleet-host/--fleet-port)"
        )
    if insecure == (tls is not None):
        raise ProcessError("give exactly one of --insecure or the three TLS files")
    if enable_supernode_auth and tls is None:
        raise ProcessError("--enable-supernode-auth needs TLS, not --insecure")
    cmd = [flower_bin("flower-superlink"), "--host", host, "--port", str(port)]
    cmd.append("--disable-runtime-dependency-installation")
    if insecure:
        cmd.append("--insecure")
    if tls is not None:
        for flag, path in (
            ("--ssl-ca-certfile", tls.ca_certfile),
            ("--ssl-certfile", tls.certfile),
            ("--ssl-keyfile", tls.keyfile),
        ):
            if not Path(path).is_file():
                raise ProcessError(f"{flag}: file does not exist: {path}")
            cmd += [flag, str(Path(path).resolve())]
    if database is not None:
        cmd += ["--database", str(database)]
    if enable_supernode_auth:
        cmd.append("--enable-supernode-auth")
    return cmd + list(extra)


def connect_address(host: str, port: int) -> str:
    """``host:port`` a local client dials to reach a server listening on ``host``.

    A wildcard listen address (``0.0.0.0``, ``::``) is reached via loopback.
    """
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: ports :func:`free_port` handed out in this process (never handed twice)
_HANDED: set[int] = set()
#: Linux's default ephemeral range, when ``ip_local_port_range`` cannot be read
_EPHEMERAL_DEFAULT = (32768, 60999)


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's ephemeral (``bind(0)`` / outgoing) port range."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        lo, hi = (int(v) for v in text.split())
    except (OSError, ValueError):
        return _EPHEMERAL_DEFAULT
    return (lo, hi) if 1024 < lo <= hi else _EPHEMERAL_DEFAULT


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port free on ``host`` right now, below the ephemeral range.

    The port is chosen now and bound later by another process, so it must
    not be one the kernel may hand to someone else meanwhile: a ``bind(0)``
    port is an ephemeral one, and every ``bind(0)`` in any process (Flower's
    SuperNode picks its own internal ports that way) and every outgoing
    connection draws from the same range, so a SuperNode once found its
    ``--port`` taken by its own helper server. Ports are drawn at random
    from the 10000 below the ephemeral range instead, and none is handed out
    twice in one process; ``bind(0)`` only when none of those is free.
    """
    lo = ephemeral_port_range()[0]
    first = max(1025, lo - 10000)
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(first, lo)
        if port not in _HANDED and _bindable(host, port):
            _HANDED.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = int(s.getsockname()[1])
    _HANDED.add(port)
    return port


def wait_for_port(host: str, port: int, timeout_s: float) -> bool:
    """True once ``host:port`` accepts TCP connections, False after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def start_process(
    cmd: Sequence[str],
    *,
    log_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a new process group; output to ``log_path`` if given."""
    out = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            list(cmd),
            stdout=out if out is not None else None,
            stderr=subprocess.STDOUT if out is not None else None,
            env=dict(env) if env is not None else None,
            cwd=str(cwd) if cwd is not None else None,
            start_new_session=True,
        )
    except OSError as exc:
        raise ProcessError(f"cannot start {cmd[0]}: {exc}") from exc
    finally:
        if out is not None:
            out.close()
    log.info("started pid %d: %s", proc.pid, " ".join(cmd))
    return proc


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM the process group of ``proc``, then SIGKILL what is left."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = None
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        if pgid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
        try:
            proc.wait(timeout=wait)
            if pgid is None:
                return
            # the leader is gone; make sure its group is too
            os.killpg(pgid, 0)
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return
    log.info("stopped pid %d", proc.pid)


def run_foreground(
    cmd: Sequence[str],
    env: Mapping[str, str] | None = None,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> int:
    """Run ``cmd`` until it exits; Ctrl-C / SIGTERM stop its whole group.

    ``on_start(proc)`` runs once the process is started (e.g. to register
    SuperNode keys once the SuperLink listens); if it raises, the process is
    stopped and the exception propagates.
    """
    proc = start_process(cmd, env=env)
    previous = signal.signal(signal.SIGTERM, lambda *_: stop_process(proc))
    try:
        if on_start is not None:
            on_start(proc)
        return proc.wait()
    except KeyboardInterrupt:
        stop_process(proc)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            stop_process(proc)


def write_flower_config(
    flwr_home: Path,
    address: str,
    *,
    insecure: bool,
    root_certificates: Path | None = None,
    connection: str = "mammofed",
    options: Mapping[str, object] | None = None,
) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one default SuperLink connection.

    ``address`` is the SuperLink's ``host:port`` (Control API; one listener in
    Flower 1.42 serves Control, Fleet and Runtime APIs), or ``:local:`` for
    the simulation SuperLink ``flwr run`` starts (set up by ``options``).
    """
    import tomli_w

    flwr_home.mkdir(parents=True, exist_ok=True)
    conn: dict[str, object] = {"address": address}
    if insecure:
        conn["insecure"] = True
    elif root_certificates is not None:
        conn["root-certificates"] = str(Path(root_certificates).resolve())
    if options is not None:
        conn["options"] = dict(options)
    path = flwr_home / "config.toml"
    path.write_text(
        tomli_w.dumps({"superlink": {"default": connection, connection: conn}})
    )
    return path
