"""A federated regime on Flower's simulation engine (``flwr run`` + Ray).

Runs fedavg of the tiny test scenario through ``engine="ray"`` (local
simulation SuperLink, one node per site, 1 CPU per client), then a run that
cannot finish in time, and checks that no process of either run's private
FLWR_HOME survives (SuperLink, SuperExec, simulation, Ray).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")

from common.wire import runfolder as RF  # noqa: E402
from common.wire.federation import load_federation_config  # noqa: E402
from server.checkpoints import CheckpointStore  # noqa: E402
from simulation import regimes as R  # noqa: E402
from simulation.ray_engine import (  # noqa: E402
    CONNECTION,
    FLWR_HOME_DIR,
    RayEngineError,
    cache_root_of,
    run_federated_ray,
    write_local_config,
)
from simulation.run import RunRequest, regime_config, run_study  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SCENARIO = REPO / "configs" / "simulation" / "test.yaml"
FEDERATION = REPO / "configs" / "federation" / "sim-test.yaml"


def _procs_under(prefix: Path) -> dict[int, str]:
    """{pid: command} of live processes whose FLWR_HOME lies under ``prefix``."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if stat.split(")")[-1].split()[0] == "Z":
            continue
        for var in env:
            if var.startswith(b"FLWR_HOME=") and Path(var[10:].decode()).is_relative_to(
                prefix
            ):
                found[int(entry.name)] = cmd[:120]
    return found


def test_local_config_is_what_flower_reads(tmp_path: Path) -> None:
    import tomllib

    from flwr.cli.flower_config import parse_superlink_connection

    path = write_local_config(tmp_path / "home", num_supernodes=5)
    data = tomllib.loads(path.read_text())["superlink"]
    assert data["default"] == CONNECTION
    conn = parse_superlink_connection(data[CONNECTION], CONNECTION)
    assert conn.address == ":local:"
    assert conn.options is not None and conn.options.num_supernodes == 5
    assert conn.options.backend is not None
    assert conn.options.backend.client_resources is not None
    assert conn.options.backend.client_resources.num_cpus == 1


def test_cache_root_needs_one_root_of_site_folders(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    assert cache_root_of({"A": root / "A", "B": root / "B"}) == root.resolve()
    with pytest.raises(RayEngineError, match="ROOT/<site>"):
        cache_root_of({"A": root / "A", "B": tmp_path / "other" / "B"})
    with pytest.raises(RayEngineError, match="ROOT/<site>"):
        cache_root_of({"A": root / "x"})


@pytest.fixture(scope="module")
def ray_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ray")
    req = RunRequest(
        scenario=SCENARIO,
        federation=FEDERATION,
        out=out / "run",
        regimes=(R.FEDAVG,),
        data=out / "data",
        workers=1,
        n_boot=20,
        engine="ray",
        engine_timeout_s=240.0,
    )
    before = _ray_agents()
    try:
        return run_study(req)
    finally:
        assert _procs_under(out) == {}, "processes of the run survived"
        # Ray's agents run without FLWR_HOME; they must be gone too
        assert _ray_agents() - before == set(), "Ray agents of the run survived"


def _ray_agents() -> set[int]:
    """PIDs of live ``ray::`` processes (Ray's agents name themselves so)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if cmd.startswith(b"ray::") and stat.split(")")[-1].split()[0] != "Z":
            found.add(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.integration
def test_fedavg_on_ray_writes_checkpoint_and_site_metrics(ray_study: Path) -> None:
    server = ray_study / R.FEDAVG / "server"
    store = CheckpointStore(server / "checkpoints")
    assert 1 in store.rounds()
    # the SuperLink ran from this run's own FLWR_HOME
    assert (server / FLWR_HOME_DIR / "config.toml").is_file()
    data = json.loads((ray_study / R.FEDAVG / RF.METRICS_JSON).read_text())
    assert data["regime"] == R.FEDAVG and data["kind"] == "federated"
    assert {"A", "C"} <= set(data["sites"])  # the sites with test women
    for site in data["sites"].values():
        assert set(site["classes"]["mass"]) >= {"cpm", "sensitivity_at_fp", "ap"}
    # every site trained round 1 on its own partition; bytes = shared arrays
    rows = [
        json.loads(x)
        for x in (ray_study / R.FEDAVG / RF.ROUNDS_JSONL).read_text().splitlines()
    ]
    assert {r["site"] for r in rows} == {"A", "B", "C", "D", "E"}
    shared = sum(np.asarray(v).nbytes for v in store.load(1).arrays.values())
    assert all(r["round"] == 1 and r["bytes_sent"] == shared for r in rows)
    assert _procs_under(ray_study) == {}


@pytest.mark.slow
@pytest.mark.integration
def test_timeout_raises_and_stops_superlink_and_ray(
    ray_study: Path, tmp_path: Path
) -> None:
    fed = load_federation_config(FEDERATION)
    req = RunRequest(scenario=SCENARIO, federation=FEDERATION, out=tmp_path)
    sites = ["A", "B", "C", "D", "E"]
    cfg = dataclasses.replace(
        regime_config(fed, R.FEDAVG, req, tmp_path, sites), num_rounds=1000
    )
    assert cfg.run_dir is not None
    caches = {s: ray_study.parent / "data" / "cache" / s for s in sites}
    seen: set[str] = set()
    stop = threading.Event()
    before = _ray_agents()

    def watch() -> None:
        while not stop.wait(1.0):
            seen.update(_procs_under(tmp_path).values())

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        with pytest.raises(RayEngineError, match="after 60 s") as exc:
            run_federated_ray(cfg, caches, cfg.run_dir, timeout_s=60.0)
    finally:
        stop.set()
        t.join()
    assert "SuperLink log" in str(exc.value)
    # Ray was up when the timeout hit, and nothing of it is left
    assert any("raylet" in c or "gcs_server" in c for c in seen), seen
    assert _procs_under(tmp_path) == {}
    assert _ray_agents() - before == set(), "Ray agents of the run survived"
