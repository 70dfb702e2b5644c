"""One node cannot steer the global model (issue 16, robust aggregation).

Unit level on the real guarded strategies with synthetic replies
(:mod:`benchmarks.attacks` builds them), plus one in-process run with real
toy ClientApps for the round-0 model and a robust aggregator under FedBN.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message

from benchmarks.attacks import (
    ATTACKS,
    add,
    aggregate,
    diff,
    fedavg,
    influence,
    make_reply,
    norm,
    regime_config,
)
from client.app import app
from client.toy import build_toy
from common.detector.checkpoint import save_checkpoint
from common.detector.model.initial import detector_model_config, initial_shared_arrays
from common.detector.model.registry import build_detector
from common.errors import CheckpointMismatch, ConfigError
from common.keys import ARRAYS_KEY, NUM_EXAMPLES
from common.wire.federation import (
    FederationConfig,
    PersonalizationConfig,
    StrategyConfig,
    TrainerConfig,
    ValidationConfig,
    arrays_to_record,
    load_federation_config,
    record_to_arrays,
)
from common.wire.runfolder import CHECKPOINT_DIR
from server.checkpoints import CheckpointStore
from server.federation import run_federation
from server.initial import InitialModelError, initial_global_arrays
from server.strategies.bounds import clip_updates, lower_median
from tests.conftest import REPO, LocalGrid, make_contexts

SIM_TEST = REPO / "configs" / "federation" / "sim-test.yaml"
OLD = {"clip_factor": 0.0, "cap_num_examples": False}  # validation of the landed code


@pytest.fixture(scope="module")
def fed() -> FederationConfig:
    """A plain-FedAvg config over small synthetic arrays (no personalization)."""
    return FederationConfig(name="robust")


@pytest.fixture(scope="module")
def g() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "conv.weight": rng.normal(0, 0.1, (16, 8, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(0, 0.1, 16).astype(np.float32),
        "head.weight": rng.normal(0, 0.1, (4, 16)).astype(np.float32),
    }


# --- the attacks, before and after ----------------------------------------------
@pytest.mark.parametrize("attack", [a for a in ATTACKS if a != "none"])
@pytest.mark.parametrize("n_honest", [1, 2])
def test_attack_bounded_with_new_defaults(
    attack: str, n_honest: int, fed: FederationConfig, g: dict[str, np.ndarray]
) -> None:
    """New defaults: accepted attackers move the model <= (c+1) h_max; old: more."""
    rng_seed = 11 + n_honest
    new = influence(
        regime_config(fed, "fedavg", {}), g, attack, n_honest, _rng(rng_seed)
    )
    old = influence(
        regime_config(fed, "fedavg", OLD), g, attack, n_honest, _rng(rng_seed)
    )
    # every probe of issue 16 passed the landed validation
    assert old["accepted"], attack
    assert new["influence"] <= new["bound"] + 1e-9, (attack, new)
    if attack in ("zeros-1e7", "zeros-1e7-first", "random4.9"):
        # the landed code let one node erase or swamp the model
        assert old["influence"] > 5 * new["bound"], (attack, old, new)
    if attack in ("scale4", "scale6"):
        assert new["influence"] < 0.8 * old["influence"], (attack, old, new)
    if attack == "signflip":  # same norm: nothing to clip, nor can it grow
        assert new["influence"] <= old["influence"] + 1e-9


@pytest.mark.parametrize("attack", [a for a in ATTACKS if a != "none"])
@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg"])
def test_robust_aggregators_stay_between_honest_updates(
    attack: str, strategy: str, fed: FederationConfig, g: dict[str, np.ndarray]
) -> None:
    """Two honest + one attacker: median / trimmed mean within ||d1 - d2||."""
    cfg = regime_config(fed, strategy, {})
    rng = _rng(3)
    out = influence(cfg, g, attack, 2, rng)
    # influence() drew the honest deltas from the same stream: redraw them
    from benchmarks.attacks import HONEST_NORM, honest_deltas

    d = honest_deltas(g, 3, HONEST_NORM, _rng(3))
    w_honest = fedavg([add(g, d[0]), add(g, d[1])], [160, 32])
    spread = norm(diff(d[0], d[1])) / norm(diff(w_honest, g))
    assert out["influence"] <= spread + 1e-6, (attack, out, spread)


def test_num_examples_capped_at_first_declaration(
    fed: FederationConfig, g: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    """Declared 10 in round 1, claims 10,000,000 in round 2 -> weighted as 10."""
    cfg = regime_config(fed, "fedavg", {"clip_factor": 0.0})
    up = add(g, {k: np.full(v.shape, 0.01) for k, v in g.items()})
    down = add(g, {k: np.full(v.shape, -0.01) for k, v in g.items()})

    def rounds() -> list[list[Message]]:  # fresh replies: aggregation edits them
        return [
            [make_reply(1, up, 10), make_reply(2, down, 10)],
            [make_reply(1, up, 10), make_reply(2, down, 10_000_000)],
        ]

    with caplog.at_level(logging.WARNING, logger="server.strategies.bounds"):
        result, strategy = aggregate(cfg, g, rounds())
    assert result is not None
    for k in g:  # equal weights: the two updates cancel
        np.testing.assert_allclose(result[k], g[k], atol=1e-6)
    adj = [a.as_dict() for a in strategy.last["train"].adjusted]
    assert adj == [{"node": 2, "kind": "cap", "before": 1e7, "after": 10.0}]
    assert "node 2 claims 10000000 examples, declared 10" in caplog.text
    # the landed behaviour: the inflated claim wins the average
    old_cfg = regime_config(fed, "fedavg", OLD)
    old, _ = aggregate(old_cfg, g, rounds())
    assert old is not None
    np.testing.assert_allclose(old["conv.bias"], down["conv.bias"], atol=1e-5)


def test_a_first_claim_of_zero_test_women_is_not_the_nodes_cap() -> None:
    """A site without test women (yet) says 0 in evaluate; later it has 40.

    Recording 0 as its first claim would cap every later count to 0, and its
    CPM would never enter the federated figure again.
    """
    from flwr.app import MetricRecord, RecordDict

    from common.keys import METRICS_KEY
    from common.wire.federation import ValidationConfig
    from server.strategies.bounds import cap_num_examples

    def ev(n: int) -> Message:
        msg = make_reply(2, {}, 1)
        msg.content = RecordDict({METRICS_KEY: MetricRecord({NUM_EXAMPLES: n})})
        return msg

    declared: dict[int, int] = {}
    assert cap_num_examples([ev(0)], declared, ValidationConfig(), "evaluate") == []
    assert declared == {}
    later = ev(40)
    assert cap_num_examples([later], declared, ValidationConfig(), "evaluate") == []
    assert declared == {2: 40} and later.content[METRICS_KEY][NUM_EXAMPLES] == 40


def test_claim_above_global_max_is_still_dropped(
    fed: FederationConfig, g: dict[str, np.ndarray]
) -> None:
    cfg = regime_config(fed, "fedavg", {"max_num_examples": 1000})
    up = add(g, {k: np.full(v.shape, 0.01) for k, v in g.items()})
    _, strategy = aggregate(cfg, g, [[make_reply(1, up, 10), make_reply(2, up, 1001)]])
    (rej,) = strategy.last["train"].rejected
    assert (rej.node_id, rej.check) == (2, "metrics")


def test_clip_uses_lower_median_and_logs_node(
    g: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    small = {k: np.full(v.shape, 0.001) for k, v in g.items()}
    r1 = make_reply(4, add(g, small), 10)
    r2 = make_reply(9, add(g, small, 50.0), 10)  # 50x longer
    n1 = norm(small)
    assert lower_median([n1, 50 * n1]) == pytest.approx(n1)
    with caplog.at_level(logging.WARNING, logger="server.strategies.bounds"):
        adj = clip_updates([r1, r2], g, 2.0)
    assert [(a.node_id, a.kind) for a in adj] == [(9, "clip")]
    assert adj[0].after == pytest.approx(2 * n1)
    assert "clipped update of node 9" in caplog.text
    clipped = record_to_arrays(r2.content[ARRAYS_KEY])
    assert norm(diff(clipped, g)) == pytest.approx(2 * n1, rel=1e-4)
    # the honest one is untouched; factor 0 clips nothing
    np.testing.assert_array_equal(
        record_to_arrays(r1.content[ARRAYS_KEY])["conv.bias"],
        add(g, small)["conv.bias"],
    )
    r3 = make_reply(9, add(g, small, 50.0), 10)
    assert clip_updates([r1, r3], g, 0.0) == []


def test_clipped_update_is_between_global_and_site(g: dict[str, np.ndarray]) -> None:
    """Scaling the delta keeps every value between global and site (variances > 0)."""
    var_g = {"bn.running_var": np.full(8, 1.0, np.float32)}
    honest = make_reply(1, {"bn.running_var": np.full(8, 1.01, np.float32)}, 5)
    hostile_var = np.full(8, 1e-3, np.float32)
    hostile = make_reply(2, {"bn.running_var": hostile_var}, 5)
    clip_updates([honest, hostile], var_g, 2.0)
    out = record_to_arrays(hostile.content[ARRAYS_KEY])["bn.running_var"]
    assert np.all(out > hostile_var) and np.all(out < 1.0)


# --- robust aggregators with honest replies -----------------------------------------
@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg"])
def test_robust_equals_fedavg_on_identical_updates(
    strategy: str, fed: FederationConfig, g: dict[str, np.ndarray]
) -> None:
    d = {k: np.full(v.shape, 0.02) for k, v in g.items()}
    replies = [make_reply(n, add(g, d), e) for n, e in ((1, 10), (2, 50), (3, 7))]
    same = [make_reply(n, add(g, d), e) for n, e in ((1, 10), (2, 50), (3, 7))]
    robust, _ = aggregate(regime_config(fed, strategy, {}), g, [replies])
    plain, _ = aggregate(regime_config(fed, "fedavg", {}), g, [same])
    assert robust is not None and plain is not None
    for k in g:
        np.testing.assert_allclose(robust[k], plain[k], rtol=1e-6, atol=1e-7)


def test_trimmed_mean_cuts_one_of_four(
    fed: FederationConfig, g: dict[str, np.ndarray]
) -> None:
    """trim_beta 0.34 with 4 updates drops the highest and lowest per coordinate."""
    cfg = regime_config(
        fed, "fedtrimmedavg", {"clip_factor": 0.0, "max_relative_update_norm": 1e6}
    )
    deltas = [0.01, 0.02, 0.03, 5.0]
    replies = [
        make_reply(i + 1, add(g, {k: np.full(v.shape, x) for k, v in g.items()}), 10)
        for i, x in enumerate(deltas)
    ]
    out, _ = aggregate(cfg, g, [replies])
    assert out is not None
    np.testing.assert_allclose(out["conv.bias"], g["conv.bias"] + 0.025, atol=1e-6)


def test_trim_beta_out_of_range_refused(tmp_path: Path) -> None:
    y = tmp_path / "f.yaml"
    y.write_text("name: x\nstrategy: {name: fedtrimmedavg, trim_beta: 0.5}\n")
    with pytest.raises(ConfigError, match=r"strategy\.trim_beta"):
        load_federation_config(y)


# --- round 0: the server makes the initial model ----------------------------------
def _times_1000(node: int, reply: Message) -> Message:
    if reply.content.array_records:
        arrays = record_to_arrays(reply.content[ARRAYS_KEY])
        arrays = {k: v * np.float32(1000) for k, v in arrays.items()}
        reply.content[ARRAYS_KEY] = arrays_to_record(arrays)
    return reply


@pytest.mark.parametrize("strategy", ["personalized", "fedmedian"])
def test_node_reply_never_becomes_initial_model(
    strategy: str, test_cfg: FederationConfig, tmp_path: Path
) -> None:
    """A node answering every message x1000 cannot set round 0; FedBN + median run."""
    cfg = dataclasses.replace(
        test_cfg,
        num_rounds=1,
        strategy=StrategyConfig(name=strategy),
        sites=("site-a", "site-b", "site-c"),
        participation=dataclasses.replace(
            test_cfg.participation, min_available_nodes=3, min_train_nodes=3
        ),
    )
    contexts = make_contexts(cfg, tmp_path / "state", list(cfg.sites))
    hostile = min(contexts)
    grid = LocalGrid(
        app,
        contexts,
        tamper=lambda n, r: _times_1000(n, r) if n == hostile else r,
    )
    summary = run_federation(grid, cfg, tmp_path / "run")
    assert not any(m.metadata.message_type == "query" for m in grid.sent)
    store = CheckpointStore(tmp_path / "run" / CHECKPOINT_DIR)
    site = build_toy("x", tmp_path / "x", cfg).initial_shared()
    r0 = store.load(0).arrays
    assert set(r0) == set(site)  # shared arrays only: no FedBN norm layer
    assert not any("features.1." in k for k in r0)
    for k, v in site.items():
        np.testing.assert_array_equal(r0[k], v)
    line = summary.rounds[0]
    assert line["status"] == "aggregated"
    # the x1000 round-1 update was rejected by the norm bound, not aggregated
    assert [(r["node"], r["check"]) for r in line["train"]["rejected"]] == [
        (hostile, "norm")
    ]
    r1 = store.load(1).arrays
    assert norm(diff(r1, r0)) < 0.5 * norm(r0)


@pytest.mark.parametrize(
    "pers", [PersonalizationConfig(), PersonalizationConfig(True, True)]
)
def test_server_initial_model_equals_the_sites(
    pers: PersonalizationConfig, tmp_path: Path
) -> None:
    """What the server builds is what every site's trainer starts from."""
    from client.detector_trainer import DetectorOptions, make_detector_trainer

    toy = FederationConfig(
        personalization=pers, trainer=TrainerConfig(options={"channels": 4})
    )
    site = build_toy("a", tmp_path / "toy", toy).initial_shared()
    _assert_same(initial_shared_arrays(toy), site)
    det = dataclasses.replace(load_federation_config(SIM_TEST), personalization=pers)
    trainer = make_detector_trainer("a", tmp_path / "det", det, data_dir=tmp_path)
    _assert_same(initial_shared_arrays(det), trainer.initial_shared())
    assert DetectorOptions().model_config() == detector_model_config({})
    cpu = load_federation_config(REPO / "configs" / "federation" / "sim-cpu.yaml")
    opts = {
        k: v
        for k, v in cpu.trainer.options.items()
        if k in DetectorOptions.__annotations__
    }
    assert DetectorOptions(**opts).model_config() == detector_model_config(opts)


