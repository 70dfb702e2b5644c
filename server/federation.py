"""The server's run loop: initialize or resume, then round after round.

:func:`run_federation` drives a guarded strategy (``server.strategies``) with
its own loop instead of ``Strategy.start`` so that a resumed run continues at
the right round number. Each round:

1. train: sample (bounded wait) -> send -> screen replies -> FedAvg, or keep
   the previous global model when too few updates are valid;
2. evaluate: sample -> send -> screen -> weighted average of metrics;
3. append one JSON line to ``<run_dir>/rounds.jsonl`` (per-node metrics,
   rejections with node and check);
4. checkpoint the global arrays (+ config, round, metrics) and log one
   progress line.

A resumed run starts from the newest checkpoint that loads (a broken newer
one is logged and its round repeated; the last row of a round wins in
``rounds.jsonl``) and refuses one made for another strategy,
personalization, trainer or model shape.

Round 0 is the initial global model: from the last checkpoint (resume), or
made by the server itself (:mod:`server.initial`: ``initial_checkpoint``,
``initial_arrays`` or the configured model with the run's seed), never from a
node's reply.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import Grid

from common.config.loader import config_to_dict, write_resolved
from common.detector.model.initial import initial_shared_arrays
from common.errors import CheckpointMismatch, shown
from common.progress import Eta
from common.wire.federation import (
    FederationConfig,
    FitInstructions,
    arrays_to_record,
    record_to_arrays,
)
from common.wire.runfolder import CHECKPOINT_DIR, ROUNDS_JSONL, append_round_row
from server.checkpoints import CheckpointStore
from server.faults import ModelTracker, attribute_replies, silent_nodes, write_outcome
from server.initial import (
    InitialModelError,
    check_initial_arrays,
    initial_global_arrays,
    initial_personal_defaults,
)
from server.strategies import GuardedFedAvg, build_strategy
from server.validation import Screened, node_of

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What :func:`run_federation` did."""

    run_dir: Path
    start_round: int
    last_round: int
    rounds: list[dict[str, Any]] = field(default_factory=list)
    #: ``outcome.json``: ``status`` completed / degraded and the faults per round
    outcome: dict[str, Any] = field(default_factory=dict)


def _metrics_dict(record: MetricRecord | None) -> dict[str, Any]:
    return {} if record is None else {k: v for k, v in record.items()}


def _screened(strategy: GuardedFedAvg, phase: str) -> Screened:
    """The last screening of ``phase`` (empty when the phase sent nothing)."""
    return strategy.last.get(phase) or Screened([], [], {}, [])


def _screen_summary(screened: Screened) -> dict[str, Any]:
    return {
        "valid": len(screened.valid),
        "per_node": {str(k): v for k, v in sorted(screened.per_node.items())},
        "rejected": [r.as_dict() for r in screened.rejected],
        "failed": [r.as_dict() for r in screened.failed],
        "adjusted": [a.as_dict() for a in screened.adjusted],
    }


def _exchange(grid: Grid, msgs: list[Message], timeout: float) -> list[Message]:
    """Send ``msgs``, return the replies with errors attributed to real node ids."""
    if not msgs:
        return []
    return attribute_replies(msgs, grid.send_and_receive(msgs, timeout=timeout))


