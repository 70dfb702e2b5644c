"""What both sides agree on about faults: error codes, model versions, run outcome.

* **Error replies.** A site that cannot answer a message replies a Flower
  ``Error`` whose ``code`` is one of :data:`REPLY_ERRORS` and whose ``reason``
  is that code's fixed message, never an exception's text (which may carry
  site names, paths or patient identifiers). The site logs the full exception
  on its own disk. The server records :func:`describe_reply_error` of the code
  and ignores the received text altogether, so nothing a node writes in an
  error reaches the server's files. Flower's own codes (0-5: the SuperLink's
  "node unavailable" and the like) are described too.
* **Model version.** Every train and evaluate message carries
  ``model-round`` (the round whose aggregation produced the global arrays in
  the message; 0 for the initial model) and ``model-nodes`` (the node ids
  whose updates that aggregation used). A site keeps the personal state it
  trained in round ``R`` pending until a message says ``model-round == R`` and
  lists its node id; otherwise the state is discarded (see
  :mod:`client.state`).
* **Run outcome.** ``<run_dir>/outcome.json`` (:data:`OUTCOME_JSON`) says
  ``completed`` or ``degraded``: a run with any round that produced no
  aggregated update is ``degraded`` even though Flower reports the ServerApp
  as ``finished:completed``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.errors import ConfigError
from common.keys import NUM_EXAMPLES

# --- error replies ---------------------------------------------------------------
#: The site's configuration, or the server's instructions, are invalid.
SITE_CONFIG = 100
#: The site's data (cache, images) are missing or unreadable.
SITE_DATA = 101
#: The site's state folder (personal arrays, accountant) is unreadable.
SITE_STATE = 102
#: The reply would have carried something undeclared; the site's guard refused it.
SITE_GUARD = 103
#: The site cannot train under its privacy settings (DP accountant, budget).
SITE_PRIVACY = 104
#: Anything else; the details are only in the site's own log.
SITE_INTERNAL = 199

#: code -> fixed message. Codes 0-8 are Flower's (``flwr.common.constant.ErrorCode``).
REPLY_ERRORS: Mapping[int, str] = {
    0: "unknown error",
    1: "the ClientApp could not be loaded on the node",
    2: "the ClientApp raised an exception (text not recorded)",
    3: "message unavailable",
    4: "no reply before the message expired",
    5: "node unavailable (no heartbeat)",
    6: "a mod of the ClientApp refused the message",
    7: "the node refused the app (not signed by a key it trusts, or outside its "
    "apps limits)",
    8: "the ClientApp process crashed",
    SITE_CONFIG: "site configuration or server instructions invalid",
    SITE_DATA: "site data missing or unreadable",
    SITE_STATE: "site state unreadable",
    SITE_GUARD: "reply refused by the site's privacy guard",
    SITE_PRIVACY: "site cannot train under its privacy settings",
    SITE_INTERNAL: "site failed; details are in the site's own log",
}


def reply_error_message(code: int) -> str:
    """The fixed message a site sends with error ``code`` (a known site code)."""
    if code not in REPLY_ERRORS or code < SITE_CONFIG:
        raise ValueError(f"not a site error code: {code!r}")
    return REPLY_ERRORS[code]


def describe_reply_error(code: int) -> str:
    """What the server records for an error reply: ``"code N: message"``.

    Only the code is trusted; an unknown code is recorded as such.
    """
    text = REPLY_ERRORS.get(int(code), "unknown error code")
    return f"code {int(code)}: {text}"


# --- metrics ---------------------------------------------------------------------
def drop_non_finite(metrics: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``metrics`` without NaN / infinite values; returns (kept, dropped names).

    A metric that is not defined on a site (CPM of a class with no lesion in
    its test split) is absent from the reply rather than NaN. ``num-examples``
    is never dropped: a non-finite count is an error the guard refuses.
    """
    dropped = {
        name
        for name, value in metrics.items()
        if isinstance(value, float)
        and not math.isfinite(value)
        and name != NUM_EXAMPLES
    }
    return {k: v for k, v in metrics.items() if k not in dropped}, sorted(dropped)