def test_initial_checkpoint_checked_against_config(tmp_path: Path) -> None:
    cfg = load_federation_config(SIM_TEST)
    model_cfg = detector_model_config(cfg.trainer.options)
    model = build_detector(model_cfg)
    for p in model.parameters():
        p.data.fill_(0.125)
    good = save_checkpoint(tmp_path / "good.pt", model, model_cfg)
    arrays = initial_global_arrays(dataclasses.replace(cfg, initial_checkpoint=good))
    assert set(arrays) == set(initial_shared_arrays(cfg))
    assert np.all(arrays["backbone.body.conv1.weight"] == 0.125)
    other = dataclasses.replace(model_cfg, fpn_channels=model_cfg.fpn_channels * 2)
    bad = save_checkpoint(tmp_path / "bad.pt", build_detector(other), other)
    with pytest.raises(CheckpointMismatch, match="model_config.fpn_channels"):
        initial_global_arrays(dataclasses.replace(cfg, initial_checkpoint=bad))
    toy = FederationConfig(initial_checkpoint=good)
    with pytest.raises(ConfigError, match="needs trainer 'detector'"):
        initial_global_arrays(toy)
    with pytest.raises(ValueError, match="not both"):
        FederationConfig(initial_checkpoint=good, initial_arrays=good)


