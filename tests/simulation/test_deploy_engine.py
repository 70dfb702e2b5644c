"""``mammofed-sim run --engine deployment``: a loopback SuperLink and one
SuperNode process per site run the personalized regime of the tiny test
scenario; the study reads the sites' rows (metrics, their own compute time)
from their state, and every process is gone afterwards, also on failure."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from common.errors import MammofedError
from common.wire import runfolder as RF
from server.checkpoints import CheckpointStore
from simulation import regimes as R
from simulation.run import RunRequest, regime_config, run_federated, run_study

from .test_ray_engine import FEDERATION, SCENARIO, _procs_under

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def deploy_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deploy")
    req = RunRequest(
        scenario=SCENARIO,
        federation=FEDERATION,
        out=out / "run",
        regimes=(R.PERSONALIZED,),
        # relative to the working directory, as typed on a command line: the
        # SuperNodes (started in their own folders) must get it resolved
        data=Path("data"),
        workers=1,
        n_boot=20,
        engine=R.ENGINE_DEPLOYMENT,
        engine_timeout_s=240.0,
    )
    cwd = Path.cwd()
    os.chdir(out)
    try:
        return run_study(req)
    finally:
        os.chdir(cwd)
        assert _procs_under(out) == {}, "processes of the run survived"


def test_personalized_on_supernodes(deploy_study: Path) -> None:
    server = deploy_study / R.PERSONALIZED / "server"
    store = CheckpointStore(server / "checkpoints")
    last = store.latest()
    assert last is not None and last.round >= 1
    data = json.loads((deploy_study / R.PERSONALIZED / RF.METRICS_JSON).read_text())
    assert data["sites"], "no site was evaluated"
    rows = [
        json.loads(x)
        for x in (deploy_study / R.PERSONALIZED / RF.ROUNDS_JSONL)
        .read_text()
        .splitlines()
    ]
    shared = sum(np.asarray(v).nbytes for v in store.load(1).arrays.values())
    round1 = [r for r in rows if r["round"] == 1]
    every_site = json.loads((deploy_study / RF.RUN_JSON).read_text())["sites"]
    assert {r["site"] for r in round1} == set(every_site)
    for r in round1:
        assert r["bytes_sent"] == shared
        # the site's own compute time, recorded on its disk, never sent
        assert r["train_seconds"] > 0
    evaluated = [r for r in round1 if "evaluate_seconds" in r]
    assert evaluated and all(r["evaluate_seconds"] > 0 for r in evaluated)
    # each site's personal state is on its own disk only
    for site in data["sites"]:
        personal = deploy_study / R.PERSONALIZED / "site-state" / site / "personal.npz"
        with np.load(personal) as z:
            assert set(z.files).isdisjoint(last.arrays)


def test_failure_stops_every_process(tmp_path: Path) -> None:
    from common.wire.federation import load_federation_config

    req = RunRequest(
        scenario=SCENARIO,
        federation=FEDERATION,
        out=tmp_path / "run",
        regimes=(R.FEDAVG,),
    )
    sites = ["A", "B"]
    cfg = regime_config(
        load_federation_config(FEDERATION), R.FEDAVG, req, tmp_path / "run", sites
    )
    # a cache folder that does not exist: every ClientApp fails. Whether the
    # engine times out (DeploymentEngineError) or the run ends with no round
    # aggregated, the study fails loudly naming the site error, and the engine
    # must still stop the SuperLink and nodes.
    caches = {s: tmp_path / "missing" / s for s in sites}
    assert cfg.run_dir is not None
    with pytest.raises(MammofedError, match="after|site data missing"):
        run_federated(
            R.FEDAVG, cfg, caches, tmp_path / "run", 0,
            engine=R.ENGINE_DEPLOYMENT, timeout_s=30.0,
        )  # fmt: skip
    assert _procs_under(tmp_path) == {}


def test_sigterm_stops_the_run_and_every_process(
    deploy_study: Path, tmp_path: Path
) -> None:
    """``kill <mammofed-sim pid>`` mid-run: exit 143 and no process left."""
    import signal
    import subprocess
    import sys
    import time

    data = deploy_study.parent / "data"  # the fixture's sites: no phantom again
    cmd = [sys.executable, "-m", "simulation.cli", "run", "--scenario", str(SCENARIO)]
    cmd += ["--federation", str(FEDERATION), "--out", str(tmp_path / "run")]
    cmd += ["--data", str(data), "--regime", R.FEDAVG, "--engine", "deployment"]
    log = tmp_path / "sim.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2]
        )
    try:
        deadline = time.monotonic() + 120
        while not any("flower-supernode" in c for c in _procs_under(tmp_path).values()):
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "no SuperNode came up"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 143, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "terminated (SIGTERM)" in log.read_text()
    assert _procs_under(tmp_path) == {}, "processes of the run survived"


def test_supernodes_reproduce_the_inprocess_engine_bit_for_bit(
    deploy_study: Path, tmp_path: Path
) -> None:
    """Same seeds, same data: every global checkpoint and every site's personal
    state of the SuperNode run equal the in-process run's, to the bit (the
    server aggregates in a content order, not in order of arrival)."""
    req = RunRequest(
        scenario=SCENARIO,
        federation=FEDERATION,
        out=tmp_path / "run",
        regimes=(R.PERSONALIZED,),
        data=deploy_study.parent / "data",
        workers=1,
        n_boot=20,
    )
    inproc = run_study(req)
    a = CheckpointStore(deploy_study / R.PERSONALIZED / "server" / "checkpoints")
    b = CheckpointStore(inproc / R.PERSONALIZED / "server" / "checkpoints")
    assert a.rounds() == b.rounds() and len(a.rounds()) >= 2
    for rnd in a.rounds():
        ca, cb = a.load(rnd).arrays, b.load(rnd).arrays
        assert ca.keys() == cb.keys()
        for k in ca:
            np.testing.assert_array_equal(ca[k], cb[k], err_msg=f"round {rnd} {k}")
    states = [x / R.PERSONALIZED / "site-state" for x in (deploy_study, inproc)]
    sites = sorted(p.name for p in states[0].iterdir() if p.is_dir())
    assert sites
    for site in sites:
        with (
            np.load(states[0] / site / "personal.npz") as pa,
            np.load(states[1] / site / "personal.npz") as pb,
        ):
            assert set(pa.files) == set(pb.files)
            for k in pa.files:
                np.testing.assert_array_equal(pa[k], pb[k], err_msg=f"{site} {k}")


def test_overhead_figures_of_a_finished_deployment_run(
    deploy_study: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import federation as bench
    from benchmarks.common import RESULTS_ENV

    monkeypatch.setenv(RESULTS_ENV, str(tmp_path))
    bench._from_run(deploy_study / R.PERSONALIZED)
    lines = [
        json.loads(x) for x in (tmp_path / "federation.jsonl").read_text().splitlines()
    ]
    got = {d["figure"]: d for d in lines}
    assert got["bytes_per_site_per_round"]["value"] > 0
    wall = got["median_round_wall_s"]["value"]
    compute = got["median_slowest_site_compute_s"]["value"]
    assert wall > compute > 0
    frac = got["median_round_overhead_fraction"]["value"]
    assert 0 < frac < 1
    assert got["median_round_wall_s"]["context"]["engine"] == "deployment"
