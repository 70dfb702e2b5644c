"""Federation overhead: bytes each site sends per round, and round overhead.

Runs one federated regime (default ``personalized``) of a phantom scenario with
the detector through the in-process engine (``simulation.grid``), then reports
from the grid's reply log and the server's ``rounds.jsonl``:

* ``bytes_per_site_per_round``: array bytes in each site's train reply;
* ``shared_fraction_of_model``: shared bytes / whole model bytes (what FedBN and
  the personal head keep at home);
* ``round_wall_s`` and ``sites_compute_s`` (sum of the sites' train+evaluate
  time; in-process the sites run one after another);
* ``round_overhead_fraction`` = (round wall - sites' compute) / round wall: the
  server side (sampling, validation, aggregation, checkpointing, record
  serialization).

With ``--engine deployment`` the same regime runs on a loopback SuperLink with
one SuperNode *process* per site (``simulation.deploy_engine``): the sites train
in parallel, so the critical path is the slowest site, and the figures are
``slowest_site_compute_s`` (slowest train + slowest evaluate of the round, each
site's own time from its state on disk) and ``round_overhead_fraction`` =
(round wall - slowest site's compute) / round wall: messaging over HTTP,
ClientApp process start-up, serialization, validation, aggregation, checkpoint.

Usage: ``python -m benchmarks.federation [--scenario F] [--federation F]
[--engine inprocess|deployment] [--threads N]``.

``--from-run RUN/REGIME`` measures nothing new: it reads a finished
``mammofed-sim run --engine deployment`` regime folder (its per-site rows and
the server's ``rounds.jsonl``) and emits the same deployment figures for it,
plus the medians over its rounds (``median_round_wall_s``,
``median_slowest_site_compute_s``, ``median_round_overhead_fraction``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import emit
from common.detector.model import build_detector
from common.fileio import read_jsonl
from common.keys import RESOLVED_CONFIG_YAML
from common.wire import runfolder as RF
from common.wire.federation import FederationConfig, load_federation_config
from simulation import regimes as R
from simulation.run import RunRequest, prepare_sites, regime_config

REPO = Path(__file__).resolve().parents[1]
BENCH = "federation"


def main() -> None:
    """Run the benchmark and emit one JSON line per figure."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", default=str(REPO / "configs/simulation/test.yaml"))
    ap.add_argument(
        "--federation", default=str(REPO / "configs/federation/sim-test.yaml")
    )
    ap.add_argument("--regime", default=R.PERSONALIZED)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--engine", choices=("inprocess", "deployment"), default="inprocess"
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads per site")
    ap.add_argument(
        "--from-run",
        type=Path,
        default=None,
        help="a finished deployment regime folder to read instead of running",
    )
    args = ap.parse_args()
    if args.from_run is not None:
        return _from_run(args.from_run)
    if args.engine == "deployment":
        return _deployment(args)
    logging.basicConfig(level=logging.WARNING)
    from client.app import app as client_app
    from client.detector_trainer import DetectorOptions
    from common.wire.federation import RUN_FEDERATION_JSON, federation_config_to_json
    from server.federation import run_federation
    from simulation.grid import InProcessGrid

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        sites, caches, fed = _regime(args, out)
        grid = InProcessGrid(
            client_app,
            {
                100 + i: (s, str(fed.state_dir), str(caches[s]))
                for i, s in enumerate(sites)
            },
            {RUN_FEDERATION_JSON: federation_config_to_json(fed)},
        )
        assert fed.run_dir is not None
        run_federation(grid, fed, fed.run_dir)
        rounds = list(RF.iter_round_rows(fed.run_dir / RF.ROUNDS_JSONL))
    opts = DetectorOptions(**dict(fed.trainer.options))
    model = build_detector(opts.model_config())
    model_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    ctx = {
        "scenario": Path(args.scenario).name,
        "federation": Path(args.federation).name,
        "regime": args.regime,
        "sites": len(sites),
        "arch": opts.arch,
        "engine": "inprocess",
    }
    sent = [e.bytes_sent for e in grid.log if e.phase == "train" and e.round > 0]
    emit(BENCH, "bytes_per_site_per_round", float(np.mean(sent)), "B", **ctx)
    emit(BENCH, "model_bytes", float(model_bytes), "B", **ctx)
    emit(
        BENCH,
        "shared_fraction_of_model",
        float(np.mean(sent)) / model_bytes,
        "x",
        **ctx,
    )
    for line in rounds:
        r = line["round"]
        compute = sum(e.seconds for e in grid.log if e.round == r)
        _emit_round(r, float(line["seconds"]), "sites_compute_s", compute, ctx)


