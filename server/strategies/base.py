"""Guarded strategies: Flower's FedAvg family plus bounded waits and validation.

:class:`GuardedFedAvg` subclasses :class:`flwr.serverapp.strategy.FedAvg` and
changes these things, nothing else:

* sampling waits for ``min_available_nodes`` at most ``wait_for_nodes_s``
  (Flower's own sampling waits forever); too few nodes -> the phase is
  skipped and logged;
* every train reply passes :func:`server.validation.screen_replies` before
  Flower's aggregation; a round with fewer than ``min_valid_updates`` valid
  updates returns ``None`` so the run loop keeps the previous global model;
* per-node metrics and rejections of the last phase are kept in
  :attr:`GuardedFedAvg.last` for the run loop's per-round log;
* the valid replies are aggregated in :func:`canonical_order`, so the new
  global model depends on the updates only, not on the order in which they
  arrived (bit-identical across engines and reruns);
* before aggregation, each node's ``num-examples`` is capped at its first
  accepted claim and each update delta is clipped to ``clip_factor x`` the
  round's lower median delta norm, or its smallest nonzero one when that
  median is 0 (:mod:`server.strategies.bounds`);
* evaluate replies: each node's ``num-examples`` is capped at its first
  evaluate claim, then bounded to ``clip_factor x`` the round's lower median
  claim, so one node's weight in the reported metrics stays bounded even when
  it lies from its first reply.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.keys import (
    ARRAYS_KEY,
    CONFIG_KEY,
    NUM_EXAMPLES,
    PERSONAL_DEFAULTS_KEY,
    PROXIMAL_MU,
    SERVER_ROUND,
)
from common.wire.federation import FederationConfig, record_to_arrays
from server.faults import aggregate_present_metrics
from server.strategies.bounds import (
    bound_evaluate_weights,
    cap_num_examples,
    clip_updates,
)
from server.validation import Screened, screen_replies

log = logging.getLogger(__name__)


def reply_digest(msg: Message) -> str:
    """A digest of a reply's content: its arrays (names and bytes) and metrics."""
    h = hashlib.blake2b(digest_size=16)
    content = msg.content
    for rec_name in sorted(content.array_records):
        record = content.array_records[rec_name]
        for key in sorted(record):
            h.update(f"{rec_name}/{key}".encode())
            h.update(record[key].data)
    for rec_name in sorted(content.metric_records):
        h.update(repr(sorted(content.metric_records[rec_name].items())).encode())
    return h.hexdigest()


def canonical_order(replies: Iterable[Message]) -> list[Message]:
    """``replies`` sorted by :func:`reply_digest` (identical replies keep their order).

    Flower sums the weighted updates in float32 in list order, and the order
    of arrival differs between engines (in-process, Ray, SuperNodes) and
    between runs; float addition is not associative, so without a fixed order
    the same updates give global models that differ in the last bits, and
    runs drift apart over rounds. The order only depends on the content, never
    on which node sent it.
    """
    return sorted(replies, key=reply_digest)


def wait_for_nodes(grid: Grid, minimum: int, timeout_s: float) -> list[int]:
    """Connected node ids once at least ``minimum`` are there, or after ``timeout_s``.

    Never waits longer than ``timeout_s`` (polls every 0.5 s); the caller
    decides what too few nodes means.
    """
    deadline = time.monotonic() + timeout_s
    last_logged = 0.0
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        now = time.monotonic()
        if len(nodes) >= minimum or now >= deadline:
            return nodes
        if now - last_logged > 10.0:
            log.info(
                "waiting for nodes: %d connected, %d required (%.0f s left)",
                len(nodes),
                minimum,
                deadline - now,
            )
            last_logged = now
        time.sleep(min(0.5, max(deadline - now, 0.0)))


