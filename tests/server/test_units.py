"""Validation, strategy registry, checkpoints, site state, config parsing."""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SType
from flwr.supercore.task_identity import TaskIdentity

from client.state import SiteState
from common.errors import ConfigError, shown
from common.keys import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES, TRAIN_LOSS
from common.wire.federation import (
    ACCURACY,
    CPM_MASS,
    EVAL_LOSS,
    FederationConfig,
    FitInstructions,
    ValidationConfig,
    arrays_to_record,
    load_federation_config,
)
from server.checkpoints import CheckpointStore
from server.faults import aggregate_present_metrics
from server.strategies import STRATEGIES, build_strategy
from server.validation import screen_replies
from tests.conftest import TEST_YAML

GLOBAL = {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}


def _reply(
    node: int, arrays: dict, metrics: dict, extra: dict | None = None
) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, node, 1
    instr = Message(RecordDict({}), 1, "train")
    content = {ARRAYS_KEY: arrays_to_record(arrays), METRICS_KEY: MetricRecord(metrics)}
    content.update(extra or {})
    msg = Message(RecordDict(content), reply_to=instr)
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def _named_reply(node: int, arrays_key: str, metrics_key: str) -> Message:
    """A valid update whose records carry other names than the protocol's."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, node, 1
    instr = Message(RecordDict({}), 1, "train")
    arrays = {k: v * 1.1 + 0.01 for k, v in GLOBAL.items()}
    content = {
        arrays_key: arrays_to_record(arrays),
        metrics_key: MetricRecord({NUM_EXAMPLES: 10, TRAIN_LOSS: 0.5}),
    }
    msg = Message(RecordDict(content), reply_to=instr)
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def _ok(node: int, scale: float = 1.1) -> Message:
    arrays = {k: v * scale + 0.01 for k, v in GLOBAL.items()}
    return _reply(node, arrays, {NUM_EXAMPLES: 10, TRAIN_LOSS: 0.5})


def _screen(*msgs: Message, cfg: ValidationConfig | None = None):
    return screen_replies(list(msgs), cfg or ValidationConfig(), GLOBAL, "train")


def test_valid_update_accepted() -> None:
    out = _screen(_ok(5), _ok(6))
    assert len(out.valid) == 2 and not out.rejected
    assert out.per_node[5][NUM_EXAMPLES] == 10


def test_nan_update_dropped_with_reason() -> None:
    bad = {k: v.copy() for k, v in GLOBAL.items()}
    bad["w"][0, 0] = np.nan
    out = _screen(_ok(5), _reply(7, bad, {NUM_EXAMPLES: 10, TRAIN_LOSS: 0.5}))
    assert [m.metadata.src_node_id for m in out.valid] == [5]
    (rej,) = out.rejected
    assert rej.node_id == 7 and rej.check == "finite" and "'w'" in rej.reason


def test_wrong_shape_dropped() -> None:
    bad = dict(GLOBAL, w=np.ones((2, 3), np.float32))
    out = _screen(_reply(8, bad, {NUM_EXAMPLES: 1, TRAIN_LOSS: 0.1}))
    assert not out.valid and out.rejected[0].check == "shape"


def test_unknown_and_missing_key_dropped() -> None:
    extra = dict(GLOBAL, bn_running_mean=np.zeros(2, np.float32))
    missing = {"w": GLOBAL["w"]}
    out = _screen(
        _reply(1, extra, {NUM_EXAMPLES: 1, TRAIN_LOSS: 0.1}),
        _reply(2, missing, {NUM_EXAMPLES: 1, TRAIN_LOSS: 0.1}),
    )
    assert not out.valid
    assert [r.check for r in out.rejected] == ["keys", "keys"]
    assert "bn_running_mean" in out.rejected[0].reason
    assert "'b'" in out.rejected[1].reason


def test_norm_bound() -> None:
    huge = {k: v * 100 for k, v in GLOBAL.items()}
    cfg = ValidationConfig(max_relative_update_norm=5.0)
    out = _screen(_ok(1), _reply(2, huge, {NUM_EXAMPLES: 1, TRAIN_LOSS: 0.1}), cfg=cfg)
    assert len(out.valid) == 1 and out.rejected[0].check == "norm"
    # the same update passes a looser bound: the check is the bound, not the data
    loose = _screen(
        _reply(2, huge, {NUM_EXAMPLES: 1, TRAIN_LOSS: 0.1}),
        cfg=ValidationConfig(max_relative_update_norm=1000.0),
    )
    assert len(loose.valid) == 1


def test_metric_checks() -> None:
    out = _screen(
        _reply(1, GLOBAL, {NUM_EXAMPLES: 10, "patient-count": 3}),
        _reply(2, GLOBAL, {NUM_EXAMPLES: 0, TRAIN_LOSS: 0.1}),
        _reply(3, GLOBAL, {TRAIN_LOSS: 0.1}),
    )
    assert not out.valid
    assert {r.check for r in out.rejected} == {"metrics"}


def _evaluate_reply(node: int, metrics: dict) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, node, 1
    instr = Message(RecordDict({}), 1, "evaluate")
    msg = Message(RecordDict({METRICS_KEY: MetricRecord(metrics)}), reply_to=instr)
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


@pytest.mark.parametrize(
    ("metrics", "why"),
    [
        ({NUM_EXAMPLES: 100, ACCURACY: 1.7e308}, "'accuracy' = 1.7e+308 is outside"),
        ({NUM_EXAMPLES: 100, CPM_MASS: 1.5}, "'cpm-mass' = 1.5 is outside [0, 1]"),
        ({NUM_EXAMPLES: 100, EVAL_LOSS: -2.0}, "'eval-loss' = -2 is outside"),
        ({NUM_EXAMPLES: -1}, "'num-examples' = -1 is outside [0, "),
    ],
)
def test_an_evaluate_metric_outside_its_range_is_dropped(metrics, why) -> None:
    """One site's 1e308 would set the federated figure (and overflow the sum)."""
    out = screen_replies(
        [_evaluate_reply(1, {NUM_EXAMPLES: 50, CPM_MASS: 0.6}),
         _evaluate_reply(2, metrics)],
        ValidationConfig(), None, "evaluate",
    )  # fmt: skip
    assert [m.metadata.src_node_id for m in out.valid] == [1]
    (rej,) = out.rejected
    assert rej.check == "metrics" and why in rej.reason, rej.reason


