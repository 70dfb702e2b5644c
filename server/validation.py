"""Checks every reply passes before it may touch the global model.

A train reply is accepted only if, in this order (the first failing check is
the one named in the log):

1. ``structure``: exactly one ArrayRecord named ``arrays`` and one
   MetricRecord named ``metrics``, nothing else (Flower's aggregation
   requires every reply's records to carry the same names; one node naming
   its own would make it raise and stop the run);
2. ``keys``: array names equal the current global's (no unknown, none missing);
3. ``shape``: each array's shape and dtype equal the global's (a reply in
   another float type would, aggregated first, turn the global model into
   its type: float16 quantises it, float128 no site can load);
4. ``finite``: every value finite and ``|v| <= max_abs_value``;
5. ``metrics``: metric names whitelisted, values finite scalars in their
   ranges (``common.wire.federation.METRIC_RANGES``), ``num-examples`` an
   integer in ``[1, max_num_examples]`` (``[0, ...]`` in an evaluate reply);
6. ``norm``: ``||w_site - w_global||_2 / max(||w_global||_2, 1e-12)`` over all
   shared arrays ``<= max_relative_update_norm``.

An array is decoded (without pickle) only after its declared serialization,
shape and dtype match; bytes that are no numpy array are a ``shape``
rejection. A reply that raises anything else while checked is dropped as
``malformed``: one node's reply never stops the run.

Evaluate replies are checked for ``structure`` (one MetricRecord named
``metrics``, no arrays) and ``metrics``. After per-reply checks, the valid
train replies' MetricRecords are cut down to the metric names they all
carry, so Flower's aggregation never sees inconsistent replies; no update is
dropped for its metric names (a node leaving one out must not be able to
outvote an honest one; the names a node sent stay in its per-node record).
Evaluate replies may lack a metric that is undefined on their site (it is
averaged over the replies that carry it). An error reply is recorded by its code alone
(:func:`common.wire.faults.describe_reply_error`), never by the text it carries.
A rejection's reason is logged and kept in ``rounds.jsonl``: the names a node
chose (arrays, metrics, records) are counted and quoted only through
:func:`common.errors.shown` (bounded, escaped), so no node writes free text of
any length into the server's files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from common.errors import shown
from common.keys import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES
from common.wire.faults import describe_reply_error
from common.wire.federation import (
    METRIC_WHITELIST,
    ArrayDecodeError,
    ValidationConfig,
    array_fault,
    decode_array,
    metric_fault,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rejection:
    """Why one reply was dropped."""

    node_id: int
    check: str
    reason: str

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly form."""
        return {"node": self.node_id, "check": self.check, "reason": self.reason}


@dataclass(frozen=True)
class Adjustment:
    """One change the robust bounds made to an accepted reply (``strategies.bounds``).

    Attributes:
        node_id: the node whose reply was changed.
        kind: ``"clip"`` (update delta norm), ``"cap"`` (``num-examples``, at
            the node's first claim) or ``"weight"`` (an evaluate reply's
            ``num-examples``, at ``clip_factor x`` the round's lower median).
        before, after: the delta norm or the example count, before and after.
    """

    node_id: int
    kind: str
    before: float
    after: float

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly form."""
        return {
            "node": self.node_id,
            "kind": self.kind,
            "before": self.before,
            "after": self.after,
        }


class UpdateRejected(Exception):
    """Raised inside the checks; carries the failing check's name."""

    def __init__(self, check: str, reason: str) -> None:
        self.check = check
        self.reason = reason
        super().__init__(f"{check}: {reason}")


def node_of(msg: Message) -> int:
    """The id of the node that sent ``msg``."""
    return int(msg.metadata.src_node_id)


def check_metrics(
    record: MetricRecord, cfg: ValidationConfig, *, min_examples: int = 1
) -> dict[str, float]:
    """Whitelisted scalars in their ranges with a valid ``num-examples``; returns them.

    Each metric by :func:`common.wire.federation.metric_fault` (the site's
    guard applies the same rule). ``num-examples`` is an integer in
    ``[min_examples, max_num_examples]``: 1 for a train reply, 0 for an
    evaluate reply (a site with no test women counts for nothing).
    """
    out: dict[str, float] = {}
    for name, value in record.items():
        if name not in METRIC_WHITELIST:
            # the name is the sender's text: quoted bounded, never in full
            raise UpdateRejected(
                "metrics", f"metric name {shown(name)} is not whitelisted"
            )
        why = metric_fault(name, value)
        if why is not None:
            raise UpdateRejected("metrics", why)
        out[name] = cast(float, value)
    n = record.get(NUM_EXAMPLES)
    if n is None:
        raise UpdateRejected("metrics", f"{NUM_EXAMPLES!r} is missing")
    if type(n) is not int or not min_examples <= n <= cfg.max_num_examples:
        raise UpdateRejected(
            "metrics",
            f"{NUM_EXAMPLES!r} must be an integer in [{min_examples}, "
            f"{cfg.max_num_examples}], got {shown(n)}",
        )
    return out


