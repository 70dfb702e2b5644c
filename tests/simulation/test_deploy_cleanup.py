"""The deployment engine's cleanup reaches the flwr CLI's processes too.

A SIGTERM that lands while ``flwr run`` is being started (between the fork and
``Popen`` returning) leaves a child that no ``with`` block waits for; the
engine's ``finally`` must stop it like the SuperLink and SuperNodes. The Flower
processes are replaced by stand-ins, so this runs in a second.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from common.cli import Terminated
from server.launch import FLWR_HOME_DIR
from simulation import deploy_engine

from .test_ray_engine import _procs_under


def test_a_cli_child_left_by_sigterm_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    children: list[subprocess.Popen[bytes]] = []

    def orphaned_submit(fed: Any, run_dir: Path, conn: Any) -> int:
        env = {**os.environ, "FLWR_HOME": str(run_dir / FLWR_HOME_DIR)}
        cmd = [sys.executable, "-c", "import time; time.sleep(120)"]
        children.append(subprocess.Popen(cmd, env=env, start_new_session=True))
        raise Terminated("signal 15")  # as if it arrived mid-start

    monkeypatch.setattr(deploy_engine, "start_process", lambda *a, **k: None)
    monkeypatch.setattr(deploy_engine, "wait_for_port", lambda *a: True)
    monkeypatch.setattr(deploy_engine, "submit_run", orphaned_submit)
    fed = SimpleNamespace(state_dir=tmp_path / "state", sites=("A",))
    try:
        with pytest.raises(Terminated):
            deploy_engine.run_federated_deployment(
                fed,  # type: ignore[arg-type]
                {"A": tmp_path / "cache-A"},
                tmp_path / "run",
            )
        deadline = time.monotonic() + 10
        while children[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert children[0].poll() is not None, "the flwr CLI's child survived"
        assert _procs_under(tmp_path) == {}
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
            c.wait()