def test_a_site_without_test_women_counts_for_nothing_and_is_not_rejected() -> None:
    """An evaluate reply with num-examples 0 (no CPM) is valid; a train one is not."""
    out = screen_replies(
        [_evaluate_reply(1, {NUM_EXAMPLES: 50, CPM_MASS: 0.6}),
         _evaluate_reply(2, {NUM_EXAMPLES: 0})],
        ValidationConfig(), None, "evaluate",
    )  # fmt: skip
    assert len(out.valid) == 2 and not out.rejected
    agg = aggregate_present_metrics([m.content for m in out.valid], NUM_EXAMPLES)
    assert dict(agg) == {CPM_MASS: 0.6}
    train = _screen(_reply(3, GLOBAL, {NUM_EXAMPLES: 0, TRAIN_LOSS: 0.1}))
    assert train.rejected[0].check == "metrics"


def test_config_record_in_reply_dropped() -> None:
    leak = {"cfg": ConfigRecord({"path": "/data/patient1.dcm"})}
    out = _screen(_reply(4, GLOBAL, {NUM_EXAMPLES: 1, TRAIN_LOSS: 0.1}, leak))
    assert not out.valid and out.rejected[0].check == "structure"


def test_differing_metric_names_drop_no_update_and_are_cut_to_the_shared_ones() -> None:
    # a node leaving train-loss out, first among two, used to outvote the
    # honest one (the "majority" of a tie was the first); now both are kept
    odd = _reply(9, GLOBAL, {NUM_EXAMPLES: 10})
    for replies in ((odd, _ok(1)), (_ok(1), _ok(2), odd)):
        out = _screen(*replies)
        assert len(out.valid) == len(replies) and not out.rejected
        for msg in out.valid:
            assert set(msg.content[METRICS_KEY].keys()) == {NUM_EXAMPLES}
        # what each node said is still on record
        assert out.per_node[1] == {NUM_EXAMPLES: 10, TRAIN_LOSS: 0.5}