def _emit_round(
    rnd: int, wall: float, compute_name: str, compute: float, ctx: dict
) -> None:
    """Round wall time, the compute it is measured against, and the overhead."""
    emit(BENCH, "round_wall_s", wall, "s", round=rnd, **ctx)
    emit(BENCH, compute_name, compute, "s", round=rnd, **ctx)
    emit(
        BENCH,
        "round_overhead_fraction",
        (wall - compute) / wall if wall > 0 else float("nan"),
        "x",
        round=rnd,
        **ctx,
    )


def _regime(
    args: argparse.Namespace, out: Path
) -> tuple[list[str], dict[str, Path], FederationConfig]:
    """Sites, caches and the regime's federation config (rounds, threads set)."""
    scenario, caches, _ = prepare_sites(Path(args.scenario), out / "data", 2)
    base = load_federation_config(args.federation)
    req = RunRequest(Path(args.scenario), Path(args.federation), out / "run")
    sites = [s.name for s in scenario.sites]
    fed = regime_config(base, args.regime, req, out / "run", sites)
    opts = dict(fed.trainer.options)
    if args.threads:
        opts["threads"] = args.threads
    fed = dataclasses.replace(
        fed,
        num_rounds=args.rounds,
        trainer=dataclasses.replace(fed.trainer, options=opts),
    )
    return sites, caches, fed


def _deployment(args: argparse.Namespace) -> None:
    """The regime on SuperLink + SuperNode processes; overhead vs slowest site."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from simulation.run import rows_from_site_states, run_federated

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        sites, caches, fed = _regime(args, out)
        opts = dict(fed.trainer.options)
        (out / "run" / args.regime).mkdir(parents=True, exist_ok=True)
        run_federated(args.regime, fed, caches, out / "run", 0, engine="deployment")
        assert fed.run_dir is not None
        rows = rows_from_site_states(fed)
        rounds = list(RF.iter_round_rows(fed.run_dir / RF.ROUNDS_JSONL))
    ctx = {
        "scenario": Path(args.scenario).name,
        "federation": Path(args.federation).name,
        "regime": args.regime,
        "sites": len(sites),
        "arch": opts.get("arch"),
        "threads_per_site": opts.get("threads"),
        "engine": "deployment",
    }
    _emit_deployment(rows, rounds, ctx)


def _emit_deployment(
    rows: list[dict], rounds: list[dict], ctx: dict, *, medians: bool = False
) -> None:
    """Bytes per site, and per round: wall, slowest site's compute, overhead."""
    sent = [r["bytes_sent"] for r in rows if "bytes_sent" in r]
    emit(BENCH, "bytes_per_site_per_round", float(np.mean(sent)), "B", **ctx)
    walls, slowests = [], []
    for line in rounds:
        rnd = line["round"]
        mine = [r for r in rows if r["round"] == rnd]
        slowest = max((r.get("train_seconds", 0.0) for r in mine), default=0.0)
        slowest += max((r.get("evaluate_seconds", 0.0) for r in mine), default=0.0)
        _emit_round(rnd, float(line["seconds"]), "slowest_site_compute_s", slowest, ctx)
        walls.append(float(line["seconds"]))
        slowests.append(slowest)
    if medians and walls:
        wall, slow = float(np.median(walls)), float(np.median(slowests))
        n = {"rounds": len(walls), **ctx}
        emit(BENCH, "median_round_wall_s", wall, "s", **n)
        emit(BENCH, "median_slowest_site_compute_s", slow, "s", **n)
        fractions = [(w - c) / w for w, c in zip(walls, slowests, strict=True) if w > 0]
        emit(
            BENCH,
            "median_round_overhead_fraction",
            float(np.median(fractions)),
            "x",
            **n,
        )


def _from_run(regime_dir: Path) -> None:
    """The deployment figures of a finished ``mammofed-sim run`` regime folder."""
    rows = read_jsonl(regime_dir / RF.ROUNDS_JSONL)
    server = regime_dir / RF.SERVER_DIR
    rounds = list(RF.iter_round_rows(server / RF.ROUNDS_JSONL))
    if not rows or not rounds:
        raise SystemExit(f"{regime_dir}: no rounds recorded (not a finished run?)")
    fed = load_federation_config(server / RESOLVED_CONFIG_YAML)
    opts = dict(fed.trainer.options)
    ctx = {
        "run": str(regime_dir),
        "regime": regime_dir.name,
        "sites": len(fed.sites),
        "arch": opts.get("arch"),
        "threads_per_site": opts.get("threads"),
        "engine": "deployment",
    }
    _emit_deployment(rows, rounds, ctx, medians=True)


if __name__ == "__main__":
    main()
