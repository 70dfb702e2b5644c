"""``mammofed-sim run --engine deployment``: a loopback SuperLink and one
SuperNode process per site run the personalized regime of the tiny test
scenario; the study reads the sites' rows (metrics, their own compute time)
from their state, and every process is gone afterwards, also on failure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from server.checkpoints import CheckpointStore
from simulation import regimes as R
from simulation.deploy_engine import DeploymentEngineError, run_federated_deployment
from simulation.run import RunRequest, _regime_config, run_study

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
        data=out / "data",
        workers=1,
        n_boot=20,
        engine=R.ENGINE_DEPLOYMENT,
        engine_timeout_s=240.0,
    )
    try:
        return run_study(req)
    finally:
        assert _procs_under(out) == {}, "processes of the run survived"


def test_personalized_on_supernodes(deploy_study: Path) -> None:
    server = deploy_study / R.PERSONALIZED / "server"
    store = CheckpointStore(server / "checkpoints")
    last = store.latest()
    assert last is not None and last.round >= 1
    data = json.loads((deploy_study / R.PERSONALIZED / R.METRICS_JSON).read_text())
    assert data["sites"], "no site was evaluated"
    rows = [
        json.loads(x)
        for x in (deploy_study / R.PERSONALIZED / R.ROUNDS_JSONL)
        .read_text()
        .splitlines()
    ]
    shared = sum(np.asarray(v).nbytes for v in store.load(1).arrays.values())
    round1 = [r for r in rows if r["round"] == 1]
    every_site = json.loads((deploy_study / R.RUN_JSON).read_text())["sites"]
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
    from common.federation import load_federation_config

    req = RunRequest(
        scenario=SCENARIO,
        federation=FEDERATION,
        out=tmp_path / "run",
        regimes=(R.FEDAVG,),
    )
    sites = ["A", "B"]
    cfg = _regime_config(
        load_federation_config(FEDERATION), R.FEDAVG, req, tmp_path / "run", sites
    )
    # a cache folder that does not exist: the ClientApps fail, the run cannot
    # finish in time, and the engine must still stop the SuperLink and nodes
    caches = {s: tmp_path / "missing" / s for s in sites}
    assert cfg.run_dir is not None
    with pytest.raises(DeploymentEngineError):
        run_federated_deployment(cfg, caches, cfg.run_dir, timeout_s=30.0)
    assert _procs_under(tmp_path) == {}