def test_records_under_other_names_are_refused() -> None:
    for arrays_key, metrics_key in (("zz", METRICS_KEY), (ARRAYS_KEY, "m")):
        msg = _named_reply(3, arrays_key, metrics_key)
        out = _screen(_ok(1), msg)
        assert [m.metadata.src_node_id for m in out.valid] == [1]
        (rej,) = out.rejected
        assert rej.node_id == 3 and rej.check == "structure"
        assert repr(arrays_key if arrays_key != ARRAYS_KEY else metrics_key) in (
            rej.reason
        )


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.longdouble])
def test_an_array_in_another_float_type_is_refused(dtype: type) -> None:
    other = {k: v.astype(dtype) for k, v in GLOBAL.items()}
    out = _screen(_reply(6, other, {NUM_EXAMPLES: 1, TRAIN_LOSS: 0.1}), _ok(1))
    assert [m.metadata.src_node_id for m in out.valid] == [1]
    (rej,) = out.rejected
    assert rej.check == "shape" and "float32" in rej.reason


def _npy(value: np.ndarray, **kw: object) -> bytes:
    buf = io.BytesIO()
    np.save(buf, value, **kw)
    return buf.getvalue()


def _zipped() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, b=np.zeros(2, np.float32))
    return buf.getvalue()


@pytest.mark.parametrize(
    ("array", "why"),
    [
        (Array(dtype="float32", shape=(2,), stype="torch.Tensor",
               data=np.zeros(2, np.float32).tobytes()), "serialized as 'torch.Tensor'"),
        (Array(dtype="float32", shape=(2,), stype=SType.NUMPY, data=b"\x00" * 8),
         "not a numpy array"),
        (Array(dtype="float32", shape=(2,), stype=SType.NUMPY,
               data=_npy(np.array([1, 2], dtype=object), allow_pickle=True)),
         "its bytes hold shape (2,) and dtype 'object'"),
        (Array(dtype="x" * 500, shape=(2,), stype=SType.NUMPY, data=b""),
         "unknown dtype " + shown("x" * 500)),
        (Array(dtype="float32", shape=(2,), stype=SType.NUMPY, data=_zipped()),
         "not a numpy array"),
        # a (2,) record whose npy header declares 10**12 values: refused from
        # the header, before np.load would allocate 3.6 TiB
        (Array(dtype="float32", shape=(2,), stype=SType.NUMPY,
               data=_npy(np.zeros(2, np.float32)).replace(
                   b"(2,), }" + b" " * 12, b"(1000000000000,), }")),
         "its bytes hold shape (1000000000000,)"),
    ],
)  # fmt: skip
def test_a_malformed_array_drops_that_reply_and_the_run_goes_on(
    array: Array, why: str
) -> None:
    """Bytes that are no numpy array, a pickle, an unknown dtype: one reply dropped."""
    bad = _ok(6)
    bad.content[ARRAYS_KEY]["b"] = array
    out = _screen(bad, _ok(1))
    assert [m.metadata.src_node_id for m in out.valid] == [1]
    (rej,) = out.rejected
    assert rej.node_id == 6 and rej.check == "shape" and why in rej.reason
    assert len(rej.reason) < 200  # the sender's text is cut short


def test_a_reply_no_check_foresaw_is_dropped_by_type_alone(monkeypatch) -> None:
    import server.validation as validation

    def boom(msg: Message, *a: object) -> None:
        if msg.metadata.src_node_id == 6:
            raise RuntimeError("secret text from the sender's bytes")
        return {NUM_EXAMPLES: 10}

    monkeypatch.setattr(validation, "check_train_content", boom)
    out = _screen(_ok(6), _ok(1))
    assert [m.metadata.src_node_id for m in out.valid] == [1]
    (rej,) = out.rejected
    assert rej.check == "malformed" and "secret" not in rej.reason
    assert "RuntimeError" in rej.reason


