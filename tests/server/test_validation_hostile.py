"""A rejected reply's reason never carries a node's text in full.

The reason is logged and kept in ``rounds.jsonl``; the names a node chose
(array, metric and record names) must come out counted and quoted through
:func:`common.errors.shown`: bounded, escaped, with their length.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common.keys import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES, TRAIN_LOSS
from common.wire.federation import ValidationConfig, arrays_to_record
from server.validation import Screened, screen_replies

GLOBAL = {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}
UPDATE = {k: v * 1.1 + 0.01 for k, v in GLOBAL.items()}
#: a reason quoting one outside name stays far below this
BOUND = 400


def _message(node: int, content: dict, kind: str = "train") -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, node, 1
    instr = Message(RecordDict({}), 1, kind)
    msg = Message(RecordDict(content), reply_to=instr)
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def _train(node: int, arrays: dict, metrics: dict) -> Message:
    return _message(
        node,
        {ARRAYS_KEY: arrays_to_record(arrays), METRICS_KEY: MetricRecord(metrics)},
    )


def _honest() -> Message:
    return _train(4, UPDATE, {NUM_EXAMPLES: 10, TRAIN_LOSS: 0.5})


def _only_rejection(out: Screened, node: int, check: str) -> str:
    assert [int(m.metadata.src_node_id) for m in out.valid] == [4]
    (rej,) = out.rejected
    assert (rej.node_id, rej.check) == (node, check)
    assert len(rej.reason) < BOUND, rej.reason
    return rej.reason


def test_an_unknown_metric_name_is_quoted_bounded() -> None:
    name = "patient John Doe MRN 123 " * 1000
    bad = _train(5, UPDATE, {NUM_EXAMPLES: 10, name: 1.0})
    out = screen_replies([bad, _honest()], ValidationConfig(), GLOBAL, "train")
    reason = _only_rejection(out, 5, "metrics")
    assert reason.startswith("metric name 'patient John Doe")
    assert reason.endswith(f"({len(name)} chars) is not whitelisted")


def test_an_unknown_metric_name_in_an_evaluate_reply_is_quoted_bounded() -> None:
    name = "x\n" * 50_000
    bad = _message(
        5, {METRICS_KEY: MetricRecord({NUM_EXAMPLES: 3, name: 0.5})}, "evaluate"
    )
    good = _message(4, {METRICS_KEY: MetricRecord({NUM_EXAMPLES: 3})}, "evaluate")
    out = screen_replies([bad, good], ValidationConfig(), None, "evaluate")
    reason = _only_rejection(out, 5, "metrics")
    assert "\n" not in reason and "(100000 chars)" in reason


@pytest.mark.parametrize("count", [1, 1000])
def test_unknown_array_names_are_counted_and_one_quoted(count: int) -> None:
    arrays = dict(UPDATE)
    for i in range(count):
        arrays[f"{i:04d}" + "x" * 100_000] = np.ones(2, np.float32)
    out = screen_replies(
        [_train(5, arrays, {NUM_EXAMPLES: 10}), _honest()],
        ValidationConfig(),
        GLOBAL,
        "train",
    )
    reason = _only_rejection(out, 5, "keys")
    assert reason.startswith(f"{count} unknown array name(s), e.g. '0000xxx")
    assert reason.endswith("(100004 chars)")


def test_missing_array_names_are_counted() -> None:
    out = screen_replies(
        [_train(5, {"w": UPDATE["w"]}, {NUM_EXAMPLES: 10}), _honest()],
        ValidationConfig(),
        GLOBAL,
        "train",
    )
    assert _only_rejection(out, 5, "keys") == "1 missing array name(s), e.g. 'b'"


def test_a_record_name_is_quoted_bounded() -> None:
    name = "y" * 100_000
    bad = _message(
        5,
        {
            name: arrays_to_record(UPDATE),
            METRICS_KEY: MetricRecord({NUM_EXAMPLES: 10}),
        },
    )
    out = screen_replies([bad, _honest()], ValidationConfig(), GLOBAL, "train")
    reason = _only_rejection(out, 5, "structure")
    assert "(100000 chars)" in reason and "expected ['arrays', 'metrics']" in reason
