"""One federated regime on Flower's simulation engine (``flwr run`` + Ray).

:func:`run_federated_ray` runs the same ServerApp (``server.app``) and
ClientApp (``client.app``) as a deployment, but through the *local simulation
SuperLink* that ``flwr run`` starts for a ``:local:`` connection: one simulated
node per site (``partition-id`` -> ``fed.sites[pid]``), one CPU per client,
Ray as the backend.

Isolation, so that runs and tests share no hidden state:

* a private ``FLWR_HOME`` (``<run_dir>/flwr-home``) whose ``config.toml`` holds
  the ``:local:`` connection and its simulation options;
* private ports: Flower 1.42 reads the local SuperLink's ports from
  ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` / ``FLWR_LOCAL_CONTROL_API_PORT``
  (defaults 39091 / 39093, see ``flwr/cli/constant.py``). Each run takes two
  free ports, and refuses to start when the HTTP port already answers, because
  ``flwr run`` would otherwise silently submit to someone else's SuperLink;
* ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` (the managed SuperLink is
  started without ``--disable-runtime-dependency-installation``; the variable
  is its equivalent and works offline).

The detached SuperLink ``flwr run`` leaves behind is *always* stopped
afterwards: ``flwr stop`` for the run, then SIGTERM/SIGKILL to every process
whose environment carries this run's ``FLWR_HOME`` (the SuperLink, SuperExec,
ServerApp/simulation processes and Ray's GCS, raylet and workers all inherit
it), found through ``/proc``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from common.errors import MammofedError
from common.fileio import tail_text
from common.flower_cli import flower_env
from common.wire.federation import FederationConfig
from common.wire.runfolder import CHECKPOINT_DIR, ROUNDS_JSONL, complete_rounds
from server.launch import (
    APP_DIR,
    FLWR_HOME_DIR,
    find_json,
    run_flwr,
    write_run_config,
)
from server.process import ProcessError, free_port, wait_for_port, write_flower_config

log = logging.getLogger(__name__)

CONNECTION = "mammofed-sim"
#: Where ``flwr`` puts the managed SuperLink's database and log.
SUPERLINK_LOG = Path("local-superlink") / "superlink.log"
ENV_HTTP_PORT = "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"
ENV_CONTROL_PORT = "FLWR_LOCAL_CONTROL_API_PORT"
ENV_NO_DEPS = "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"
ENV_NO_UPDATE_CHECK = "FLWR_DISABLE_UPDATE_CHECK"


class RayEngineError(MammofedError):
    """The simulation-engine run failed, timed out or could not be started."""


# --- setup --------------------------------------------------------------------------
def cache_root_of(caches: Mapping[str, Path]) -> Path:
    """The folder holding every ``<site>/`` cache (all must be ``ROOT/<site>``)."""
    parents = {Path(p).resolve().parent for p in caches.values()}
    bad = {s: str(p) for s, p in caches.items() if Path(p).name != s}
    if len(parents) != 1 or bad:
        raise RayEngineError(
            "engine 'ray' needs every site cache at ROOT/<site> under one ROOT "
            f"(simulated nodes only know their partition id); got {dict(caches)}"
        )
    return parents.pop()


def write_local_config(home: Path, num_supernodes: int, num_cpus: int = 1) -> Path:
    """``$FLWR_HOME/config.toml`` with one ``:local:`` simulation connection."""
    options = {
        "num-supernodes": int(num_supernodes),
        "backend": {
            "name": "ray",
            "client-resources": {"num-cpus": num_cpus, "num-gpus": 0.0},
        },
    }
    return write_flower_config(
        home, ":local:", insecure=False, connection=CONNECTION, options=options
    )


def engine_env(home: Path, http_port: int, control_port: int) -> dict[str, str]:
    """Environment of ``flwr`` (and, inherited, of the SuperLink and Ray)."""
    env = flower_env(home)
    env[ENV_HTTP_PORT] = str(http_port)
    env[ENV_CONTROL_PORT] = str(control_port)
    env[ENV_NO_DEPS] = "1"
    env[ENV_NO_UPDATE_CHECK] = "1"
    env.pop("RAY_ADDRESS", None)  # never join someone else's Ray cluster
    return env


# --- processes ----------------------------------------------------------------------
def _pids(keep: Callable[[int], bool]) -> list[int]:
    """PIDs (other than this process) for which ``keep(pid)``, ascending."""
    me = os.getpid()
    found = (int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit())
    return sorted(pid for pid in found if pid != me and keep(pid))


def processes_of_home(home: Path) -> list[int]:
    """PIDs (this user's) whose environment has ``FLWR_HOME=<home>``."""
    needle = f"FLWR_HOME={home}".encode()

    def has_home(pid: int) -> bool:
        try:
            env = (Path("/proc") / str(pid) / "environ").read_bytes()
        except OSError:  # gone, or not ours
            return False
        return needle in env.split(b"\0")

    return _pids(has_home)


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().split(")")[-1].split()
    except OSError:
        return False
    return bool(state) and state[0] != "Z"


def _session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def kill_home_processes(home: Path, grace_s: float = 10.0) -> list[int]:
    """SIGTERM, then SIGKILL, every process of ``home``; returns what was found.

    A process of ``home`` is one whose environment has ``FLWR_HOME=<home>``,
    or one in the same session as such a process: Ray starts its agents
    (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) with a cleaned
    environment, and they would outlive the run by a minute or more. Our own
    session is never included (processes are started in new sessions).
    """
    found: set[int] = set()
    own = _session_of(0)
    sessions: set[int] = set()

    def members() -> list[int]:
        pids = processes_of_home(home)
        sessions.update(s for p in pids if (s := _session_of(p)) is not None)
        sessions.discard(own)  # type: ignore[arg-type]
        in_sessions = _pids(lambda p: _session_of(p) in sessions)
        return sorted(set(pids) | set(in_sessions))

    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        pids = [p for p in members() if _alive(p)]
        if not pids:
            break
        found.update(pids)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
    left = [p for p in members() if _alive(p)]
    if left:
        log.error("processes of %s survived SIGKILL: %s", home, left)
    return sorted(found)


def _flwr(
    args: list[str], env: Mapping[str, str], timeout_s: float
) -> subprocess.CompletedProcess[str]:
    try:
        return run_flwr(args, env, timeout_s, cwd=APP_DIR)
    except ProcessError as exc:
        raise RayEngineError(str(exc)) from exc


def log_tail(home: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of the managed SuperLink's log, under its path."""
    path = home / SUPERLINK_LOG
    return f"SuperLink log ({path}):\n{tail_text(path, lines)}"


def _run_row(run_id: int, env: Mapping[str, str]) -> dict[str, Any]:
    """``flwr ls --run-id`` row of ``run_id`` (``{}`` when unknown)."""
    res = _flwr(
        ["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], env, 60.0
    )
    runs = (find_json(res.stdout) or {}).get("runs") or []
    return dict(runs[0]) if runs else {}


def _stop(home: Path, env: Mapping[str, str], run_id: int | None, port: int) -> None:
    """``flwr stop``, then kill every process of ``home``.

    ``flwr stop`` is sent only while our SuperLink answers: against a dead
    ``:local:`` connection ``flwr`` would start a fresh SuperLink.
    """
    if run_id is not None and wait_for_port("127.0.0.1", port, 0.5):
        try:
            res = _flwr(["stop", str(run_id), CONNECTION], env, 30.0)
            log.info("flwr stop %d: rc %d", run_id, res.returncode)
        except RayEngineError as exc:
            log.warning("%s", exc)
    killed = kill_home_processes(home)
    log.info("stopped %d process(es) of %s", len(killed), home)


# --- the run ------------------------------------------------------------------------
def _done(run_dir: Path, rounds: int) -> bool:
    ckpt = run_dir / CHECKPOINT_DIR
    return ckpt.is_dir() and rounds in complete_rounds(ckpt)


def _jsonl_has(run_dir: Path, rounds: int) -> bool:
    path = run_dir / ROUNDS_JSONL
    if not path.is_file():
        return False
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("round") == rounds:
                return True
        except json.JSONDecodeError:
            continue
    return False


def run_federated_ray(
    fed: FederationConfig,
    caches: dict[str, Path],
    run_dir: Path,
    *,
    timeout_s: float,
    poll_s: float = 1.0,
    status_every_s: float = 15.0,
) -> None:
    """Run ``fed`` on the local simulation SuperLink + Ray; wait for the last round.

    ``run_dir`` is the server's run folder (``run-dir``); the run is done once
    ``run_dir/checkpoints`` holds round ``fed.num_rounds``. The SuperLink and
    every process it started are stopped afterwards, whatever happened.

    Raises:
        RayEngineError: the run could not start, failed, or did not reach its
            last round within ``timeout_s`` (the message ends with the tail of
            the SuperLink log).
    """
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    home = run_dir / FLWR_HOME_DIR
    if home.exists():
        kill_home_processes(home)
        shutil.rmtree(home)
    opts = {**fed.trainer.options, "cache_root": str(cache_root_of(caches))}
    trainer = dataclasses.replace(fed.trainer, options=opts)
    fed = dataclasses.replace(fed, trainer=trainer, run_dir=run_dir)
    write_local_config(home, len(fed.sites))
    http_port, control_port = free_port(), free_port()
    while control_port == http_port:
        control_port = free_port()
    env = engine_env(home, http_port, control_port)
    run_toml = write_run_config(fed, run_dir)
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    run_id: int | None = None
    try:
        res = _flwr(
            ["run", str(APP_DIR), CONNECTION, "--run-config", str(run_toml)]
            + ["--format", "json"],
            env,
            max(30.0, min(180.0, timeout_s)),
        )
        payload = find_json(res.stdout) or {}
        if res.returncode != 0 or not payload.get("success"):
            out = (res.stdout + res.stderr).strip().splitlines()[-8:]
            raise RayEngineError(
                f"flwr run failed (rc {res.returncode}): {out}\n{log_tail(home)}"
            )
        run_id = int(payload["run-id"])
        log.info(
            "[%s] run %d on the local simulation SuperLink 127.0.0.1:%d "
            "(%d nodes, FLWR_HOME %s)",
            fed.name,
            run_id,
            http_port,
            len(fed.sites),
            home,
        )
        # Only a process of our FLWR_HOME may serve our port; anything else
        # means flwr run reached someone else's SuperLink.
        if not processes_of_home(home):
            raise RayEngineError(
                f"[{fed.name}] run {run_id} went to a SuperLink on 127.0.0.1:"
                f"{http_port} that this run did not start (port taken by a "
                "concurrent run?); retry"
            )
        last_status, next_status = "", 0.0
        while not _done(run_dir, fed.num_rounds):
            now = time.monotonic()
            if now > deadline:
                raise RayEngineError(
                    f"[{fed.name}] run {run_id}: no checkpoint of round "
                    f"{fed.num_rounds} in {run_dir / CHECKPOINT_DIR} after "
                    f"{timeout_s:.0f} s (status {last_status or 'unknown'})\n"
                    + log_tail(home)
                )
            if not wait_for_port("127.0.0.1", http_port, 0.5):
                raise RayEngineError(
                    f"[{fed.name}] the local SuperLink on port {http_port} is gone\n"
                    + log_tail(home)
                )
            if now >= next_status:
                # each `flwr ls` is a new Python process: poll it sparingly
                next_status = now + status_every_s
                row = _run_row(run_id, env)
                status = str(row.get("status", "unknown"))
                if status != last_status:
                    log.info("[%s] run %d: %s", fed.name, run_id, status)
                    last_status = status
                if status.startswith("finished") and not _done(run_dir, fed.num_rounds):
                    raise RayEngineError(
                        f"[{fed.name}] run {run_id} {status} without a checkpoint "
                        f"of round {fed.num_rounds}: {row}\n{log_tail(home)}"
                    )
            time.sleep(poll_s)
        # the round's rounds.jsonl line follows its checkpoint: give it a moment
        grace = time.monotonic() + 30.0
        while not _jsonl_has(run_dir, fed.num_rounds) and time.monotonic() < grace:
            time.sleep(0.5)
        log.info(
            "[%s] run %d reached round %d in %.0f s",
            fed.name,
            run_id,
            fed.num_rounds,
            time.monotonic() - t0,
        )
    finally:
        _stop(home, env, run_id, http_port)