def test_a_negative_running_variance_is_refused() -> None:
    """It would turn the averaged norm layer's output into NaN at every site."""
    glob = {"bn.running_var": np.ones(4, np.float32)}
    honest = _reply(1, {"bn.running_var": np.full(4, 1.1, np.float32)},
                    {NUM_EXAMPLES: 10})  # fmt: skip
    lying = _reply(2, {"bn.running_var": np.array([1, 1, -0.2, 1], np.float32)},
                   {NUM_EXAMPLES: 10})  # fmt: skip
    zero = _reply(
        3, {"bn.running_var": np.array([1, 0, 1, 1], np.float32)}, {NUM_EXAMPLES: 10}
    )  # a channel that never varied: harmless
    out = screen_replies([honest, lying, zero], ValidationConfig(), glob, "train")
    assert [m.metadata.src_node_id for m in out.valid] == [1, 3]
    (rej,) = out.rejected
    assert rej.check == "finite" and "negative variance" in rej.reason


def test_an_evaluate_reply_with_arrays_is_refused() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 4, 1
    ins = Message(RecordDict({}), 4, "evaluate")
    metrics = MetricRecord({NUM_EXAMPLES: 3})
    ok = Message(RecordDict({METRICS_KEY: metrics}), reply_to=ins)
    blob = arrays_to_record({"x": np.zeros(1 << 16, np.float32)})
    bad = Message(RecordDict({ARRAYS_KEY: blob, METRICS_KEY: metrics}), reply_to=ins)
    out = screen_replies([ok, bad], ValidationConfig(), None, "evaluate")
    assert out.valid == [ok]
    (rej,) = out.rejected
    assert rej.check == "structure" and "no arrays" in rej.reason


def test_strategy_registry(test_cfg: FederationConfig) -> None:
    assert set(STRATEGIES) == {
        "fedavg",
        "fedprox",
        "personalized",
        "fedmedian",
        "fedtrimmedavg",
        "fedavgm",
        "fedadam",
    }
    s = build_strategy(test_cfg)
    assert type(s).name == "personalized"
    plain = dataclasses.replace(
        test_cfg,
        personalization=dataclasses.replace(test_cfg.personalization, local_norm=False),
    )
    with pytest.raises(ConfigError, match="personalized needs"):
        build_strategy(plain)
    from flwr.serverapp.strategy import FedAvg, FedProx

    assert isinstance(
        build_strategy(
            dataclasses.replace(
                plain, strategy=dataclasses.replace(plain.strategy, name="fedavg")
            )
        ),
        FedAvg,
    )
    prox_cfg = dataclasses.replace(
        plain,
        strategy=dataclasses.replace(plain.strategy, name="fedprox", proximal_mu=0.1),
    )
    assert isinstance(build_strategy(prox_cfg), FedProx)
    with pytest.raises(
        ConfigError,
        match="valid names: fedadam, fedavg, fedavgm, fedmedian, fedprox, "
        "fedtrimmedavg, personalized",
    ):
        build_strategy(
            dataclasses.replace(
                plain, strategy=dataclasses.replace(plain.strategy, name="fedsgd")
            )
        )
    with pytest.raises(ConfigError, match="proximal_mu"):
        build_strategy(
            dataclasses.replace(
                plain, strategy=dataclasses.replace(plain.strategy, name="fedprox")
            )
        )


