"""One SuperLink + two SuperNodes as real processes on loopback (--insecure)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from common.flower_cli import flower_bin, flower_env
from common.wire.federation import NODE_SITE, NODE_STATE_DIR
from common.wire.runfolder import CHECKPOINT_DIR
from server.checkpoints import CheckpointStore
from server.launch import Connection, follow_run, submit_run
from server.process import (
    free_port,
    start_process,
    superlink_command,
    wait_for_port,
)
from tests.conftest import loopback_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SITES = ("site-a", "site-b")


def test_two_rounds_superlink_two_supernodes(
    tmp_path: Path, flower_procs: list[subprocess.Popen[bytes]]
) -> None:
    cfg = loopback_config(tmp_path)
    init = dict(np.load(tmp_path / "init.npz"))

    port = free_port()
    procs = flower_procs  # stopped by the fixture, also when the test fails
    procs.append(
        start_process(
            superlink_command(port=port, insecure=True),
            log_path=tmp_path / "superlink.log",
            env=flower_env(tmp_path / "home-superlink"),
            cwd=tmp_path,
        )
    )
    assert wait_for_port("127.0.0.1", port, 60), "SuperLink did not come up"
    for site in SITES:
        node_config = f'{NODE_SITE}="{site}" {NODE_STATE_DIR}="{tmp_path / "state"}"'
        cmd = [
            flower_bin("flower-supernode"),
            "--insecure",
            "--superlink",
            f"127.0.0.1:{port}",
            "--node-config",
            node_config,
            "--port",
            str(free_port()),
        ]
        procs.append(
            start_process(
                cmd,
                log_path=tmp_path / f"{site}.log",
                env=flower_env(tmp_path / f"home-{site}"),
                cwd=tmp_path,
            )
        )
    run_dir = tmp_path / "run"
    run_id = submit_run(cfg, run_dir, Connection(f"127.0.0.1:{port}", True))
    status = follow_run(run_id, run_dir, timeout_s=150, poll_s=1.0)
    assert status == "finished:completed", (tmp_path / "superlink.log").read_text()[
        -3000:
    ]

    store = CheckpointStore(run_dir / CHECKPOINT_DIR)
    assert store.rounds() == [0, 1, 2]
    last = store.latest()
    assert last is not None and set(last.arrays) == set(init)
    assert any(not np.allclose(last.arrays[k], init[k]) for k in init), (
        "global model never changed"
    )
    for site in SITES:
        st = tmp_path / "state" / site
        with np.load(st / "personal.npz") as z:
            personal = set(z.files)
        assert personal and not personal & set(last.arrays)
        # personal names never reached the server's disk
        server_files = " ".join(
            p.read_text(errors="ignore") for p in run_dir.rglob("*.json*")
        )
        assert not any(name in server_files for name in personal)
