"""End to end: phantom -> ingest -> central and federated regimes -> report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.federation import load_federation_config
from common.model import build_detector, norm_keys
from server.checkpoints import CheckpointStore
from simulation import regimes as R
from simulation.report import write_report
from simulation.run import RunRequest, run_study

REPO = Path(__file__).resolve().parents[2]
SCENARIO = REPO / "configs" / "simulation" / "test.yaml"
FEDERATION = REPO / "configs" / "federation" / "sim-test.yaml"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("study")
    req = RunRequest(
        scenario=SCENARIO,
        federation=FEDERATION,
        out=out / "run",
        regimes=(R.BASE, R.FEDAVG, R.PERSONALIZED, R.ORACLE),
        data=out / "data",
        workers=1,
        n_boot=20,
    )
    return run_study(req)


@pytest.mark.slow
def test_every_regime_writes_per_site_metrics(study: Path) -> None:
    for regime in (R.BASE, R.FEDAVG, R.PERSONALIZED, R.ORACLE):
        data = json.loads((study / regime / R.METRICS_JSON).read_text())
        assert data["regime"] == regime
        # sites A and C have test women in the test scenario
        assert {"A", "C"} <= set(data["sites"])
        for site in data["sites"].values():
            for cls in ("mass", "calcification"):
                c = site["classes"][cls]
                assert set(c) >= {"cpm", "cpm_ci", "sensitivity", "ap", "curve"}


@pytest.mark.slow
def test_federated_rounds_log_bytes_and_personal_state_stays_on_site(
    study: Path,
) -> None:
    rows = [
        json.loads(x)
        for x in (study / R.PERSONALIZED / R.ROUNDS_JSONL).read_text().splitlines()
    ]
    assert rows and all(r["bytes_sent"] > 0 for r in rows if "bytes_sent" in r)
    fed = load_federation_config(FEDERATION)
    from client.detector_trainer import DetectorOptions

    opts = DetectorOptions(**dict(fed.trainer.options))
    model = build_detector(opts.model_config())
    sd = model.state_dict()
    nkeys = set(norm_keys(model))
    last = CheckpointStore(study / R.PERSONALIZED / "server" / "checkpoints").latest()
    assert last is not None and last.round == 1
    # FedBN: no norm layer reached the server; the sent bytes are the shared
    # float32 arrays plus a small per-array header (numpy's .npy format).
    assert not nkeys & set(last.arrays)
    shared_bytes = sum(np.asarray(v).nbytes for v in last.arrays.values())
    overhead = 256 * len(last.arrays)
    for r in rows:
        if "bytes_sent" in r:
            assert shared_bytes <= r["bytes_sent"] <= shared_bytes + overhead
    # each site keeps its norm layers and personal head on its own disk
    for site in ("A", "B", "C"):
        npz = np.load(study / R.PERSONALIZED / "site-state" / site / "personal.npz")
        assert nkeys <= set(npz.files)
        assert any(k.startswith("personal-head/") for k in npz.files)
        k = sorted(nkeys)[0]
        assert npz[k].shape == tuple(sd[k].shape)


@pytest.mark.slow
def test_report_from_study(study: Path, tmp_path: Path) -> None:
    md = write_report([study], tmp_path / "report")
    text = md.read_text()
    assert "## CPM: mass" in text and "| A |" in text
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["regimes"] == [R.BASE, R.FEDAVG, R.PERSONALIZED, R.ORACLE]