def test_fedprox_sends_mu(test_cfg: FederationConfig) -> None:
    cfg = dataclasses.replace(
        test_cfg,
        strategy=dataclasses.replace(
            test_cfg.strategy, name="fedprox", proximal_mu=0.3
        ),
        personalization=dataclasses.replace(test_cfg.personalization, local_norm=False),
    )
    strat = build_strategy(cfg)

    class G:
        def get_node_ids(self):
            return [11, 12]

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    msgs = list(
        strat.configure_train(
            3, arrays_to_record(GLOBAL), FitInstructions(3).to_config_record(), G()
        )
    )
    assert sorted(m.metadata.dst_node_id for m in msgs) == [11, 12]
    ins = FitInstructions.from_config_record(msgs[0].content["config"])
    assert ins.proximal_mu == pytest.approx(0.3) and ins.server_round == 3


def test_sampling_wait_is_bounded(test_cfg: FederationConfig) -> None:
    import time

    strat = build_strategy(test_cfg)

    class G:
        def get_node_ids(self):
            return [11]  # fewer than min_available_nodes (2)

    t0 = time.monotonic()
    msgs = list(
        strat.configure_train(
            1, arrays_to_record(GLOBAL), FitInstructions(1).to_config_record(), G()
        )
    )
    assert msgs == [] and time.monotonic() - t0 < 5


def test_too_few_valid_keeps_previous(test_cfg: FederationConfig) -> None:
    # plain FedAvg arithmetic: no norm clipping (tests/server/test_robust.py)
    unclipped = dataclasses.replace(test_cfg.validation, clip_factor=0.0)
    strat = build_strategy(dataclasses.replace(test_cfg, validation=unclipped))
    strat._global = dict(GLOBAL)
    bad = {k: v.copy() for k, v in GLOBAL.items()}
    bad["b"][:] = np.inf
    arrays, metrics = strat.aggregate_train(1, [_reply(3, bad, {NUM_EXAMPLES: 1})])
    assert arrays is None and metrics is None
    arrays, _ = strat.aggregate_train(1, [_ok(1, 1.0), _ok(2, 3.0)])
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), GLOBAL["w"] * 2 + 0.01, rtol=1e-5)


def test_aggregate_does_not_depend_on_the_order_replies_arrive(
    test_cfg: FederationConfig,
) -> None:
    import itertools

    strat = build_strategy(test_cfg)
    strat._global = dict(GLOBAL)
    rng = np.random.default_rng(0)
    replies = []
    for node in (1, 2, 3, 4):
        arrays = {
            k: (v + rng.normal(0, 0.3, v.shape)).astype(np.float32)
            for k, v in GLOBAL.items()
        }
        n = int(rng.integers(1, 997))
        replies.append(_reply(node, arrays, {NUM_EXAMPLES: n, TRAIN_LOSS: 0.5}))
    # float32 sums in list order differ in the last bits between orders;
    # canonical_order makes every order give the very same bytes
    results = set()
    for perm in itertools.permutations(replies):
        arrays, _ = strat.aggregate_train(1, list(perm))
        assert arrays is not None
        results.add(b"".join(arrays[k].numpy().tobytes() for k in sorted(arrays)))
    assert len(results) == 1


def test_checkpoint_roundtrip_and_latest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    assert store.latest() is None
    store.save(0, GLOBAL, config={"name": "x"})
    store.save(1, {k: v + 1 for k, v in GLOBAL.items()}, metrics={"a": 1})
    (tmp_path / "round-00002.npz").write_bytes(b"half written")  # no JSON: ignored
    last = store.latest()
    assert last is not None and last.round == 1 and last.meta["metrics"] == {"a": 1}
    np.testing.assert_array_equal(last.arrays["w"], GLOBAL["w"] + 1)
    (tmp_path / "round-00001.npz").write_bytes(b"garbage")
    with pytest.raises(Exception, match="round-00001.npz"):
        store.load(1)


def test_prune_keeps_round_zero_and_the_newest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for rnd in range(6):
        store.save(rnd, {k: v + rnd for k, v in GLOBAL.items()})
    assert store.prune(0) == [] and store.rounds() == [0, 1, 2, 3, 4, 5]
    assert store.prune(2) == [1, 2, 3]
    assert store.rounds() == [0, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"round-{r:05d}.{ext}" for r in (0, 4, 5) for ext in ("json", "npz")
    ]
    np.testing.assert_array_equal(store.load(0).arrays["w"], GLOBAL["w"])
    # a prune cut short after the .json went: the lone .npz is not a round
    (tmp_path / "round-00004.json").unlink()
    assert store.rounds() == [0, 5] and store.latest_readable().round == 5