def check_train_content(
    msg: Message, global_arrays: Mapping[str, np.ndarray], cfg: ValidationConfig
) -> dict[str, float]:
    """Run checks 1-6 on a train reply; returns its metrics or raises."""
    content = msg.content
    arrays = list(content.array_records.values())
    metrics = list(content.metric_records.values())
    if len(arrays) != 1 or len(metrics) != 1 or len(content.config_records) != 0:
        raise UpdateRejected(
            "structure",
            f"expected one ArrayRecord and one MetricRecord, got {len(arrays)} "
            f"ArrayRecord(s), {len(metrics)} MetricRecord(s), "
            f"{len(content.config_records)} ConfigRecord(s)",
        )
    _check_record_names(content, {ARRAYS_KEY, METRICS_KEY})
    record: ArrayRecord = arrays[0]
    names, expected = set(record.keys()), set(global_arrays)
    if names != expected:
        raise UpdateRejected("keys", _name_mismatch(names, expected))
    diff_sq, ref_sq = 0.0, 0.0
    for name, arr in record.items():
        ref = global_arrays[name]
        decoded = _decode(name, arr, ref)
        fault = array_fault(name, decoded, tuple(ref.shape), np.dtype(ref.dtype))
        if fault is not None:
            kind, why = fault
            raise UpdateRejected("finite" if kind == "finite" else "shape", why)
        value = decoded.astype(np.float64, copy=False)
        peak = float(np.max(np.abs(value))) if value.size else 0.0
        if peak > cfg.max_abs_value:
            raise UpdateRejected(
                "finite",
                f"array {name!r} has |value| {peak:.3g} > {cfg.max_abs_value:.3g}",
            )
        ref64 = ref.astype(np.float64, copy=False)
        diff_sq += float(np.sum((value - ref64) ** 2))
        ref_sq += float(np.sum(ref64**2))
    out = check_metrics(metrics[0], cfg)
    rel = math.sqrt(diff_sq) / max(math.sqrt(ref_sq), 1e-12)
    if rel > cfg.max_relative_update_norm:
        raise UpdateRejected(
            "norm",
            f"relative update norm {rel:.4g} > {cfg.max_relative_update_norm:.4g}",
        )
    return out


def _name_mismatch(names: set[str], expected: set[str]) -> str:
    """Why array ``names`` (a reply's) are not ``expected``: counts and one example.

    ``unknown`` names are the sender's text: only the first (sorted) is quoted,
    through :func:`common.errors.shown`, so the reason stays a few hundred
    characters whatever the node sent (it is logged and kept in
    ``rounds.jsonl``).
    """
    parts = []
    for what, diff in (("unknown", names - expected), ("missing", expected - names)):
        if diff:
            first = min(diff)
            parts.append(f"{len(diff)} {what} array name(s), e.g. {shown(first)}")
    return "; ".join(parts)


def _decode(name: str, arr: Array, ref: np.ndarray) -> np.ndarray:
    """Array ``name`` of a reply, decoded only if it has ``ref``'s form.

    :func:`common.wire.federation.decode_array`, the sites' decoder too: the
    declared serialization, shape and dtype, then the ``.npy`` header inside
    the bytes and the byte count, each before anything is allocated (a (2,)
    record whose header says (10**12,) made ``np.load`` ask for 3.6 TiB),
    then the bytes read without pickle. The declaration is the sender's
    word (a (1,) array under a (10,) declaration would be broadcast by
    FedAvg, which :func:`array_fault` catches after this). Raises
    ``UpdateRejected`` (``shape``) naming the array, the sender's text only
    through :func:`common.errors.shown`.
    """
    try:
        return decode_array(name, arr, tuple(ref.shape), np.dtype(ref.dtype))
    except ArrayDecodeError as exc:
        raise UpdateRejected("shape", str(exc)) from None


