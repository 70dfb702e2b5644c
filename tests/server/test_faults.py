"""Faults accounted for: real node ids, silent nodes, degraded runs, thrown-away
rounds not kept by sites, error replies without exception text, NaN metrics
absent, the daemon's restart loop and status commands."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Error, Message, MetricRecord, RecordDict

from client.app import app
from client.commands.start import RestartPolicy, health_argv, supervise
from client.guard import PrivacyGuardError, check_reply
from client.state import (
    COMMITTED,
    DISCARDED,
    PENDING_JSON,
    SiteState,
    SiteStateError,
)
from common.errors import ConfigError
from common.keys import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, NUM_EXAMPLES
from common.wire.faults import (
    OUTCOME_JSON,
    REPLY_ERRORS,
    SITE_CONFIG,
    SITE_INTERNAL,
    SITE_PRIVACY,
    ModelVersion,
    drop_non_finite,
    run_outcome,
)
from common.wire.federation import (
    NODE_SITE,
    NODE_SITE_CONFIG,
    NODE_STATE_DIR,
    FederationConfig,
    ValidationConfig,
    arrays_to_record,
    federation_config_to_json,
    record_to_arrays,
    round_problems,
)
from common.wire.runfolder import ROUNDS_JSONL
from server.faults import (
    aggregate_present_metrics,
    attribute_replies,
    outcome_status,
    silent_nodes,
)
from server.federation import run_federation
from server.validation import screen_replies
from tests.conftest import TEST_YAML, LocalGrid, make_contexts

SITES = ["site-a", "site-b"]
SECRET = "patient P-00417 at /data/hospital-a/secret"


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """What a ServerApp process has set before messages are built."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1
    TaskIdentity.task_id = 1


