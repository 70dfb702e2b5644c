"""Fault accounting of the server's run loop: who replied, who did not, and why.

* :func:`attribute_replies`: Flower's SuperLink answers for a node that died
  (no heartbeat) or never replied with an error whose source is the SuperLink
  itself (node id 1). Such an error is re-addressed to the node the message
  was sent to, so ``rounds.jsonl`` names the real node.
* :func:`silent_nodes`: sampled nodes with no reply at all before the
  round's timeout.
* :class:`ModelTracker`: which aggregation produced the current global arrays
  (:class:`common.wire.faults.ModelVersion`), sent with every message so that a site
  commits the personal state of a round only when the server kept its update.
* :func:`write_outcome`: ``<run_dir>/outcome.json`` (``completed`` or
  ``degraded``) from every row of ``rounds.jsonl``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from common.errors import shown
from common.fileio import atomic_write_bytes
from common.wire.faults import OUTCOME_JSON, RUN_DEGRADED, ModelVersion, run_outcome
from common.wire.runfolder import iter_round_rows

log = logging.getLogger(__name__)

#: Source node id of the errors the SuperLink itself creates for a missing reply.
SUPERLINK_NODE_ID = 1


def attribute_replies(
    sent: Sequence[Message], replies: Iterable[Message]
) -> list[Message]:
    """``replies`` with SuperLink-made errors re-addressed to the node asked.

    An error reply whose source is the SuperLink (:data:`SUPERLINK_NODE_ID`)
    and which answers one of the ``sent`` messages becomes
    ``Message(error, reply_to=that message)``: its source is then the node the
    message went to. Every other reply is returned unchanged, in order.
    """
    by_id = {m.metadata.message_id: m for m in sent if m.metadata.message_id}
    out: list[Message] = []
    for reply in replies:
        asked = by_id.get(reply.metadata.reply_to_message_id)
        from_link = int(reply.metadata.src_node_id) == SUPERLINK_NODE_ID
        if reply.has_error() and from_link and asked is not None:
            node = int(asked.metadata.dst_node_id)
            if node != SUPERLINK_NODE_ID:
                log.info(
                    "error %s for node %d came from the SuperLink: %s",
                    reply.error.code,
                    node,
                    reply.error.reason,
                )
                reply = Message(reply.error, reply_to=asked)
        out.append(reply)
    return out


def silent_nodes(sampled: Iterable[int], replies: Iterable[Message]) -> list[int]:
    """Sampled node ids that sent no reply (neither content nor error)."""
    answered = {int(r.metadata.src_node_id) for r in replies}
    return sorted(int(n) for n in set(sampled) - answered)


class ModelTracker:
    """The :class:`ModelVersion` of the current global arrays.

    Starts at round 0 (the initial model) or at a resumed checkpoint's
    version; :meth:`aggregated` moves it on when a round's update is kept.
    """

    def __init__(self, version: ModelVersion | None = None) -> None:
        self.version = version or ModelVersion()

    @classmethod
    def from_checkpoint_meta(
        cls, meta: Mapping[str, Any], checkpoint_round: int
    ) -> ModelTracker:
        """The version saved with a checkpoint (``metrics.model``).

        A checkpoint written before versions were saved gives the checkpoint's
        round with no node: sites then discard a pending round rather than
        keep one the server may not have used.
        """
        metrics = meta.get("metrics")
        return cls(
            ModelVersion.from_checkpoint_metrics(
                metrics if isinstance(metrics, Mapping) else {}, checkpoint_round
            )
        )

    def aggregated(self, server_round: int, nodes: Iterable[int]) -> None:
        """Round ``server_round`` produced the global arrays from ``nodes``."""
        self.version = ModelVersion(int(server_round), tuple(sorted(set(nodes))))

    def stamp(self, config: ConfigRecord) -> ConfigRecord:
        """``config`` with ``model-round`` and ``model-nodes`` set (in place)."""
        config.update(self.version.to_config())
        return config

    def as_dict(self) -> dict[str, Any]:
        """JSON form for the checkpoint's metadata."""
        return {"round": self.version.round, "nodes": list(self.version.nodes)}


