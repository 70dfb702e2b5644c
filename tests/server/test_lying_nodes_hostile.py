"""A node that lies in its first evaluate reply cannot buy the reported metrics.

The num-examples cap holds a node to its first evaluate claim; a node that
lies from that first claim on is bounded by the evaluate weight bound
(``server.strategies.bounds.bound_evaluate_weights``): no weight above
``clip_factor x`` the round's lower median claim.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.keys import METRICS_KEY, NUM_EXAMPLES
from common.wire.federation import ACCURACY, FederationConfig, ValidationConfig
from server.strategies import build_strategy


def _ev(node: int, n: int, accuracy: float) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, node, 1
    instr = Message(RecordDict({}), node, "evaluate")
    metrics = MetricRecord({NUM_EXAMPLES: n, ACCURACY: accuracy})
    msg = Message(RecordDict({METRICS_KEY: metrics}), reply_to=instr)
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


@pytest.mark.parametrize("strategy", ["fedavg", "fedmedian", "fedadam"])
@pytest.mark.parametrize("claim", [801, 10_000_000])
def test_a_first_lie_moves_the_metric_only_as_far_as_its_bounded_weight(
    strategy: str, claim: int, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = FederationConfig(name="eval-lie")
    cfg = dataclasses.replace(
        cfg, strategy=dataclasses.replace(cfg.strategy, name=strategy)
    )
    s = build_strategy(cfg)
    honest = [(1, 400, 0.9), (2, 350, 0.85)]
    with caplog.at_level(logging.WARNING):
        out = s.aggregate_evaluate(1, [*(_ev(*h) for h in honest), _ev(3, claim, 0.0)])
    assert out is not None
    # c = 2, lower median of (350, 400, claim) = 400: node 3 weighs 800 at most
    bound = 2 * 400
    honest_sum = sum(n * a for _, n, a in honest)
    honest_weight = sum(n for _, n, _ in honest)
    assert out[ACCURACY] == pytest.approx(honest_sum / (honest_weight + bound))
    assert out[ACCURACY] > 0.42  # was 6.6e-05 before the bound
    (adj,) = s.last["evaluate"].adjusted
    assert adj.as_dict() == {
        "node": 3,
        "kind": "weight",
        "before": float(claim),
        "after": float(bound),
    }
    assert (
        f"evaluate: node 3 claims {claim} examples, weighted as {bound}" in caplog.text
    )
    # the node's own claim is recorded as it was sent
    assert s.last["evaluate"].per_node[3][NUM_EXAMPLES] == claim


def test_honest_claims_within_the_bound_are_untouched() -> None:
    s = build_strategy(FederationConfig(name="eval-honest"))
    replies = [_ev(1, 400, 0.9), _ev(2, 350, 0.85), _ev(3, 700, 0.8)]
    out = s.aggregate_evaluate(1, replies)
    assert out is not None and s.last["evaluate"].adjusted == []
    assert out[ACCURACY] == pytest.approx((360 + 297.5 + 560) / 1450)


def test_sites_without_test_women_do_not_zero_the_bound() -> None:
    """Half the sites claiming 0: the bound is ``c x`` the smallest nonzero claim."""
    s = build_strategy(FederationConfig(name="eval-zero"))
    replies = [_ev(1, 0, 0.0), _ev(2, 0, 0.0), _ev(3, 50, 0.9), _ev(4, 1000, 0.1)]
    out = s.aggregate_evaluate(1, replies)
    assert out is not None
    (adj,) = s.last["evaluate"].adjusted
    assert (adj.node_id, adj.after) == (4, 100.0)
    assert out[ACCURACY] == pytest.approx((45 + 10) / 150)


def test_clip_factor_zero_turns_the_bound_off() -> None:
    cfg = dataclasses.replace(
        FederationConfig(name="eval-off"), validation=ValidationConfig(clip_factor=0.0)
    )
    s = build_strategy(cfg)
    out = s.aggregate_evaluate(1, [_ev(1, 400, 0.9), _ev(3, 10_000_000, 0.0)])
    assert out is not None and s.last["evaluate"].adjusted == []