# --- model version ---------------------------------------------------------------
MODEL_ROUND = "model-round"
MODEL_NODES = "model-nodes"


@dataclass(frozen=True)
class ModelVersion:
    """Which aggregation produced the global arrays a message carries.

    Attributes:
        round: server round of that aggregation (0: the initial model).
        nodes: node ids whose updates were aggregated (empty for round 0).
    """

    round: int = 0
    nodes: tuple[int, ...] = field(default=())

    def to_config(self) -> dict[str, int | list[int]]:
        """Entries to add to a message's ConfigRecord."""
        return {MODEL_ROUND: int(self.round), MODEL_NODES: [int(n) for n in self.nodes]}

    @classmethod
    def from_config(
        cls, record: Mapping[str, Any], source: str = "server message config"
    ) -> ModelVersion | None:
        """Parse a received ConfigRecord; ``None`` when the server sent no version."""
        if MODEL_ROUND not in record:
            return None
        rnd = record[MODEL_ROUND]
        if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
            raise ConfigError(source, MODEL_ROUND, f"must be an int >= 0, got {rnd!r}")
        nodes = record.get(MODEL_NODES, [])
        if not isinstance(nodes, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) for n in nodes
        ):
            raise ConfigError(
                source, MODEL_NODES, f"must be a list of node ids, got {nodes!r}"
            )
        return cls(rnd, tuple(int(n) for n in nodes))

    @classmethod
    def from_checkpoint_metrics(
        cls, metrics: Mapping[str, Any], checkpoint_round: int
    ) -> ModelVersion:
        """The version a server checkpoint saved (its ``metrics["model"]``).

        A checkpoint written before versions were saved, or one whose record
        is malformed, gives the checkpoint's round with no node: a site then
        never takes a pending round for one the server kept.
        """
        saved = metrics.get("model")
        if isinstance(saved, Mapping) and "round" in saved:
            rnd, nodes = saved["round"], saved.get("nodes") or []
            if (
                isinstance(rnd, int)
                and not isinstance(rnd, bool)
                and rnd >= 0
                and isinstance(nodes, list)
                and all(isinstance(n, int) and not isinstance(n, bool) for n in nodes)
            ):
                return cls(rnd, tuple(nodes))
        return cls(int(checkpoint_round), ())


# --- run outcome -----------------------------------------------------------------
OUTCOME_JSON = "outcome.json"
RUN_COMPLETED = "completed"
RUN_DEGRADED = "degraded"


def run_outcome(rows: Sequence[Mapping[str, Any]], num_rounds: int) -> dict[str, Any]:
    """The outcome of a run from its ``rounds.jsonl`` rows (last row per round wins).

    ``degraded`` when a round in ``1..num_rounds`` has no row or a row whose
    ``status`` is not ``aggregated``; ``faults`` counts, per round, the nodes
    that failed, were rejected or stayed silent (these do not degrade a run
    whose rounds all aggregated).
    """
    last: dict[int, Mapping[str, Any]] = {}
    for row in rows:
        last[int(row["round"])] = row
    missing = [r for r in range(1, num_rounds + 1) if r not in last]
    without = [
        r for r, row in sorted(last.items()) if row.get("status") != "aggregated"
    ]
    faults: dict[str, dict[str, int]] = {}
    for r, row in sorted(last.items()):
        counts = {
            f"{phase}_{kind}": len((row.get(phase) or {}).get(kind) or [])
            for phase in ("train", "evaluate")
            for kind in ("failed", "rejected", "silent")
        }
        counts = {k: v for k, v in counts.items() if v}
        if counts:
            faults[str(r)] = counts
    degraded = bool(missing or without)
    return {
        "status": RUN_DEGRADED if degraded else RUN_COMPLETED,
        "num_rounds": num_rounds,
        "rounds_without_update": without,
        "rounds_missing": missing,
        "faults": faults,
    }