def test_keep_checkpoints_of_one_is_refused(tmp_path: Path) -> None:
    from common.config import from_mapping
    from common.wire.federation import FederationConfig

    with pytest.raises(ValueError, match="keep_checkpoints.*at least 2.*got 1"):
        FederationConfig(keep_checkpoints=1)
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        from_mapping({"keep_checkpoints": -3}, FederationConfig, source="x.yaml")


def test_site_state_survives_restart(tmp_path: Path) -> None:
    st = SiteState(tmp_path, "hosp-a")
    assert st.load_personal() is None and st.read_meta() == {}
    st.save_personal({"bn.weight": np.arange(3.0)})
    st.record_round(4, "train", {NUM_EXAMPLES: 5})
    again = SiteState(tmp_path, "hosp-a")  # "restarted daemon"
    assert again.read_meta()["last_round"] == 4
    again.record_round(1, "train", {NUM_EXAMPLES: 5})  # a later run, from round 1
    assert again.read_meta()["last_round"] == 1
    np.testing.assert_array_equal(again.load_personal()["bn.weight"], np.arange(3.0))
    assert not list((tmp_path / "hosp-a").glob("*.tmp"))
    for bad in ("../escape", "a\\b", "nul\0"):
        with pytest.raises(Exception, match="plain word"):
            SiteState(tmp_path, bad)


def test_config_errors_name_key_and_value(tmp_path: Path) -> None:
    cfg = load_federation_config(TEST_YAML)
    assert cfg.num_rounds == 2 and cfg.personalization.local_norm
    bad = tmp_path / "f.yaml"
    bad.write_text("num_rounds: 0\n")
    with pytest.raises(ConfigError, match=r"f.yaml: num_rounds: must be >= 1, got 0"):
        load_federation_config(bad)
    bad.write_text("participation: {min_train_nodes: 5, min_available_nodes: 2}\n")
    with pytest.raises(ConfigError, match="min_train_nodes"):
        load_federation_config(bad)
    bad.write_text("trainer: {lr_schedule: linear}\n")
    with pytest.raises(ConfigError, match=r"trainer.lr_schedule: .*'linear'"):
        load_federation_config(bad)
    bad.write_text("trainer: {lr_schedule: cosine, lr_min_factor: 1.5}\n")
    with pytest.raises(ConfigError, match=r"trainer.lr_min_factor: must be <= 1"):
        load_federation_config(bad)
    with pytest.raises(ConfigError, match="server-round"):
        FitInstructions.from_config_record({})
    with pytest.raises(ConfigError, match="local-epochs"):
        FitInstructions.from_config_record({"server-round": 1, "local-epochs": "3"})


@pytest.mark.parametrize(
    ("key", "value", "rule"),
    [
        ("server-round", -4, "must be >= 1"),
        ("server-round", 0, "must be >= 1"),  # round 0 is the initial model
        ("local-epochs", 10**12, "must be <= 1000"),
        ("local-epochs", 0, "must be >= 1"),
        ("learning-rate", 1e30, "must be <= 10"),
        ("learning-rate", -0.1, "must be >= 0"),
        ("batch-size", -1, "must be >= 1"),
        ("batch-size", 10**6, "must be <= 4096"),
        ("proximal-mu", -1.0, "must be >= 0"),
    ],
)
def test_instructions_out_of_range_are_refused_by_name(
    key: str, value: float, rule: str
) -> None:
    """A server message may ask no more of a site than a federation config
    file could: the same ranges, the source, key and value named."""
    record = {**FitInstructions(3).to_config_record(), key: value}
    with pytest.raises(ConfigError) as info:
        FitInstructions.from_config_record(record, source="msg")
    assert str(info.value).startswith(f"msg: {key}: {rule}")
    assert str(info.value).endswith(f"got {value!r}")