class FaultGrid(LocalGrid):
    """A LocalGrid whose listed nodes can be silent or dead from a round on.

    ``silent``: node -> first round it sends nothing; ``dead``: node -> first
    round for which the SuperLink answers "node unavailable" in its place
    (Flower's own error message, source node 1).
    """

    def __init__(
        self,
        *args: Any,
        silent: dict[int, int] | None = None,
        dead: dict[int, int] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(*args, **kw)
        self.silent = silent or {}
        self.dead = dead or {}

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        from flwr.server.superlink.linkstate.utils import (
            create_message_error_unavailable_res_message,
        )

        out: list[Message] = []
        live: list[Message] = []
        for msg in messages:
            # what Flower's grid does when pushing: the id is the object id
            msg.metadata.__dict__["_message_id"] = msg.object_id
            node = int(msg.metadata.dst_node_id)
            rnd = int(msg.content[CONFIG_KEY]["server-round"])
            if rnd >= self.silent.get(node, 10**9):
                continue
            if rnd >= self.dead.get(node, 10**9):
                out.append(
                    create_message_error_unavailable_res_message(
                        msg.metadata, "node_unavail"
                    )
                )
                continue
            live.append(msg)
        return [*super().send_and_receive(live, timeout=timeout), *out]


def _cfg(test_cfg: FederationConfig, **part: Any) -> FederationConfig:
    return dataclasses.replace(
        test_cfg,
        participation=dataclasses.replace(test_cfg.participation, **part),
    )


def _rows(tmp_path: Path) -> list[dict[str, Any]]:
    lines = (tmp_path / "run" / ROUNDS_JSONL).read_text().splitlines()
    return [json.loads(x) for x in lines]


# --- server: real node ids, silent nodes, degraded runs --------------------------
def test_superlink_error_is_attributed_to_the_real_node() -> None:
    from flwr.server.superlink.linkstate.utils import (
        create_message_error_unavailable_res_message,
    )

    sent = Message(RecordDict(), dst_node_id=4242, message_type="train")
    sent.metadata.__dict__["_message_id"] = sent.object_id
    err = create_message_error_unavailable_res_message(sent.metadata, "node_unavail")
    assert err.metadata.src_node_id == 1  # what rounds.jsonl recorded before
    ok = Message(RecordDict(), dst_node_id=7, message_type="train")
    fixed = attribute_replies([sent], [err])
    assert fixed[0].metadata.src_node_id == 4242 and fixed[0].has_error()
    assert fixed[0].error.code == err.error.code
    # an error for a message we did not send, and a content reply, are unchanged
    assert attribute_replies([ok], [err])[0].metadata.src_node_id == 1
    assert silent_nodes([4242, 7, 9], fixed) == [7, 9]


def test_dead_and_silent_nodes_are_named_in_rounds_jsonl(
    test_cfg: FederationConfig, tmp_path: Path
) -> None:
    sites = ["site-a", "site-b", "site-c"]
    cfg = _cfg(test_cfg, min_train_nodes=1, min_evaluate_nodes=1, min_valid_updates=1)
    grid = FaultGrid(
        app,
        make_contexts(cfg, tmp_path / "state", sites),
        silent={102: 2},
        dead={101: 2},
    )
    summary = run_federation(grid, cfg, tmp_path / "run")
    row = _rows(tmp_path)[1]
    assert row["round"] == 2 and row["status"] == "aggregated"
    failed = row["train"]["failed"]
    assert [f["node"] for f in failed] == [101]  # not the SuperLink's id 1
    assert failed[0]["reason"] == f"code 5: {REPLY_ERRORS[5]}"
    assert row["train"]["silent"] == [102]
    assert row["evaluate"]["silent"] == [102]
    assert row["model"] == {"round": 2, "nodes": [100]}
    assert any("node 102 (silent)" in p for p in round_problems(row))
    # every round aggregated: faults listed, the run is not degraded
    assert summary.outcome["status"] == "completed"
    assert summary.outcome["faults"]["2"]["train_silent"] == 1


def test_round_without_valid_update_makes_the_run_degraded(
    test_cfg: FederationConfig, tmp_path: Path
) -> None:
    grid = FaultGrid(
        app,
        make_contexts(test_cfg, tmp_path / "state", SITES),
        dead={100: 2, 101: 2},
    )
    summary = run_federation(grid, test_cfg, tmp_path / "run")
    rows = _rows(tmp_path)
    assert [r["status"] for r in rows] == ["aggregated", "kept-previous"]
    assert rows[1]["train"]["valid"] == 0
    outcome = json.loads((tmp_path / "run" / OUTCOME_JSON).read_text())
    assert outcome == summary.outcome
    assert outcome["status"] == "degraded"
    assert outcome["rounds_without_update"] == [2]
    assert outcome_status("finished:completed", tmp_path / "run") == (
        "finished:degraded"
    )
    assert outcome_status("finished:failed", tmp_path / "run") == "finished:failed"


def test_run_outcome_counts_missing_rounds() -> None:
    rows = [{"round": 1, "status": "aggregated"}, {"round": 1, "status": "x"}]
    out = run_outcome(rows, 2)
    assert out["status"] == "degraded" and out["rounds_missing"] == [2]
    assert out["rounds_without_update"] == [1]  # the last row of a round wins
    ok = run_outcome([{"round": 1, "status": "aggregated"}], 1)
    assert ok["status"] == "completed" and ok["faults"] == {}


# --- sites do not keep a round the server threw away -----------------------------
def _poison(nodes: set[int], from_round: int):
    def tamper(node: int, reply: Message) -> Message:
        if reply.metadata.message_type != "train" or node not in nodes:
            return reply
        arrays = record_to_arrays(reply.content[ARRAYS_KEY])
        rnd = tamper.rounds.get(node, 0) + 1  # type: ignore[attr-defined]
        tamper.rounds[node] = rnd  # type: ignore[attr-defined]
        if rnd >= from_round:
            name = sorted(arrays)[0]
            arrays[name] = arrays[name] * np.float32(1e4)
            reply.content[ARRAYS_KEY] = arrays_to_record(arrays)
        return reply

    tamper.rounds = {}  # type: ignore[attr-defined]
    return tamper


def _personal_bytes(tmp_path: Path, site: str) -> bytes:
    return (tmp_path / "state" / site / "personal.npz").read_bytes()


def test_rejected_update_personal_state_not_kept(
    test_cfg: FederationConfig, tmp_path: Path
) -> None:
    cfg = _cfg(test_cfg, min_valid_updates=1)
    ctx = make_contexts(cfg, tmp_path / "state", SITES)
    run_federation(
        LocalGrid(app, ctx), dataclasses.replace(cfg, num_rounds=1), tmp_path / "run"
    )
    after_1 = {s: _personal_bytes(tmp_path, s) for s in SITES}
    # round 2: site-a's update is rejected (norm), site-b's is aggregated
    grid = LocalGrid(app, ctx, tamper=_poison({100}, from_round=1))
    run_federation(grid, cfg, tmp_path / "run")
    row = _rows(tmp_path)[-1]
    assert row["status"] == "aggregated"
    assert [r["node"] for r in row["train"]["rejected"]] == [100]
    assert _personal_bytes(tmp_path, "site-a") == after_1["site-a"]
    assert _personal_bytes(tmp_path, "site-b") != after_1["site-b"]
    meta_a = SiteState(tmp_path / "state", "site-a").read_meta()
    meta_b = SiteState(tmp_path / "state", "site-b").read_meta()
    assert meta_a["committed_round"] == 1 and meta_a["discarded_rounds"] == [2]
    assert meta_b["committed_round"] == 2 and "discarded_rounds" not in meta_b
    assert not (tmp_path / "state" / "site-a" / PENDING_JSON).exists()


def test_round_without_aggregation_is_discarded_by_every_site(
    test_cfg: FederationConfig, tmp_path: Path
) -> None:
    ctx = make_contexts(test_cfg, tmp_path / "state", SITES)
    one = dataclasses.replace(test_cfg, num_rounds=1)
    run_federation(LocalGrid(app, ctx), one, tmp_path / "run")
    after_1 = {s: _personal_bytes(tmp_path, s) for s in SITES}
    grid = LocalGrid(app, ctx, tamper=_poison({100, 101}, from_round=1))
    summary = run_federation(grid, test_cfg, tmp_path / "run")
    assert summary.rounds[-1]["status"] == "kept-previous"
    for s in SITES:
        assert _personal_bytes(tmp_path, s) == after_1[s]
        assert SiteState(tmp_path / "state", s).read_meta()["discarded_rounds"] == [2]


def test_site_state_pending_commit_and_discard(tmp_path: Path) -> None:
    st = SiteState(tmp_path, "h")
    st.save_personal({"bn": np.zeros(2)})  # no round open: written directly
    assert st.settle(ModelVersion(1, (5,))) is None
    st.begin_round(2, node_id=5)
    st.save_personal({"bn": np.ones(2)})
    st.write_path("teacher.pt").write_bytes(b"t2")
    np.testing.assert_array_equal(st.load_personal()["bn"], np.zeros(2))
    assert st.pending() == {"round": 2, "node": 5}
    assert st.settle(ModelVersion(2, (4, 5))) == COMMITTED
    np.testing.assert_array_equal(st.load_personal()["bn"], np.ones(2))
    assert (st.dir / "teacher.pt").read_bytes() == b"t2"
    assert st.pending() is None and st.read_meta()["committed_round"] == 2
    for version in (
        ModelVersion(2, (5,)),
        ModelVersion(3, (4,)),
        ModelVersion(4, (5,)),
    ):
        st.begin_round(3, node_id=5)
        st.save_personal({"bn": np.full(2, 3.0)})
        assert st.settle(version) == DISCARDED
        np.testing.assert_array_equal(st.load_personal()["bn"], np.ones(2))
    assert st.read_meta()["discarded_rounds"] == [3, 3, 3]
    # a crash left a round open: the next round drops it
    st.begin_round(5, node_id=5)
    st.save_personal({"bn": np.full(2, 5.0)})
    st.begin_round(6, node_id=5)
    assert not (st.pending_dir / "personal.npz").exists()
    assert st.read_meta()["discarded_rounds"][-1] == 5


def test_commit_reaches_the_disk_before_meta_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power cut must not leave meta.json naming a round whose files' moves
    were still in the page cache: the state folder is flushed (fsync of the
    folder itself) after the moves and before meta.json is replaced, and every
    atomic write flushes its folder after its rename."""
    import stat

    st = SiteState(tmp_path, "h")
    st.begin_round(3, node_id=5)
    st.save_personal({"bn": np.full(2, 3.0)})
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            folder = Path(os.readlink(f"/proc/self/fd/{fd}"))
            events.append(("fsync-dir", folder.name))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    assert st.settle(ModelVersion(3, (5,))) == COMMITTED
    moved = events.index(("replace", "personal.npz"))
    meta = events.index(("replace", "meta.json"))
    assert ("fsync-dir", "h") in events[moved + 1 : meta]
    assert events[meta + 1] == ("fsync-dir", "h")  # meta's own rename flushed


@pytest.mark.parametrize(
    "next_access", ["settle-later-round", "begin-round", "pending"]
)
def test_commit_cut_short_is_finished_not_discarded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, next_access: str
) -> None:
    """A commit that dies between two file moves is finished by the next access
    (a new SiteState, as after a restart), even when the next message names a
    later model round: every committed file is from the same round."""
    st = SiteState(tmp_path, "h")
    st.save_personal({"bn": np.full(2, 2.0)})
    (st.dir / "teacher.pt").write_bytes(b"t2")
    st.begin_round(3, node_id=5)
    st.save_personal({"bn": np.full(2, 3.0)})
    st.write_path("teacher.pt").write_bytes(b"t3")
    real, moved = os.replace, []

    def dying_replace(src: Any, dst: Any) -> None:
        if Path(src).parent == st.pending_dir:
            moved.append(Path(src).name)
            if len(moved) == 2:
                raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises((OSError, SiteStateError)) as cut:
        st.settle(ModelVersion(3, (5,)))
    monkeypatch.setattr(os, "replace", real)
    assert moved == ["personal.npz", "teacher.pt"]  # one moved, one not

    again = SiteState(tmp_path, "h")
    if next_access == "settle-later-round":
        assert again.settle(ModelVersion(4, (8,))) == COMMITTED
    elif next_access == "begin-round":
        again.begin_round(4, node_id=5)
    else:
        assert again.pending() is None
    personal = again.load_personal()
    assert personal is not None
    np.testing.assert_array_equal(personal["bn"], np.full(2, 3.0))
    assert (again.dir / "teacher.pt").read_bytes() == b"t3"
    meta = again.read_meta()
    assert meta["committed_round"] == 3 and 3 not in meta.get("discarded_rounds", [])
    assert isinstance(cut.value, SiteStateError)  # names the marker file
    assert str(st.pending_path) in str(cut.value)


def test_model_version_config_is_checked() -> None:
    assert ModelVersion.from_config({}) is None
    v = ModelVersion(3, (1, 2))
    assert ModelVersion.from_config(v.to_config()) == v
    with pytest.raises(ConfigError, match="model-round"):
        ModelVersion.from_config({"model-round": -1})
    with pytest.raises(ConfigError, match="model-nodes"):
        ModelVersion.from_config({"model-round": 1, "model-nodes": ["x"]})


# --- error replies: a code and a fixed message, never exception text -------------
def _train_msg(cfg: FederationConfig, node: int) -> Message:
    from client.toy import build_toy
    from common.wire.federation import FitInstructions

    shared = build_toy("x", Path("/nonexistent-unused"), cfg).initial_shared()
    record = RecordDict(
        {
            ARRAYS_KEY: arrays_to_record(shared),
            CONFIG_KEY: FitInstructions.from_federation(cfg, 1).to_config_record(),
        }
    )
    msg = Message(record, dst_node_id=node, message_type="train")
    return msg


def _context(cfg: FederationConfig, node_config: dict[str, Any]) -> Context:
    from common.wire.federation import RUN_FEDERATION_JSON

    return Context(
        run_id=1,
        node_id=7,
        node_config=node_config,
        state=RecordDict(),
        run_config={RUN_FEDERATION_JSON: federation_config_to_json(cfg)},
    )


def test_a_site_refuses_a_run_below_its_own_privacy_floor(
    test_cfg: FederationConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's settings are the launcher's; the floor in the site's own config
    refuses a run without DP-SGD before the trainer is built (nothing of the
    site is read), with the privacy error code."""
    import client.app as client_app

    site = tmp_path / "site.yaml"
    site.write_text(
        f"name: site-a\nstate_dir: {tmp_path / 'state'}\nprivacy:\n  max_epsilon: 8\n"
    )
    built: list[str] = []
    monkeypatch.setattr(client_app, "build_trainer", lambda *a, **k: built.append("x"))
    ctx = _context(test_cfg, {NODE_SITE_CONFIG: str(site)})
    reply = app(_train_msg(test_cfg, 7), ctx)
    assert reply.has_error() and reply.error.code == SITE_PRIVACY
    assert built == []  # refused before the trainer (and the site's data)


@pytest.mark.parametrize(
    ("options", "refused"),
    [
        ({"dp": False}, "without DP-SGD"),
        ({"dp": True, "dp_epsilon": 16.0}, "dp_epsilon = 16, above"),
        ({"dp": True}, None),  # the default target, 8
        ({"dp": True, "dp_epsilon": 2.0}, None),
        # what the guarantee does not cover may not be sent under a floor
        ({"dp": True, "dp_share_train_stats": True}, "dp_share_train_stats = true"),
        ({"dp": True, "eval_view": "labeled"}, "eval_view = 'labeled'"),
        ({"dp": True, "eval_view": "all"}, "eval_view = 'all'"),
        ({"dp": True, "eval_view": "test"}, None),
    ],
)
def test_the_privacy_floor_reads_the_runs_dp_settings(
    options: dict[str, Any], refused: str | None
) -> None:
    from client.trainer import check_privacy_floor
    from common.config.site import SitePrivacy
    from common.detector.dp import PrivacyError
    from common.wire.federation import load_federation_config

    base = load_federation_config(TEST_YAML.parent / "sim-demo.yaml")
    opts = {k: v for k, v in base.trainer.options.items() if not k.startswith("dp")}
    cfg = dataclasses.replace(
        base, trainer=dataclasses.replace(base.trainer, options={**opts, **options})
    )
    floor = SitePrivacy(max_epsilon=8.0)
    check_privacy_floor(cfg, None, "site.yaml")  # no floor: anything goes
    if refused is None:
        check_privacy_floor(cfg, floor, "site.yaml")
    else:
        with pytest.raises(PrivacyError, match=refused) as err:
            check_privacy_floor(cfg, floor, "site.yaml")
        assert "site.yaml: privacy.max_epsilon = 8" in str(err.value)


def test_error_replies_carry_a_code_and_no_exception_text(
    test_cfg: FederationConfig,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import client.app as client_app

    missing = tmp_path / "hospital-a-secret" / "site.yaml"
    msg = _train_msg(test_cfg, 7)
    reply = app(msg, _context(test_cfg, {NODE_SITE_CONFIG: str(missing)}))
    assert reply.has_error() and reply.error.code == SITE_CONFIG
    assert reply.error.reason == REPLY_ERRORS[SITE_CONFIG]
    assert "hospital-a-secret" not in reply.error.reason

    def boom(*args: Any, **kw: Any) -> Any:
        raise RuntimeError(SECRET)

    monkeypatch.setattr(client_app, "build_trainer", boom)
    node_cfg = {NODE_SITE: "site-a", NODE_STATE_DIR: str(tmp_path / "state")}
    with caplog.at_level(logging.ERROR, logger="client.app"):
        reply = app(msg, _context(test_cfg, node_cfg))
    assert reply.error.code == SITE_INTERNAL and SECRET not in reply.error.reason
    assert SECRET in caplog.text  # the site keeps the details in its own log
    # the server records the code only, whatever text a node puts in its error
    hostile = Message(Error(code=SITE_INTERNAL, reason=SECRET), reply_to=msg)
    out = screen_replies([hostile], ValidationConfig(), None, "evaluate")
    assert (
        out.failed[0].reason == f"code {SITE_INTERNAL}: {REPLY_ERRORS[SITE_INTERNAL]}"
    )
    assert SECRET not in json.dumps([f.as_dict() for f in out.failed])


def test_out_of_range_instructions_get_a_site_config_error(
    test_cfg: FederationConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message asking for 10**12 epochs at learning rate 1e30 (or round -4,
    batch size -1) is refused before any training: error SITE_CONFIG."""
    from client.toy import ToyTrainer
    from common.wire.federation import FitInstructions

    fits: list[int] = []
    real_fit = ToyTrainer.fit

    def counting_fit(self: ToyTrainer, shared: Any, config: Any) -> Any:
        fits.append(config.server_round)
        return real_fit(self, shared, config)

    monkeypatch.setattr(ToyTrainer, "fit", counting_fit)
    node_cfg = {NODE_SITE: "site-a", NODE_STATE_DIR: str(tmp_path / "state")}
    good = _train_msg(test_cfg, 7)
    for key, value in (
        ("server-round", -4),
        ("local-epochs", 10**12),
        ("learning-rate", 1e30),
        ("batch-size", -1),
    ):
        config = FitInstructions.from_federation(test_cfg, 1).to_config_record()
        config[key] = value
        bad = Message(
            RecordDict({ARRAYS_KEY: good.content[ARRAYS_KEY], CONFIG_KEY: config}),
            dst_node_id=7,
            message_type="train",
        )
        reply = app(bad, _context(test_cfg, node_cfg))
        assert reply.has_error() and reply.error.code == SITE_CONFIG, key
    assert fits == []
    reply = app(good, _context(test_cfg, node_cfg))  # a normal message still runs
    assert not reply.has_error() and fits == [1]


# --- NaN metrics become absent ---------------------------------------------------
def test_nan_metric_is_left_out_and_the_reply_is_sent(
    test_cfg: FederationConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from client.toy import ToyTrainer

    real = ToyTrainer.evaluate

    def nan_accuracy(self: ToyTrainer, shared: Any, config: Any) -> dict[str, Any]:
        metrics = dict(real(self, shared, config))
        metrics["accuracy"] = float("nan")
        return metrics

    monkeypatch.setattr(ToyTrainer, "evaluate", nan_accuracy)
    node_cfg = {NODE_SITE: "site-a", NODE_STATE_DIR: str(tmp_path / "state")}
    msg = _train_msg(test_cfg, 7)
    msg.metadata.__dict__["_message_type"] = "evaluate"
    del msg.content[ARRAYS_KEY]
    shared = _train_msg(test_cfg, 7).content[ARRAYS_KEY]
    emsg = Message(
        RecordDict({ARRAYS_KEY: shared, CONFIG_KEY: msg.content[CONFIG_KEY]}),
        dst_node_id=7,
        message_type="evaluate",
    )
    reply = app(emsg, _context(test_cfg, node_cfg))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content[METRICS_KEY]
    assert "accuracy" not in metrics and NUM_EXAMPLES in metrics


def test_guard_accepts_absent_metrics_but_not_missing_count() -> None:
    names = (NUM_EXAMPLES, "cpm-mass", "cpm-calcification")
    ok = RecordDict({METRICS_KEY: MetricRecord({NUM_EXAMPLES: 3, "cpm-mass": 0.4})})
    check_reply(ok, site="a", shared_spec=None, metric_names=names)
    for bad in (
        {"cpm-mass": 0.4},  # no count
        {NUM_EXAMPLES: 3, "cpm-mass": float("nan")},  # NaN is never sent
        {NUM_EXAMPLES: 3, "accuracy": 0.5},  # not declared
    ):
        with pytest.raises(PrivacyGuardError):
            check_reply(
                RecordDict({METRICS_KEY: MetricRecord(bad)}),
                site="a",
                shared_spec=None,
                metric_names=names,
            )
    kept, dropped = drop_non_finite({NUM_EXAMPLES: 3, "a": float("nan"), "b": 1.0})
    assert kept == {NUM_EXAMPLES: 3, "b": 1.0} and dropped == ["a"]


def test_server_averages_each_metric_where_present() -> None:
    def reply(node: int, metrics: dict[str, Any]) -> Message:
        msg = Message(RecordDict(), dst_node_id=node, message_type="evaluate")
        return Message(RecordDict({METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)

    a = reply(1, {NUM_EXAMPLES: 10, "cpm-mass": 0.2, "cpm-calcification": 0.6})
    b = reply(2, {NUM_EXAMPLES: 30, "cpm-mass": 0.6})  # no calcification here
    out = screen_replies([a, b], ValidationConfig(), None, "evaluate")
    assert len(out.valid) == 2 and not out.rejected
    agg = aggregate_present_metrics([m.content for m in out.valid], NUM_EXAMPLES)
    assert agg["cpm-mass"] == pytest.approx(0.5)
    assert agg["cpm-calcification"] == pytest.approx(0.6)
    assert NUM_EXAMPLES not in agg


# --- the daemon: restart loop, SIGTERM, health, status ---------------------------
def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "child.py"
    path.write_text(body)
    return [sys.executable, str(path)]


def test_supervise_restarts_with_backoff_then_gives_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    starts = tmp_path / "starts"
    cmd = _script(
        tmp_path,
        f"import sys\nopen({str(starts)!r}, 'a').write('x')\nsys.exit(3)\n",
    )
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="client.commands.start"):
        code = supervise(cmd, None, RestartPolicy(0.2, 0.4, max_restarts=2))
    assert code == 3
    assert starts.read_text() == "xxx"  # first start + 2 restarts
    assert time.monotonic() - t0 >= 0.2 + 0.4  # waited, doubling up to the cap
    lines = [r.getMessage() for r in caplog.records]
    assert sum("restart" in ln and "in 0 s" in ln for ln in lines) == 2
    assert any("giving up" in ln for ln in lines)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie awaiting its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_supervise_stop_ends_the_child_group(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    cmd = _script(
        tmp_path,
        "import os, subprocess, sys, time\n"
        "sleeper = [sys.executable, '-c', 'import time; time.sleep(600)']\n"
        "kid = subprocess.Popen(sleeper)\n"
        f"open({str(pid_file)!r}, 'w').write(str(kid.pid))\n"
        "time.sleep(600)\n",
    )
    stop = threading.Event()
    result: list[int] = []
    th = threading.Thread(
        target=lambda: result.append(supervise(cmd, None, RestartPolicy(), stop=stop))
    )
    th.start()
    try:
        deadline = time.monotonic() + 60
        while not pid_file.is_file() or not pid_file.read_text():
            assert time.monotonic() < deadline, "child never started"
            time.sleep(0.1)
        grandchild = int(pid_file.read_text())
        stop.set()
        th.join(30)
        assert result == [0]
        deadline = time.monotonic() + 10
        while _alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(grandchild), "a process of the group outlived the stop"
    finally:
        stop.set()
        th.join(30)


def test_health_flag() -> None:
    assert health_argv("127.0.0.1:9095") == [
        "--health-server-address",
        "127.0.0.1:9095",
    ]
    assert health_argv("") == []
    with pytest.raises(ConfigError, match="--health-address"):
        health_argv("localhost")
    with pytest.raises(ConfigError, match="--restart-delay"):
        RestartPolicy(delay_s=0)


def test_server_status_fails_loudly_when_superlink_unreachable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from server.cli import main
    from server.process import free_port

    address = f"127.0.0.1:{free_port()}"
    code = main(["status", "--superlink", address, "--insecure"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and address in err and "unreachable" in err


def _site_yaml(tmp_path: Path, outbox: bool) -> Path:
    text = f"name: hosp-x\nstate_dir: {tmp_path / 'state'}\n"
    if outbox:
        text += (
            "dicom_node:\n"
            "  allowed_calling_aes: [MG1]\n"
            "  destination: {ae_title: PACS, host: 127.0.0.1, port: 104}\n"
            f"  queue_dir: {tmp_path / 'outbox'}\n"
        )
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return path


def test_client_status_reports_round_model_dp_and_outbox(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from client.cli import main
    from common.detector.dp import DP_ACCOUNTANT_JSON, DPPlan, PrivacyAccountant

    yaml = _site_yaml(tmp_path, outbox=True)
    st = SiteState(tmp_path / "state", "hosp-x")
    st.begin_round(4, node_id=9)
    st.save_personal({"bn": np.ones(3)})
    st.settle(ModelVersion(4, (9,)))
    st.record_round(4, "evaluate", {NUM_EXAMPLES: 5})
    st.begin_round(5, node_id=9)
    acc = PrivacyAccountant(st.dir / DP_ACCOUNTANT_JSON)
    acc.plan = DPPlan(8.0, 1e-5, 1.1, 0.05, 100, 1.0, 4, 80)
    acc.step(1.1, 0.05, 20)
    acc.save()
    (tmp_path / "outbox" / "failed").mkdir(parents=True)
    for name in ("a.dcm", "b.dcm", "failed/c.dcm"):
        (tmp_path / "outbox" / name).write_bytes(b"x")
    args = ["status", "--site-config", str(yaml), "--health-address", ""]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["last_round"] == 4 and out["last_phase"] == "evaluate"
    assert out["model"]["round"] == 4 and out["model"]["pending_round"] == 5
    assert len(out["model"]["sha256"]) == 16
    assert 0 < out["dp"]["epsilon"] < 8.0 and out["dp"]["steps"] == 20
    assert (out["outbox"]["queued"], out["outbox"]["failed"]) == (2, 1)
    assert out["healthy"] is True and out["supernode"] == "not checked"
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "last round:      4 (evaluate)" in text and "2 queued, 1 failed" in text
    # a broken state file is a problem: exit 1, the file named
    st.meta_path.write_text("{not json")
    assert main([*args, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["healthy"] is False and str(st.meta_path) in out["problems"][0]


def test_client_status_asks_the_supernode_health_service(tmp_path: Path) -> None:
    from flwr.supercore.grpc_health import run_health_server_grpc_no_tls

    from client.site_status import site_status
    from common.config.site import load_site_config
    from server.process import free_port

    site = load_site_config(_site_yaml(tmp_path, outbox=False))
    SiteState(tmp_path / "state", "hosp-x")
    address = f"127.0.0.1:{free_port()}"
    assert site_status(site, address).supernode.startswith("unreachable")
    server = run_health_server_grpc_no_tls(address)
    try:
        status = site_status(site, address)
        assert status.supernode == "serving" and status.healthy
        assert status.outbox is None
    finally:
        server.stop(grace=None)


# --- real processes: the daemon survives a SuperLink restart and SIGTERM ---------
def _online_nodes(home: Path) -> list[str]:
    from common.flower_cli import flower_bin, flower_env

    res = subprocess.run(
        [flower_bin("flwr"), "supernode", "list", "mammofed", "--format", "json"],
        env=flower_env(home),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        nodes = json.loads(res.stdout).get("nodes") or []
    except ValueError:
        return []
    return [str(n["node-id"]) for n in nodes if n.get("status") == "online"]


def _wait(pred: Any, timeout_s: float, what: str, log: Path) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"{what} after {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.mark.integration
@pytest.mark.slow
def test_daemon_rejoins_after_superlink_restart_and_supernode_crash(
    tmp_path: Path, flower_procs: list[subprocess.Popen[bytes]]
) -> None:
    from common.flower_cli import flower_env
    from server.process import (
        free_port,
        start_process,
        stop_process,
        superlink_command,
        wait_for_port,
        write_flower_config,
    )

    port = free_port()
    db = tmp_path / "superlink.db"

    def superlink() -> subprocess.Popen[bytes]:
        proc = start_process(
            superlink_command(port=port, insecure=True, database=db),
            log_path=tmp_path / "superlink.log",
            env=flower_env(tmp_path / "home-link"),
            cwd=tmp_path,
        )
        flower_procs.append(proc)
        assert wait_for_port("127.0.0.1", port, 60), "SuperLink did not come up"
        return proc

    home = tmp_path / "home-cli"
    write_flower_config(home, f"127.0.0.1:{port}", insecure=True)
    link = superlink()
    yaml = _site_yaml(tmp_path, outbox=False)
    client_log = tmp_path / "client.log"
    health = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "client.cli", "start", "--site-config", str(yaml)]
    cmd += ["--superlink", f"127.0.0.1:{port}", "--insecure"]
    cmd += ["--port", str(free_port()), "--health-address", health]
    cmd += ["--restart-delay", "1", "--restart-max-delay", "4"]
    repo = Path(__file__).resolve().parents[2]
    with open(client_log, "wb") as out:
        daemon = subprocess.Popen(
            cmd, cwd=repo, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    flower_procs.append(daemon)  # stopped by the fixture even if we fail
    try:
        first = _wait(lambda: _online_nodes(home), 120, "no node online", client_log)
        # the SuperLink restarts; its database keeps the node, which stays online
        stop_process(link)
        link = superlink()
        time.sleep(5)
        assert _wait(lambda: _online_nodes(home), 60, "node lost", client_log) == first
        # the SuperNode dies (as on a refused heartbeat): the daemon restarts it
        pids = [
            int(ln.split("(pid ")[1].rstrip(")"))
            for ln in client_log.read_text().splitlines()
            if "SuperNode started (pid" in ln
        ]
        os.killpg(pids[-1], signal.SIGKILL)
        _wait(
            lambda: "restart 1 in 1 s" in client_log.read_text(),
            60,
            "no restart logged",
            client_log,
        )
        _wait(
            lambda: (
                len(
                    [
                        ln
                        for ln in client_log.read_text().splitlines()
                        if "SuperNode started" in ln
                    ]
                )
                == 2
            ),
            60,
            "SuperNode not started again",
            client_log,
        )
        _wait(lambda: _online_nodes(home), 120, "node did not rejoin", client_log)
        from client.site_status import supernode_health

        # The SuperLink may still list the node from before the crash while
        # the new SuperNode is starting: wait for its health service rather
        # than read it once (under load it answers UNAVAILABLE for seconds).
        _wait(
            lambda: supernode_health(health) == "serving",
            60,
            "SuperNode health never serving",
            client_log,
        )
        # SIGTERM: clean stop, status 0, the SuperNode gone
        new_pid = int(
            [
                ln
                for ln in client_log.read_text().splitlines()
                if "SuperNode started" in ln
            ][-1]
            .split("(pid ")[1]
            .rstrip(")")
        )
        os.kill(daemon.pid, signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0, client_log.read_text()[-2000:]
        assert not _alive(new_pid), "the SuperNode outlived SIGTERM"
        assert "SuperNode stopped" in client_log.read_text()
    finally:
        # SuperNodes run in their own sessions: never leave one behind
        for ln in client_log.read_text().splitlines():
            if "SuperNode started (pid" in ln:
                pid = int(ln.split("(pid ")[1].rstrip(")"))
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


# --- a global model the site cannot load safely is refused -----------------------
@pytest.mark.parametrize("poison", ["float16", "longdouble", "nan"])
def test_global_arrays_of_another_dtype_or_not_finite_are_refused(
    test_cfg: FederationConfig, tmp_path: Path, poison: str
) -> None:
    node_cfg = {NODE_SITE: "site-a", NODE_STATE_DIR: str(tmp_path / "state")}
    good = _train_msg(test_cfg, 7)
    reply = app(good, _context(test_cfg, node_cfg))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    shared = {k: np.array(v, copy=True) for k, v in record_to_arrays(
        good.content[ARRAYS_KEY]).items()}  # fmt: skip
    name = sorted(shared)[0]
    if poison == "nan":
        shared[name].flat[0] = np.nan
    else:
        shared[name] = shared[name].astype(getattr(np, poison))
    bad = Message(
        RecordDict(
            {ARRAYS_KEY: arrays_to_record(shared), CONFIG_KEY: good.content[CONFIG_KEY]}
        ),
        dst_node_id=7,
        message_type="train",
    )
    reply = app(bad, _context(test_cfg, node_cfg))
    assert reply.has_error() and reply.error.code == SITE_CONFIG


def test_flowers_own_codes_are_named_in_the_round_log() -> None:
    from common.wire.faults import describe_reply_error

    # a site whose SuperNode refused the app (unsigned, outside its apps limits)
    assert "refused the app" in describe_reply_error(7)
    assert describe_reply_error(8) == "code 8: the ClientApp process crashed"
    assert describe_reply_error(77) == "code 77: unknown error code"