def test_initial_arrays_must_fit_the_model(tmp_path: Path) -> None:
    cfg = FederationConfig()
    arrays = initial_shared_arrays(cfg)
    name = sorted(arrays)[0]
    wrong = dict(arrays, **{name: np.zeros((2, 2), np.float32)})
    np.savez(tmp_path / "w.npz", **wrong)
    with pytest.raises(InitialModelError, match=f"array '{name}' has shape"):
        initial_global_arrays(
            dataclasses.replace(cfg, initial_arrays=tmp_path / "w.npz")
        )
    # another float type would become the global's, and every site's float32
    # update would then be refused as of another dtype
    f64 = dict(arrays, **{name: arrays[name].astype(np.float64)})
    np.savez(tmp_path / "f64.npz", **f64)
    with pytest.raises(InitialModelError, match=f"array '{name}' has dtype float64"):
        initial_global_arrays(
            dataclasses.replace(cfg, initial_arrays=tmp_path / "f64.npz")
        )
    np.savez(tmp_path / "ok.npz", **arrays)
    out = initial_global_arrays(
        dataclasses.replace(cfg, initial_arrays=tmp_path / "ok.npz")
    )
    _assert_same(out, arrays)


def test_cli_refuses_a_checkpoint_for_another_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``mammofed-server run --initial-checkpoint`` checks before submitting."""
    from server.cli import main

    cfg = load_federation_config(SIM_TEST)
    model_cfg = detector_model_config(cfg.trainer.options)
    other = dataclasses.replace(model_cfg, arch="small")
    bad = save_checkpoint(tmp_path / "bad.pt", build_detector(other), other)
    argv = ["run", "--federation", str(SIM_TEST), "--insecure", "--superlink"]
    # port 9 (discard) is never dialled: the check fails first
    rc = main([*argv, "127.0.0.1:9", "--initial-checkpoint", str(bad)])
    assert rc == 2
    assert "model_config.arch" in capsys.readouterr().err
    rc = main([*argv, "127.0.0.1:9", "--initial-checkpoint", str(tmp_path / "no.pt")])
    assert rc == 2
    assert "--initial-checkpoint" in capsys.readouterr().err


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_validation_defaults_are_the_documented_ones() -> None:
    v = ValidationConfig()
    assert (v.clip_factor, v.cap_num_examples) == (2.0, True)