def test_instructions_in_range_still_parse() -> None:
    cfg = load_federation_config(TEST_YAML)
    sent = FitInstructions.from_federation(cfg, cfg.num_rounds)
    assert FitInstructions.from_config_record(sent.to_config_record()) == sent
    edge = {"server-round": 1, "local-epochs": 1000, "learning-rate": 0,
            "batch-size": 4096, "proximal-mu": 0.0}  # fmt: skip
    ins = FitInstructions.from_config_record(edge)
    assert (ins.local_epochs, ins.learning_rate, ins.batch_size) == (1000, 0.0, 4096)


@pytest.mark.parametrize(
    "path", sorted((TEST_YAML.parent).glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_federation_configs_load(path: Path) -> None:
    cfg = load_federation_config(path)
    build_strategy(cfg)  # strategy and personalization agree


def test_round_learning_rate_schedules() -> None:
    """Constant: the configured rate; cosine: full rate in round 1, the floor in
    the last round, monotone between, held past the last round."""
    from common.wire.federation import TrainerConfig

    const = TrainerConfig(learning_rate=0.01)
    assert {const.round_learning_rate(r, 12) for r in range(1, 13)} == {0.01}
    cos = TrainerConfig(learning_rate=0.01, lr_schedule="cosine", lr_min_factor=0.1)
    rates = [cos.round_learning_rate(r, 12) for r in range(1, 13)]
    assert rates[0] == pytest.approx(0.01) and rates[-1] == pytest.approx(0.001)
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))
    assert cos.round_learning_rate(20, 12) == pytest.approx(0.001)  # past the end
    assert cos.round_learning_rate(1, 1) == pytest.approx(0.01)  # one round
    zero = dataclasses.replace(cos, lr_min_factor=0.0)
    assert zero.round_learning_rate(12, 12) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("name: '..'\n", "name"),
        ("sites: [a, '..']\n", "sites[1]"),
        ("sites: ['a\\b']\n", "sites[0]"),
        ("trainer: {options: {lr: .nan}}\n", "trainer.options.lr"),
    ],
)
def test_federation_names_are_plain_and_options_finite(
    tmp_path: Path, text: str, key: str
) -> None:
    bad = tmp_path / "f.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_federation_config(bad)


def _lying(arrays: dict, actual: dict) -> Message:
    """A reply whose records declare ``arrays``' shapes but carry ``actual``'s bytes."""
    from flwr.app import Array, ArrayRecord

    msg = _reply(9, arrays, {NUM_EXAMPLES: 10, TRAIN_LOSS: 0.5})
    record = ArrayRecord(
        {
            name: Array(
                dtype=str(a.dtype),
                shape=tuple(a.shape),
                stype="numpy.ndarray",
                data=Array(actual.get(name, a)).data,
            )
            for name, a in arrays.items()
        }
    )
    msg.content.array_records[ARRAYS_KEY] = record
    return msg


@pytest.mark.parametrize(
    "actual",
    [
        {"w": np.float32([1.05])},  # one value, FedAvg would broadcast it
        {"w": np.ones((2, 3), np.float32)},  # the right size, another shape
        {"b": np.zeros(3, np.float32)},  # FedAvg would fail on it
        {"w": np.ones((3, 2), np.float16)},  # another dtype under float32
        {"w": np.array([["a", "b"]] * 3)},  # not numbers at all
    ],
    ids=["scalar", "transposed", "longer", "float16", "strings"],
)
def test_an_array_whose_bytes_are_not_what_it_declares_is_refused(
    actual: dict,
) -> None:
    """The declaration (shape, dtype) is the sender's word: the decoded array
    must match the global model too, else FedAvg broadcasts or fails."""
    honest = {k: v * 1.1 for k, v in GLOBAL.items()}
    out = _screen(_lying(honest, actual), _ok(1))
    assert [m.metadata.src_node_id for m in out.valid] == [1]
    (rej,) = out.rejected
    assert rej.node_id == 9 and rej.check == "shape"
    assert repr(next(iter(actual))) in rej.reason


