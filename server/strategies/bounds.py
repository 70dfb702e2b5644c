"""Bounds on what one accepted update can do to the global model.

Applied by :class:`server.strategies.base.GuardedFedAvg` to the replies that
passed :func:`server.validation.screen_replies`, before any aggregation (so
under every strategy, robust aggregators included):

* **num-examples cap** (``validation.cap_num_examples``): the first accepted
  train reply of a node *declares* its ``num-examples`` for the whole run;
  a later, larger claim is lowered to the declared value (and the global
  ``max_num_examples`` already drops anything above it). A node that was seen
  honest cannot later buy itself the average by claiming more examples.
* **norm clipping** (``validation.clip_factor`` = ``c``): with
  ``d_i = w_i - w_global`` over all shared arrays and ``m`` the *lower*
  median of the round's ``||d_i||_2`` (the ``floor((n-1)/2)``-th smallest, so
  that with two nodes ``m`` is the smaller norm and a single large update
  cannot raise its own bound), every update with ``||d_i|| > c * m`` becomes
  ``w_global + d_i * c * m / ||d_i||``: a convex combination of the global
  model and the site's, so BatchNorm variances stay positive. When ``m`` is 0
  (half the replies or more are the global model unchanged: sites that did
  not train, e.g. with their DP budget spent), ``m`` is the smallest nonzero
  ``||d_i||`` instead: a median of 0 would scale every update that moved to
  nothing and freeze the model. With one attacker, ``m <= h`` still holds
  whenever one honest node's update moved.

* **evaluate weight bound** (``validation.clip_factor`` = ``c`` again): the
  clip's rule applied to the evaluate replies' ``num-examples`` (their weights
  in the reported metrics), after the cap: with ``m`` the lower median of the
  round's claims (the smallest nonzero claim when that median is 0), a claim
  above ``floor(c * m)`` is weighted as ``floor(c * m)`` (at least 1). A node
  that lies from its first evaluate reply, which the cap cannot catch, then
  holds at most ``c * m`` of the weight; honest sites whose test sets differ
  by more than ``c`` times that median are down-weighted too (logged, like
  every change).

Consequence (the bound the tests and ``benchmarks/attacks.py`` check): with
every delta at most ``c * m`` long and honest deltas at most ``h`` long
(``m <= h`` when honest nodes are not a minority), a weighted mean of the
bounded deltas lies within ``(c + 1) * h`` of the honest nodes' own mean,
whatever weight an attacker holds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from common.keys import NUM_EXAMPLES
from common.wire.federation import ValidationConfig
from server.validation import Adjustment, node_of

log = logging.getLogger(__name__)

__all__ = [
    "bound_evaluate_weights",
    "cap_num_examples",
    "clip_updates",
    "delta_norm",
    "lower_median",
]


def _only(records: Mapping[str, object], what: str) -> str:
    names = list(records)
    if len(names) != 1:  # validation guarantees one; refuse to guess otherwise
        raise ValueError(f"expected one {what} in a screened reply, got {names}")
    return names[0]


def delta_norm(record: ArrayRecord, global_arrays: Mapping[str, np.ndarray]) -> float:
    """``||w_site - w_global||_2`` over every array of ``record`` (float64)."""
    total = 0.0
    for name, arr in record.items():
        diff = arr.numpy().astype(np.float64) - global_arrays[name].astype(np.float64)
        total += float(np.sum(diff * diff))
    return math.sqrt(total)


def lower_median(values: Sequence[float]) -> float:
    """The ``floor((n-1)/2)``-th smallest of ``values`` (the median for odd n)."""
    if not values:
        raise ValueError("lower_median of no values")
    return float(sorted(values)[(len(values) - 1) // 2])


def nonzero_reference(values: Sequence[float]) -> float | None:
    """The round's reference size for a bound.

    The lower median of ``values``, or their smallest positive one where
    that median is 0; ``None`` when none is positive (nothing to bound
    against).
    """
    reference = lower_median(values)
    if reference > 0.0:
        return reference
    positive = [v for v in values if v > 0.0]
    return float(min(positive)) if positive else None


def clip_updates(
    replies: Sequence[Message],
    global_arrays: Mapping[str, np.ndarray],
    factor: float,
) -> list[Adjustment]:
    """Scale every update longer than ``factor x`` the lower median norm, in place.

    When that median is 0 (at least half the replies are the global model
    unchanged), the reference is the smallest nonzero norm instead; when every
    norm is 0 nothing is clipped. ``factor <= 0`` changes nothing. Returns one
    :class:`server.validation.Adjustment` per clipped reply; each is also logged
    with the node id.
    """
    if factor <= 0 or not replies:
        return []
    keys = [_only(m.content.array_records, "ArrayRecord") for m in replies]
    norms = [
        delta_norm(m.content.array_records[k], global_arrays)
        for m, k in zip(replies, keys, strict=True)
    ]
    # half the replies or more may be the global model itself (sites that did
    # not train: a spent DP budget): a norm of 0 says nothing about how long
    # an update may be, and would scale every update that moved to nothing
    reference = nonzero_reference(norms)
    if reference is None:
        return []
    bound = factor * reference
    out: list[Adjustment] = []
    for msg, key, norm in zip(replies, keys, norms, strict=True):
        if norm <= bound:
            continue
        scale = bound / norm
        record = msg.content.array_records[key]
        clipped = ArrayRecord()
        for name, arr in record.items():
            site = arr.numpy()
            ref = global_arrays[name].astype(np.float64)
            new = ref + (site.astype(np.float64) - ref) * scale
            clipped[name] = Array(np.ascontiguousarray(new.astype(site.dtype)))
        msg.content[key] = clipped
        adj = Adjustment(node_of(msg), "clip", norm, bound)
        out.append(adj)
        log.warning(
            "train: clipped update of node %d: delta norm %.4g > %.3g x reference "
            "norm %.4g, scaled to %.4g",
            adj.node_id,
            norm,
            factor,
            bound / factor,
            bound,
        )
    return out


def cap_num_examples(
    replies: Sequence[Message],
    declared: dict[int, int],
    cfg: ValidationConfig,
    phase: str = "train",
) -> list[Adjustment]:
    """Record first claims in ``declared``; lower later larger claims, in place.

    A claim of 0 (an evaluate reply of a site without test women) is not
    recorded as the node's first claim.

    Only with ``cfg.cap_num_examples``; returns one
    :class:`server.validation.Adjustment` per lowered claim (also logged with
    the node id and ``phase``). The train and evaluate phases keep their own
    ``declared`` (a site's test women are not its training women): in
    evaluate the cap bounds one node's weight in the reported metrics.
    """
    if not cfg.cap_num_examples:
        return []
    out: list[Adjustment] = []
    for msg in replies:
        node = node_of(msg)
        key = _only(msg.content.metric_records, "MetricRecord")
        record = msg.content.metric_records[key]
        claimed = int(record[NUM_EXAMPLES])  # type: ignore[arg-type]
        if claimed == 0 and node not in declared:
            # an evaluate reply of a site without test women (yet): recorded,
            # 0 would hold the node's weight at 0 for the rest of the run
            continue
        if node not in declared:
            declared[node] = claimed
            log.info("%s: node %d declares %d examples", phase, node, claimed)
            continue
        allowed = declared[node]
        if claimed <= allowed:
            continue
        capped = MetricRecord(dict(record.items()))
        capped[NUM_EXAMPLES] = allowed
        msg.content[key] = capped
        adj = Adjustment(node, "cap", float(claimed), float(allowed))
        out.append(adj)
        log.warning(
            "%s: node %d claims %d examples, declared %d: capped",
            phase,
            node,
            claimed,
            allowed,
        )
    return out


def bound_evaluate_weights(
    replies: Sequence[Message], factor: float
) -> list[Adjustment]:
    """Lower every evaluate claim above ``floor(factor x m)``, in place.

    ``m`` is the :func:`lower_median` of the replies' ``num-examples`` (with
    two replies the smaller claim, so one large claim cannot raise its own
    bound); when ``m`` is 0 (half the sites or more have no test women) it is
    the smallest nonzero claim; when every claim is 0 nothing changes. A claim
    above the bound is weighted as the bound (at least 1). ``factor <= 0``
    changes nothing. Returns one :class:`server.validation.Adjustment`
    (``kind="weight"``) per lowered claim; each is also logged with the node id.

    Contract: afterwards every reply's ``num-examples`` is at most
    ``max(1, floor(factor * m))``, so in the weighted mean of a metric one
    node's share is at most ``w / (w + W)``, ``w`` that bound and ``W`` the
    other replies' (bounded) weights that carry the metric.
    """
    if factor <= 0 or not replies:
        return []
    keys = [_only(m.content.metric_records, "MetricRecord") for m in replies]
    claims = [
        int(m.content.metric_records[k][NUM_EXAMPLES])  # type: ignore[arg-type]
        for m, k in zip(replies, keys, strict=True)
    ]
    # half the sites or more may have no test women: 0 would weigh every
    # site that has some as nothing
    reference = nonzero_reference([float(c) for c in claims])
    if reference is None:
        return []
    bound = max(1, math.floor(factor * reference))
    out: list[Adjustment] = []
    for msg, key, claimed in zip(replies, keys, claims, strict=True):
        if claimed <= bound:
            continue
        record = msg.content.metric_records[key]
        lowered = MetricRecord(dict(record.items()))
        lowered[NUM_EXAMPLES] = bound
        msg.content[key] = lowered
        adj = Adjustment(node_of(msg), "weight", float(claimed), float(bound))
        out.append(adj)
        log.warning(
            "evaluate: node %d claims %d examples, weighted as %d (%.3g x the "
            "round's lower median claim %d)",
            adj.node_id,
            claimed,
            bound,
            factor,
            int(reference),
        )
    return out