class GuardedFedAvg(FedAvg):
    """FedAvg with bounded participation waits and update validation."""

    #: registry name (set by subclasses)
    name = "fedavg"

    def __init__(self, cfg: FederationConfig, **extra: Any) -> None:
        p = cfg.participation
        super().__init__(
            fraction_train=p.fraction_train,
            fraction_evaluate=p.fraction_evaluate,
            min_train_nodes=p.min_train_nodes,
            min_evaluate_nodes=p.min_evaluate_nodes,
            min_available_nodes=p.min_available_nodes,
            weighted_by_key=NUM_EXAMPLES,
            arrayrecord_key=ARRAYS_KEY,
            configrecord_key=CONFIG_KEY,
            **extra,
        )
        self.fed_cfg = cfg
        self._rng = random.Random(cfg.seed)
        self._global: dict[str, np.ndarray] = {}
        #: phase -> screening outcome of the last round ("train", "evaluate")
        self.last: dict[str, Screened] = {}
        #: phase -> sampled node ids of the last round
        self.sampled: dict[str, list[int]] = {}
        #: node id -> num-examples of its first accepted train reply (the cap)
        self.declared_examples: dict[int, int] = {}
        self.declared_eval_examples: dict[int, int] = {}
        #: the initial model's personal arrays, sent with every message so a
        #: site without a personal copy starts from them (never aggregated)
        self.personal_defaults: ArrayRecord | None = None

    # --- sampling -----------------------------------------------------------
    def _sample(
        self, grid: Grid, fraction: float, min_nodes: int, phase: str
    ) -> list[int]:
        p = self.fed_cfg.participation
        need = max(p.min_available_nodes, min_nodes)
        nodes = wait_for_nodes(grid, need, p.wait_for_nodes_s)
        if len(nodes) < need:
            log.warning(
                "%s: only %d node(s) connected after %.0f s, %d required: "
                "skipping this phase",
                phase,
                len(nodes),
                p.wait_for_nodes_s,
                need,
            )
            return []
        size = min(max(int(len(nodes) * fraction), min_nodes), len(nodes))
        chosen = sorted(self._rng.sample(nodes, size))
        log.info("%s: sampled %d of %d nodes: %s", phase, size, len(nodes), chosen)
        return chosen

    def _configure(
        self,
        phase: str,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
    ) -> list[Message]:
        """Sample ``phase``'s nodes (bounded wait) and build their messages."""
        self.last.pop(phase, None)
        train = phase == "train"
        fraction = self.fraction_train if train else self.fraction_evaluate
        min_nodes = self.min_train_nodes if train else self.min_evaluate_nodes
        ids = self._sample(grid, fraction, min_nodes, phase) if fraction else []
        self.sampled[phase] = ids
        if not ids:
            return []
        config[SERVER_ROUND] = server_round
        mu = getattr(self, "proximal_mu", None)
        if mu is not None:
            config[PROXIMAL_MU] = float(mu)
        record = RecordDict(
            {self.arrayrecord_key: arrays, self.configrecord_key: config}
        )
        if self.personal_defaults is not None:
            record[PERSONAL_DEFAULTS_KEY] = self.personal_defaults
        message_type = MessageType.TRAIN if train else MessageType.EVALUATE
        return list(self._construct_messages(record, ids, message_type))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample (bounded wait) and build the train messages."""
        self._global = record_to_arrays(arrays)
        return self._configure("train", server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample (bounded wait) and build the evaluate messages."""
        return self._configure("evaluate", server_round, arrays, config, grid)

    # --- aggregation ----------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, then FedAvg over the valid updates (or keep the global)."""
        screened = screen_replies(
            list(replies), self.fed_cfg.validation, self._global, "train"
        )
        self.last["train"] = screened
        need = self.fed_cfg.participation.min_valid_updates
        if len(screened.valid) < need:
            log.warning(
                "round %d: %d valid update(s), %d required: keeping the previous "
                "global model",
                server_round,
                len(screened.valid),
                need,
            )
            return None, None
        valid, vcfg = screened.valid, self.fed_cfg.validation
        screened.adjusted += cap_num_examples(valid, self.declared_examples, vcfg)
        screened.adjusted += clip_updates(valid, self._global, vcfg.clip_factor)
        return super().aggregate_train(server_round, canonical_order(valid))

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Validate metrics, then a weighted average of each metric where present."""
        screened = screen_replies(
            list(replies), self.fed_cfg.validation, None, "evaluate"
        )
        self.last["evaluate"] = screened
        if not screened.valid:
            return None
        screened.adjusted += cap_num_examples(
            screened.valid,
            self.declared_eval_examples,
            self.fed_cfg.validation,
            phase="evaluate",
        )
        # the cap cannot catch a node that lies from its first evaluate reply
        screened.adjusted += bound_evaluate_weights(
            screened.valid, self.fed_cfg.validation.clip_factor
        )
        contents = [m.content for m in canonical_order(screened.valid)]
        return aggregate_present_metrics(contents, self.weighted_by_key)


class PersonalizedSummary(GuardedFedAvg):
    """A guarded strategy that logs the personalization mode in its summary."""

    def summary(self) -> None:
        """Log the personalization mode, then Flower's summary."""
        pers = self.fed_cfg.personalization
        log.info(
            "%s: local_norm (FedBN)=%s, personal_head (FedPer)=%s; aggregating the "
            "shared arrays only",
            self.name,
            pers.local_norm,
            pers.personal_head,
        )
        super().summary()