@pytest.mark.parametrize(
    ("meta", "field"),
    [
        ({"last_round": "x"}, "last_round"),
        ({"committed_round": 1.5}, "committed_round"),
        ({"history": [1, 2]}, "history"),
        ({"discarded_rounds": ["a"]}, "discarded_rounds"),
        ({"last_phase": {"a": 1}}, "last_phase"),
    ],
)
def test_malformed_site_metadata_is_refused_naming_the_field(
    tmp_path: Path, meta: dict, field: str
) -> None:
    """meta.json is the site's own file, but a crash, a disk fault or a hand
    edit must give a SiteStateError naming the field, not a TypeError later."""
    import json

    from client.state import SiteStateError

    st = SiteState(tmp_path, "h")
    st.meta_path.parent.mkdir(parents=True, exist_ok=True)
    st.meta_path.write_text(json.dumps(meta))
    with pytest.raises(SiteStateError, match=f"field '{field}' is malformed"):
        st.read_meta()


def test_one_node_cannot_outweigh_the_others_in_the_reported_metrics() -> None:
    """Evaluate replies are weighted by num-examples; a node's later claims are
    capped at its first one, as in train, so a lie cannot dominate the
    federation's reported CPM."""
    cfg = FederationConfig(name="eval-cap")
    strategy = build_strategy(cfg)

    def reply(node: int, n: int, cpm: float) -> Message:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, node, 1
        ins = Message(RecordDict({}), node, "evaluate")
        metrics = MetricRecord({NUM_EXAMPLES: n, "eval-loss": 1.0, "accuracy": cpm})
        msg = Message(RecordDict({METRICS_KEY: metrics}), reply_to=ins)
        msg.metadata.__dict__["_src_node_id"] = node
        return msg

    first = strategy.aggregate_evaluate(1, [reply(1, 10, 0.9), reply(2, 10, 0.1)])
    assert first is not None and first["accuracy"] == pytest.approx(0.5)
    lied = strategy.aggregate_evaluate(2, [reply(1, 10, 0.9), reply(2, 1_000_000, 0.1)])
    assert lied is not None and lied["accuracy"] == pytest.approx(0.5)
    (adj,) = strategy.last["evaluate"].adjusted
    assert (adj.node_id, adj.kind, adj.after) == (2, "cap", 10.0)


def test_a_run_may_name_only_the_apps_own_federation_config(tmp_path: Path) -> None:
    """federation-config comes from whoever launches the run: it may name a
    config file of the app, not any YAML file on the site's machine."""
    from common.wire.federation import (
        RUN_FEDERATION_CONFIG,
        federation_config_from_run_config,
    )

    app_root = TEST_YAML.parents[2]  # the folder holding configs/
    rel = str(TEST_YAML.relative_to(app_root))
    assert federation_config_from_run_config({RUN_FEDERATION_CONFIG: rel}, app_root)
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text(TEST_YAML.read_text())
    for raw in (str(outside), "../" * 12 + str(outside).lstrip("/")):
        with pytest.raises(ConfigError, match="is outside the app"):
            federation_config_from_run_config({RUN_FEDERATION_CONFIG: raw}, app_root)


@pytest.mark.parametrize("name", ["fedavg", "personalized", "fedadam"])
def test_a_proximal_weight_outside_fedprox_is_refused_by_name(
    tmp_path: Path, name: str
) -> None:
    """It was sent to the sites, which trained as FedProx under another name."""
    p = tmp_path / "fed.yaml"
    p.write_text(f"name: x\nstrategy: {{name: {name}, proximal_mu: 0.5}}\n")
    with pytest.raises(
        ConfigError, match=rf"fed.yaml: strategy: proximal_mu: 0.5, .*'{name}'"
    ):
        load_federation_config(p)
    p.write_text("name: x\nstrategy: {name: fedprox, proximal_mu: 0.5}\n")
    assert load_federation_config(p).strategy.proximal_mu == 0.5
