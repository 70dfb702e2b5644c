"""Launch a federated run on a running SuperLink with ``flwr run`` and follow it.

Each run gets its own ``FLWR_HOME`` (``<run_dir>/flwr-home``) whose
``config.toml`` names the SuperLink, so nothing depends on ``~/.flwr``. The
federation config travels inline as the run-config key ``federation-json``
(absolute paths resolved on the coordinator), the run directory as ``run-dir``.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from common.flower_cli import flower_bin, flower_env
from common.wire.federation import (
    RUN_DIR,
    RUN_FEDERATION_JSON,
    FederationConfig,
    federation_config_to_json,
    round_problems,
)
from common.wire.runfolder import CHECKPOINT_DIR, ROUNDS_JSONL, iter_round_rows
from server.faults import outcome_status
from server.process import ProcessError, wait_for_port, write_flower_config

log = logging.getLogger(__name__)

#: Repo root (holds pyproject.toml with [tool.flwr.app]).
APP_DIR = Path(__file__).resolve().parents[1]
FLWR_HOME_DIR = "flwr-home"
RUN_CONFIG_TOML = "run-config.toml"


@dataclass(frozen=True)
class Connection:
    """How to reach the SuperLink's Control API."""

    address: str = "127.0.0.1:8000"
    insecure: bool = False
    root_certificates: Path | None = None


