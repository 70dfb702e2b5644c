"""The server's run loop: initialize or resume, then round after round.

:func:`run_federation` drives a guarded strategy (``server.strategies``) with
its own loop instead of ``Strategy.start`` so that a resumed run continues at
the right round number. Each round:

1. train: sample (bounded wait) -> send -> screen replies -> FedAvg, or keep
   the previous global model when too few updates are valid;
2. evaluate: sample -> send -> screen -> weighted average of metrics;
3. checkpoint the global arrays (+ config, round, metrics);
4. append one JSON line to ``<run_dir>/rounds.jsonl`` (per-node metrics,
   rejections with node and check) and log one progress line.

Round 0 is the initial global model: from the last checkpoint (resume), from
``initial_arrays`` (``.npz``), or from one site's trainer via a ``query``
message.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common.config.loader import config_to_dict, write_resolved
from common.errors import CheckpointMismatch, MammofedError
from common.federation import (
    CHECKPOINT_DIR,
    ROUNDS_JSONL,
    FederationConfig,
    FitInstructions,
    arrays_to_record,
    record_to_arrays,
)
from common.fileio import load_arrays
from common.keys import ARRAYS_KEY, CONFIG_KEY
from server.checkpoints import CheckpointStore
from server.strategies import GuardedFedAvg, build_strategy, wait_for_nodes
from server.validation import Screened

log = logging.getLogger(__name__)


class FederationError(MammofedError):
    """The run cannot go on (no initial model, incompatible checkpoint...)."""


@dataclass
class RunSummary:
    """What :func:`run_federation` did."""

    run_dir: Path
    start_round: int
    last_round: int
    rounds: list[dict[str, Any]] = field(default_factory=list)


def _metrics_dict(record: MetricRecord | None) -> dict[str, Any]:
    return {} if record is None else {k: v for k, v in record.items()}


def _screen_summary(screened: Screened | None) -> dict[str, Any]:
    if screened is None:
        return {"valid": 0, "per_node": {}, "rejected": [], "failed": []}
    return {
        "valid": len(screened.valid),
        "per_node": {str(k): v for k, v in sorted(screened.per_node.items())},
        "rejected": [r.as_dict() for r in screened.rejected],
        "failed": [r.as_dict() for r in screened.failed],
    }


def query_initial_arrays(grid: Grid, cfg: FederationConfig) -> dict[str, np.ndarray]:
    """Ask connected sites, one at a time, for their trainer's initial arrays."""
    p = cfg.participation
    nodes = wait_for_nodes(grid, 1, p.wait_for_nodes_s)
    if not nodes:
        raise FederationError(
            f"no node connected within {p.wait_for_nodes_s:.0f} s to supply the "
            "initial model (set initial_arrays or start the sites)"
        )
    config = FitInstructions.from_federation(cfg, 0).to_config_record()
    for node in nodes:
        msg = Message(RecordDict({CONFIG_KEY: config}), node, MessageType.QUERY)
        replies = list(grid.send_and_receive([msg], timeout=p.round_timeout_s))
        for reply in replies:
            if reply.has_error():
                log.warning("query: node %d failed: %s", node, reply.error.reason)
                continue
            record = reply.content.array_records.get(ARRAYS_KEY)
            if record is None or len(record) == 0:
                log.warning("query: node %d sent no arrays", node)
                continue
            arrays = record_to_arrays(record)
            bad = [k for k, a in arrays.items() if not np.all(np.isfinite(a))]
            if bad:
                log.warning("query: node %d sent non-finite arrays %s", node, bad)
                continue
            log.info("initial model: %d arrays from node %d", len(arrays), node)
            return arrays
        if not replies:
            log.warning("query: node %d did not reply in time", node)
    raise FederationError("no node supplied a usable initial model")


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_arrays(path)
    except (OSError, ValueError) as exc:
        raise FederationError(f"{path}: cannot read initial arrays: {exc}") from exc