def _check_resume(cfg: FederationConfig, meta: Mapping[str, Any], where: Path) -> None:
    old = meta.get("config", {})
    for key in ("strategy", "personalization", "trainer"):
        want = config_to_dict(getattr(cfg, key))
        if key in old and not isinstance(old[key], Mapping):
            raise CheckpointMismatch(
                f"{where}: field 'config.{key}' is not an object: {shown(old[key])}"
            )
        if key in old and old[key].get("name", None) != want.get("name", None):
            raise CheckpointMismatch(
                f"{where}: checkpoint was made with {key} {old[key]!r}, "
                f"config asks for {want!r}"
            )
    pers = config_to_dict(cfg.personalization)
    if "personalization" in old and old["personalization"] != pers:
        raise CheckpointMismatch(
            f"{where}: checkpoint personalization {old['personalization']!r} differs "
            f"from config {pers!r}"
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
    store.remove_leftovers()
    strategy = strategy or build_strategy(cfg)
    strategy.summary()
    cfg_dict = config_to_dict(cfg)

    defaults = initial_personal_defaults(cfg)
    if defaults:
        strategy.personal_defaults = arrays_to_record(defaults)
        log.info(
            "sites without personal norms start from the initial model's %d",
            len(defaults),
        )
    # model: which aggregation made the global arrays; sites commit a round's
    # personal state only when the server kept their update (ModelVersion)
    last = store.latest_readable() if cfg.resume else None
    if last is not None:
        npz, meta_path = store.paths(last.round)
        _check_resume(cfg, last.meta, meta_path)
        # a checkpoint of another model (trainer.options changed) would fail
        # at every site in every round: refuse it here, naming the file
        try:
            check_initial_arrays(last.arrays, initial_shared_arrays(cfg), npz)
        except InitialModelError as exc:
            raise CheckpointMismatch(
                f"cannot resume from round {last.round} with this config's model "
                f"(trainer {cfg.trainer.name!r}, options {cfg.trainer.options!r}): "
                f"{exc}"
            ) from exc
        arrays, start = last.arrays, last.round
        model = ModelTracker.from_checkpoint_meta(last.meta, start)
        log.info("resuming from round %d (%s)", start, store.paths(start)[0])
    else:
        arrays = initial_global_arrays(cfg)  # never from a node's reply
        start, model = 0, ModelTracker()
        store.save(0, arrays, metrics={}, config=cfg_dict)
    summary = RunSummary(run_dir=run_dir, start_round=start, last_round=start)
    jsonl = run_dir / ROUNDS_JSONL
    timeout = cfg.participation.round_timeout_s
    eta = Eta(max(1, cfg.num_rounds - start))

    for rnd in range(start + 1, cfg.num_rounds + 1):
        t0 = time.monotonic()
        global_record: ArrayRecord = arrays_to_record(arrays)
        ins = FitInstructions.from_federation(cfg, rnd)
        train_config = model.stamp(ins.to_config_record())
        msgs = list(strategy.configure_train(rnd, global_record, train_config, grid))
        replies = _exchange(grid, msgs, timeout)
        agg_arrays, agg_train = strategy.aggregate_train(rnd, replies)
        status = "aggregated" if agg_arrays is not None else "kept-previous"
        if agg_arrays is not None:
            arrays = record_to_arrays(agg_arrays)
            model.aggregated(rnd, map(node_of, _screened(strategy, "train").valid))
        eval_record = arrays_to_record(arrays)
        eval_config = model.stamp(ins.to_config_record())
        emsgs: list[Message] = []
        if cfg.participation.evaluates(rnd, cfg.num_rounds):
            emsgs = list(
                strategy.configure_evaluate(rnd, eval_record, eval_config, grid)
            )
        else:  # not an evaluation round: nothing sampled, nothing screened
            strategy.sampled["evaluate"] = []
            strategy.last.pop("evaluate", None)
        ereplies = _exchange(grid, emsgs, timeout)
        agg_eval = strategy.aggregate_evaluate(rnd, ereplies)
        line: dict[str, Any] = {
            "round": rnd,
            "status": status,
            "seconds": round(time.monotonic() - t0, 3),
            "train_sampled": strategy.sampled.get("train", []),
            "train_replies": len(replies),
            "train": _screen_summary(_screened(strategy, "train")),
            "train_aggregated": _metrics_dict(agg_train),
            "evaluate_sampled": strategy.sampled.get("evaluate", []),
            "evaluate": _screen_summary(_screened(strategy, "evaluate")),
            "evaluate_aggregated": _metrics_dict(agg_eval),
            "model": model.as_dict(),
        }
        # sampled nodes that sent nothing at all before the timeout
        line["train"]["silent"] = silent_nodes(line["train_sampled"], replies)
        line["evaluate"]["silent"] = silent_nodes(line["evaluate_sampled"], ereplies)
        # the row first: a crash before the checkpoint repeats the round on
        # resume (its later row wins); the other order would lose the row
        append_round_row(jsonl, line)
        store.save(
            rnd,
            arrays,
            metrics={
                "train": line["train_aggregated"],
                "evaluate": line["evaluate_aggregated"],
                "model": model.as_dict(),
            },
            config=cfg_dict,
        )
        store.prune(cfg.keep_checkpoints)
        log.info(
            "round %d/%d %s: %d/%d valid updates, %d rejected, train %s, eval %s "
            "(%.1f s; %s)",
            rnd,
            cfg.num_rounds,
            status,
            line["train"]["valid"],
            len(line["train_sampled"]),
            len(line["train"]["rejected"]),
            line["train_aggregated"],
            line["evaluate_aggregated"],
            line["seconds"],
            eta.step(),
        )
        summary.rounds.append(line)
        summary.last_round = rnd
    summary.outcome = write_outcome(run_dir, jsonl, cfg.num_rounds)
    log.info(
        "run %s at round %d; checkpoints in %s",
        summary.outcome["status"],
        summary.last_round,
        store.dir,
    )
    return summary