def run_flwr(
    args: Sequence[str],
    env: Mapping[str, str],
    timeout_s: float,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``flwr *args`` (output captured), whatever its exit code.

    Raises :class:`ProcessError` when it does not end within ``timeout_s``.
    """
    cmd = [flower_bin("flwr"), *args]
    try:
        return subprocess.run(
            cmd,
            env=dict(env),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ProcessError(f"{' '.join(cmd)}: no answer in {timeout_s:.0f} s") from exc


def _flwr(args: list[str], home: Path, timeout_s: float) -> str:
    res = run_flwr(args, flower_env(home), timeout_s)
    if res.returncode != 0:
        tail = (res.stdout + res.stderr).strip().splitlines()[-5:]
        raise ProcessError(f"{' '.join(res.args)} failed ({res.returncode}): {tail}")
    return res.stdout


def find_json(text: str) -> dict[str, Any] | None:
    """The last JSON object ``flwr --format json`` printed (``None`` if none)."""
    lines = [ln.strip() for ln in reversed(text.strip().splitlines())]
    for candidate in [*(ln for ln in lines if ln.startswith("{")), text]:
        try:
            return dict(json.loads(candidate))
        except json.JSONDecodeError:
            continue
    return None


def _flwr_json(args: list[str], home: Path, timeout_s: float) -> dict[str, Any]:
    """The JSON object ``flwr *args --format json`` printed."""
    text = _flwr([*args, "--format", "json"], home, timeout_s)
    found = find_json(text)
    if found is None:
        raise ProcessError(f"flwr printed no JSON: {text[-300:]!r}")
    return found


def _require_success(payload: Mapping[str, Any], what: str) -> None:
    """Raise :class:`ProcessError` (one line) when ``flwr`` reported a failure.

    ``flwr ls`` exits 0 with ``{"success": false, "error-message": ...}`` when
    the SuperLink cannot be reached.
    """
    if payload.get("success", True) is False:
        lines = str(payload.get("error-message", "")).strip().splitlines()
        reason = next(
            (ln.strip() for ln in reversed(lines) if ln.strip()), "no error message"
        )
        raise ProcessError(f"{what}: {reason}")


def write_run_config(cfg: FederationConfig, run_dir: Path) -> Path:
    """``<run_dir>/run-config.toml`` for ``flwr run --run-config`` (inline config)."""
    run_toml = run_dir / RUN_CONFIG_TOML
    run_toml.write_text(
        tomli_w.dumps(
            {RUN_FEDERATION_JSON: federation_config_to_json(cfg), RUN_DIR: str(run_dir)}
        )
    )
    return run_toml


def prepare_home(run_dir: Path, conn: Connection) -> Path:
    """Create ``<run_dir>/flwr-home/config.toml`` for ``conn``; returns the home."""
    home = run_dir / FLWR_HOME_DIR
    write_flower_config(
        home,
        conn.address,
        insecure=conn.insecure,
        root_certificates=conn.root_certificates,
    )
    return home


def submit_run(
    cfg: FederationConfig,
    run_dir: Path,
    conn: Connection,
    *,
    app_dir: Path = APP_DIR,
    app: str | None = None,
    timeout_s: float = 120.0,
) -> int:
    """Start the run on the SuperLink; returns its run id.

    ``app``: a signed app spec ``@publisher/name==x.y.z`` (``mammofed-server
    sign-app``; the SuperLink fetches it from the signed-app registry). Without
    it the FAB is built from ``app_dir`` unsigned, which a hospital started
    with ``--trusted-entities`` refuses.
    """
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    home = prepare_home(run_dir, conn)
    run_toml = write_run_config(cfg, run_dir)
    args = ["run", app or str(app_dir), "mammofed", "--run-config", str(run_toml)]
    payload = _flwr_json(args, home, timeout_s)
    if not payload.get("success") or payload.get("run-id") is None:
        raise ProcessError(f"flwr run did not start a run: {payload}")
    run_id = int(payload["run-id"])
    log.info("started run %d on %s (run dir %s)", run_id, conn.address, run_dir)
    return run_id


def run_status(run_id: int, home: Path, timeout_s: float = 60.0) -> dict[str, Any]:
    """The ``flwr ls --run-id`` JSON row of ``run_id``."""
    payload = _flwr_json(["ls", "mammofed", "--run-id", str(run_id)], home, timeout_s)
    _require_success(payload, f"flwr ls --run-id {run_id}")
    runs = payload.get("runs") or []
    if not runs:
        raise ProcessError(f"run {run_id} not found on the SuperLink: {payload}")
    return dict(runs[0])


def list_runs(home: Path, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """All runs the SuperLink knows (``flwr ls --format json``)."""
    payload = _flwr_json(["ls", "mammofed"], home, timeout_s)
    _require_success(payload, "flwr ls")
    return [dict(r) for r in payload.get("runs") or []]


def follow_run(
    run_id: int,
    run_dir: Path,
    *,
    timeout_s: float,
    poll_s: float = 2.0,
    status_every_s: float = 5.0,
) -> str:
    """Log each new ``rounds.jsonl`` line until the run finishes; returns its status.

    The file is read every ``poll_s``; the run's status is asked of the
    SuperLink (``flwr ls``, a process of its own costing about a CPU-second)
    only every ``status_every_s``, so following a run does not steal the
    sites' cores.

    Raises :class:`ProcessError` after ``timeout_s`` (the run keeps going on the
    SuperLink; ``flwr stop`` ends it).
    """
    home = run_dir / FLWR_HOME_DIR
    deadline = time.monotonic() + timeout_s
    seen, status, asked = 0, "unknown", -math.inf
    while True:
        if time.monotonic() - asked >= status_every_s:
            asked = time.monotonic()
            status = str(run_status(run_id, home).get("status", "unknown"))
        # the server may be appending: a half-written last line is skipped
        rows = list(iter_round_rows(run_dir / ROUNDS_JSONL))
        for row in rows[seen:]:
            log.info(
                "run %d round %s %s: train %s eval %s, rejected %s",
                run_id,
                row.get("round"),
                row.get("status"),
                row.get("train_aggregated"),
                row.get("evaluate_aggregated"),
                row.get("train", {}).get("rejected"),
            )
            for problem in round_problems(row, rejected=False):
                log.warning("run %d %s", run_id, problem)
        seen = len(rows)
        if status.startswith("finished"):
            return outcome_status(status, run_dir)
        if time.monotonic() > deadline:
            raise ProcessError(
                f"run {run_id} still {status} after {timeout_s:.0f} s "
                f"(checkpoints in {run_dir / CHECKPOINT_DIR})"
            )
        time.sleep(poll_s)


#: What ``flwr supernode register`` reports for a key the SuperLink already has.
KEY_IN_USE = "Public key already in use"


def register_supernode(
    public_key: Path,
    conn: Connection,
    *,
    name: str | None = None,
    timeout_s: float = 60.0,
) -> int | None:
    """Register a SuperNode's OpenSSH public key (``flwr supernode register``).

    Only needed when the SuperLink runs ``--enable-supernode-auth``: a SuperNode
    started with the matching ``--auth-supernode-private-key`` can then
    activate; any other key is refused. Returns the node id, or ``None`` when
    the SuperLink already holds this key (registration persists in its
    ``--database``). Raises :class:`ProcessError` for any other refusal.
    """
    args = ["supernode", "register", str(Path(public_key).resolve()), "mammofed"]
    if name:
        args += ["--name", name]
    with tempfile.TemporaryDirectory(prefix="mammofed-register-") as tmp:
        home = prepare_home(Path(tmp), conn)
        payload = _flwr_json(args, home, timeout_s)
    if payload.get("success") and payload.get("node-id") is not None:
        node_id = int(payload["node-id"])
        log.info("registered SuperNode %s (%s) as node %d", name, public_key, node_id)
        return node_id
    message = str(payload.get("error-message", payload))
    if KEY_IN_USE in message:
        log.info("SuperNode key %s was already registered", public_key)
        return None
    raise ProcessError(f"flwr supernode register {public_key}: {message}")


def unregister_supernode(
    node_id: int, conn: Connection, *, timeout_s: float = 60.0
) -> None:
    """Remove node ``node_id`` from the federation (``flwr supernode unregister``).

    The SuperLink then refuses the node's key: its SuperNode can no longer
    pull messages or send replies, and it is not sampled. A key kept in a
    ``start --register-keys`` folder is registered again when the
    coordinator restarts without ``--database``: remove the file too.
    Raises :class:`ProcessError` naming the node when the SuperLink refuses
    (an unknown id, say).
    """
    args = ["supernode", "unregister", str(int(node_id)), "mammofed"]
    with tempfile.TemporaryDirectory(prefix="mammofed-unregister-") as tmp:
        payload = _flwr_json(args, prepare_home(Path(tmp), conn), timeout_s)
    _require_success(payload, f"flwr supernode unregister {node_id}")
    log.info("unregistered SuperNode %d", node_id)


def register_supernodes(
    public_keys: Sequence[Path],
    conn: Connection,
    *,
    ready_timeout_s: float = 60.0,
) -> dict[Path, int | None]:
    """Wait for the SuperLink at ``conn.address``, then register every key.

    Each node is named after its key file's stem (``site-a.pub`` -> ``site-a``,
    shown by ``flwr supernode list``). Returns key -> node id (``None``: was
    already registered).
    """
    host, _, port = conn.address.rpartition(":")
    if not wait_for_port(host.strip("[]"), int(port), ready_timeout_s):
        raise ProcessError(
            f"SuperLink at {conn.address} not up after {ready_timeout_s:.0f} s; "
            "no SuperNode key registered"
        )
    return {
        Path(key): register_supernode(Path(key), conn, name=Path(key).stem)
        for key in public_keys
    }