def check_evaluate_content(msg: Message, cfg: ValidationConfig) -> dict[str, float]:
    """Structure + metric checks of an evaluate reply; returns its metrics."""
    content = msg.content
    metrics = list(content.metric_records.values())
    if len(metrics) != 1 or len(content.config_records) != 0:
        raise UpdateRejected(
            "structure",
            f"expected one MetricRecord, got {len(metrics)} MetricRecord(s) and "
            f"{len(content.config_records)} ConfigRecord(s)",
        )
    if len(content.array_records) != 0:
        raise UpdateRejected(
            "structure",
            f"an evaluate reply carries no arrays, got "
            f"{len(content.array_records)} ArrayRecord(s)",
        )
    _check_record_names(content, {METRICS_KEY})
    return check_metrics(metrics[0], cfg, min_examples=0)


def _check_record_names(content: RecordDict, expected: set[str]) -> None:
    """Raise ``structure`` unless the reply's records carry exactly ``expected``."""
    names = set(content.keys())
    if names != expected:
        raise UpdateRejected(
            "structure",
            f"record names {', '.join(shown(n) for n in sorted(names))}, "
            f"expected {sorted(expected)!r}",
        )


@dataclass
class Screened:
    """Outcome of screening one phase's replies."""

    valid: list[Message]
    rejected: list[Rejection]
    per_node: dict[int, dict[str, float]]
    failed: list[Rejection]
    #: changes made to valid replies before aggregation (clip, num-examples cap)
    adjusted: list[Adjustment] = field(default_factory=list)


def screen_replies(
    replies: Iterable[Message],
    cfg: ValidationConfig,
    global_arrays: Mapping[str, np.ndarray] | None,
    phase: str,
) -> Screened:
    """Split ``replies`` into valid ones and logged rejections.

    ``global_arrays=None`` screens evaluate replies (metrics only). Error
    replies (the client raised) are listed in ``failed``.
    """
    valid: list[Message] = []
    rejected: list[Rejection] = []
    failed: list[Rejection] = []
    per_node: dict[int, dict[str, float]] = {}
    for msg in replies:
        node = node_of(msg)
        if msg.has_error():
            # only the code is recorded: a node's error text never reaches a file
            rej = Rejection(node, "client-error", describe_reply_error(msg.error.code))
            failed.append(rej)
            log.warning("%s: node %d failed: %s", phase, node, rej.reason)
            continue
        try:
            if global_arrays is None:
                metrics = check_evaluate_content(msg, cfg)
            else:
                metrics = check_train_content(msg, global_arrays, cfg)
        except UpdateRejected as exc:
            rejected.append(Rejection(node, exc.check, exc.reason))
            log.warning("%s: dropped update of node %d: check %s", phase, node, exc)
            continue
        except Exception as exc:  # noqa: BLE001 - one node's reply must not stop the run
            # a reply no check foresaw: dropped, by the exception's type alone
            # (its text may quote the sender's bytes)
            rej = Rejection(
                node, "malformed", f"{type(exc).__name__} while checking it"
            )
            rejected.append(rej)
            log.warning("%s: dropped update of node %d: %s", phase, node, rej.reason)
            continue
        valid.append(msg)
        per_node[node] = metrics
    # train replies must agree on their metric names (Flower's weighted average
    # needs it): each is cut down to the names every valid reply carries
    # (num-examples always); an evaluate reply may lack a metric undefined on
    # its site
    if valid and global_arrays is not None:
        _keep_common_metrics(valid, per_node, phase)
    return Screened(valid=valid, rejected=rejected, per_node=per_node, failed=failed)


def _keep_common_metrics(
    valid: list[Message], per_node: dict[int, dict[str, float]], phase: str
) -> None:
    """Cut every valid train reply's MetricRecord to the names all of them carry.

    Dropping a reply instead (the names of the majority) would let a node that
    leaves a metric out, replying first among two, outvote the honest one.
    """
    common = frozenset.intersection(*(frozenset(per_node[node_of(m)]) for m in valid))
    for msg in valid:
        record = msg.content[METRICS_KEY]
        extra = sorted(set(record.keys()) - common)
        if extra:
            log.info(
                "%s: node %d: metrics %s not aggregated (not carried by every reply)",
                phase,
                node_of(msg),
                extra,
            )
            for name in extra:
                del record[name]