def _check_resume(cfg: FederationConfig, meta: Mapping[str, Any], where: Path) -> None:
    old = meta.get("config", {})
    for key in ("strategy", "personalization", "trainer"):
        want = config_to_dict(getattr(cfg, key))
        if key in old and old[key].get("name", None) != want.get("name", None):
            raise CheckpointMismatch(
                f"{where}: checkpoint was made with {key} {old[key]!r}, "
                f"config asks for {want!r}"
            )
    if "personalization" in old and old["personalization"] != config_to_dict(
        cfg.personalization
    ):
        raise CheckpointMismatch(
            f"{where}: checkpoint personalization {old['personalization']!r} differs "
            f"from config {config_to_dict(cfg.personalization)!r}"
        )


def run_federation(
    grid: Grid,
    cfg: FederationConfig,
    run_dir: Path,
    *,
    strategy: GuardedFedAvg | None = None,
) -> RunSummary:
    """Run (or resume) ``cfg.num_rounds`` rounds; returns what happened."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_resolved(cfg, run_dir)
    store = CheckpointStore(run_dir / CHECKPOINT_DIR)
    strategy = strategy or build_strategy(cfg)
    strategy.summary()
    cfg_dict = config_to_dict(cfg)

    last = store.latest() if cfg.resume else None
    if last is not None:
        _check_resume(cfg, last.meta, store.paths(last.round)[1])
        arrays, start = last.arrays, last.round
        log.info("resuming from round %d (%s)", start, store.paths(start)[0])
    else:
        if cfg.initial_arrays is not None:
            arrays = _load_npz(cfg.initial_arrays)
        else:
            arrays = query_initial_arrays(grid, cfg)
        start = 0
        store.save(0, arrays, metrics={}, config=cfg_dict)
    summary = RunSummary(run_dir=run_dir, start_round=start, last_round=start)
    jsonl = run_dir / ROUNDS_JSONL
    timeout = cfg.participation.round_timeout_s

    for rnd in range(start + 1, cfg.num_rounds + 1):
        t0 = time.monotonic()
        global_record: ArrayRecord = arrays_to_record(arrays)
        ins = FitInstructions.from_federation(cfg, rnd)
        msgs = list(
            strategy.configure_train(rnd, global_record, ins.to_config_record(), grid)
        )
        replies = list(grid.send_and_receive(msgs, timeout=timeout)) if msgs else []
        agg_arrays, agg_train = strategy.aggregate_train(rnd, replies)
        status = "aggregated" if agg_arrays is not None else "kept-previous"
        if agg_arrays is not None:
            arrays = record_to_arrays(agg_arrays)
        eval_record = arrays_to_record(arrays)
        emsgs = list(
            strategy.configure_evaluate(rnd, eval_record, ins.to_config_record(), grid)
        )
        ereplies = list(grid.send_and_receive(emsgs, timeout=timeout)) if emsgs else []
        agg_eval = strategy.aggregate_evaluate(rnd, ereplies)
        line: dict[str, Any] = {
            "round": rnd,
            "status": status,
            "seconds": round(time.monotonic() - t0, 3),
            "train_sampled": strategy.sampled.get("train", []),
            "train_replies": len(replies),
            "train": _screen_summary(strategy.last.get("train")),
            "train_aggregated": _metrics_dict(agg_train),
            "evaluate_sampled": strategy.sampled.get("evaluate", []),
            "evaluate": _screen_summary(strategy.last.get("evaluate")),
            "evaluate_aggregated": _metrics_dict(agg_eval),
        }
        store.save(
            rnd,
            arrays,
            metrics={
                "train": line["train_aggregated"],
                "evaluate": line["evaluate_aggregated"],
            },
            config=cfg_dict,
        )
        with jsonl.open("a") as fh:
            fh.write(json.dumps(line, sort_keys=True) + "\n")
        log.info(
            "round %d/%d %s: %d/%d valid updates, %d rejected, train %s, eval %s "
            "(%.1f s)",
            rnd,
            cfg.num_rounds,
            status,
            line["train"]["valid"],
            len(line["train_sampled"]),
            len(line["train"]["rejected"]),
            line["train_aggregated"],
            line["evaluate_aggregated"],
            line["seconds"],
        )
        summary.rounds.append(line)
        summary.last_round = rnd
    log.info(
        "run finished at round %d; checkpoints in %s", summary.last_round, store.dir
    )
    return summary