def write_outcome(run_dir: Path, rounds_jsonl: Path, num_rounds: int) -> dict[str, Any]:
    """Write ``<run_dir>/outcome.json`` from every row of ``rounds_jsonl``.

    A line that is not a row (torn by a crash) is skipped with a warning; its
    round then counts as missing unless a later row has it.
    """
    outcome = run_outcome(list(iter_round_rows(rounds_jsonl)), num_rounds)
    payload = json.dumps(outcome, indent=2, sort_keys=True).encode()
    atomic_write_bytes(Path(run_dir) / OUTCOME_JSON, payload)
    if outcome["status"] == RUN_DEGRADED:
        log.warning(
            "run degraded: rounds without an aggregated update %s%s",
            outcome["rounds_without_update"],
            f", rounds never run {outcome['rounds_missing']}"
            if outcome["rounds_missing"]
            else "",
        )
    return outcome


def read_outcome(run_dir: Path) -> dict[str, Any] | None:
    """``<run_dir>/outcome.json``, or ``None`` when the run wrote none (yet).

    A file that is unreadable, or whose ``status`` (a string),
    ``rounds_without_update`` (a list) or ``faults`` (an object keyed by round
    numbers) is malformed, gives ``None`` with a warning naming file and field.
    """
    path = Path(run_dir) / OUTCOME_JSON
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        log.warning("%s: unreadable (%s); run outcome unknown", path, exc)
        return None
    if not isinstance(data, dict):
        log.warning("%s: not a JSON object; run outcome unknown", path)
        return None
    faults = data.get("faults")
    checks = {
        "status": isinstance(data.get("status"), str),
        "rounds_without_update": isinstance(data.get("rounds_without_update"), list),
        "faults": isinstance(faults, dict) and all(str(k).isdecimal() for k in faults),
    }
    for key, ok in checks.items():
        if not ok:
            log.warning(
                "%s: field %r is malformed (%s); run outcome unknown",
                path,
                key,
                shown(data.get(key)),
            )
            return None
    return data


def aggregate_present_metrics(
    contents: Sequence[RecordDict], weighted_by_key: str
) -> MetricRecord:
    """Weighted average of each metric over the replies that carry it.

    Flower's ``aggregate_metricrecords`` needs every reply to carry every
    metric; a site where a metric is undefined (CPM of a class absent from its
    test split) leaves it out instead of sending NaN. Each metric ``m`` is
    ``sum_i w_i m_i / sum_i w_i`` over the replies ``i`` holding ``m``, with
    ``w_i`` the reply's ``weighted_by_key``; the weight key itself is not
    averaged. Replies whose weight is not positive count for nothing.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for content in contents:
        for record in content.metric_records.values():
            w = float(cast(float, record.get(weighted_by_key, 0)))
            if w <= 0:
                continue
            for key, value in record.items():
                if key == weighted_by_key or not isinstance(value, int | float):
                    continue
                sums[key] = sums.get(key, 0.0) + w * float(value)
                weights[key] = weights.get(key, 0.0) + w
    return MetricRecord({k: sums[k] / weights[k] for k in sorted(sums)})


def outcome_status(flower_status: str, run_dir: Path) -> str:
    """Flower's run status, with ``completed`` replaced by the run's own outcome.

    Flower reports ``finished:completed`` whenever the ServerApp returned; a
    run whose ``outcome.json`` says ``degraded`` is ``finished:degraded``.
    """
    outcome = read_outcome(run_dir)
    if flower_status.endswith(":completed") and outcome is not None:
        return flower_status.rsplit(":", 1)[0] + ":" + str(outcome["status"])
    return flower_status
