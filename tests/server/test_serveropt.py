"""Server optimizers ``fedavgm`` / ``fedadam`` (issue 14): formulas, guards, resume.

Unit level on the real guarded strategies with hand-made replies
(:func:`benchmarks.attacks.make_reply`), cross-checked against Flower's own
``FedAvgM`` / ``FedAdam``; then short in-process federations with the toy
ClientApp (a few seconds each).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message
from flwr.serverapp.strategy import FedAdam, FedAvgM

from benchmarks.attacks import make_reply
from client.app import app
from common.errors import CheckpointMismatch, ConfigError
from common.fileio import save_arrays
from common.keys import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES
from common.wire.federation import (
    FederationConfig,
    StrategyConfig,
    ValidationConfig,
    arrays_to_record,
    load_federation_config,
    record_to_arrays,
)
from common.wire.runfolder import CHECKPOINT_DIR
from server.checkpoints import CheckpointStore
from server.federation import run_federation
from server.strategies import STRATEGIES, GuardedFedAvg, build_strategy
from server.strategies.optimizers import Adam, Momentum
from server.strategies.serveropt import DIGEST_KEY, ServerOptFedAvg, model_digest
from tests.conftest import REPO, LocalGrid, make_contexts

Arrays = dict[str, np.ndarray]
NO_CLIP = ValidationConfig(clip_factor=0.0)


class _Nodes:
    """The part of a Grid that sampling uses: three connected nodes."""

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


def _cfg(strategy: StrategyConfig, validation: ValidationConfig = NO_CLIP):
    return FederationConfig(name="opt", strategy=strategy, validation=validation)


def _global(seed: int = 5) -> Arrays:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(0, 0.1, (4, 2, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(0, 0.1, 4).astype(np.float32),
        "head.weight": rng.normal(0, 0.1, (2, 4)).astype(np.float32),
    }


def _site(x: Arrays, rng: np.random.Generator, scale: float = 0.02) -> Arrays:
    return {
        k: (v + rng.normal(0, scale, v.shape)).astype(np.float32) for k, v in x.items()
    }


def _mean(sites: Sequence[Arrays], weights: Sequence[int]) -> Arrays:
    total = float(sum(weights))
    return {
        k: sum(
            w / total * s[k].astype(np.float64)
            for s, w in zip(sites, weights, strict=True)
        )
        for k in sites[0]
    }


def _round(strategy: GuardedFedAvg, rnd: int, x: Arrays, replies: list[Message]):
    """One server round on ``strategy``: configure (records x_t), aggregate."""
    list(strategy.configure_train(rnd, arrays_to_record(x), ConfigRecord(), _Nodes()))
    out, _ = strategy.aggregate_train(rnd, replies)
    return None if out is None else record_to_arrays(out)


def ref_fedavgm(
    x: Arrays, avgs: Sequence[Arrays], lr: float, beta: float
) -> list[Arrays]:
    """x_1, x_2, ... by the FedAvgM formula in float64."""
    xs, m = [], {k: np.zeros(v.shape) for k, v in x.items()}
    cur = {k: v.astype(np.float64) for k, v in x.items()}
    for avg in avgs:
        m = {k: beta * m[k] + (avg[k] - cur[k]) for k in cur}
        cur = {k: cur[k] + lr * m[k] for k in cur}
        xs.append(cur)
    return xs


def ref_fedadam(
    x: Arrays, avgs: Sequence[Arrays], eta: float, b1: float, b2: float, tau: float
) -> list[Arrays]:
    """x_1, x_2, ... by Flower's FedAdam formula (rounds 1, 2, ...) in float64."""
    xs = []
    m = {k: np.zeros(v.shape) for k, v in x.items()}
    v2 = {k: np.zeros(v.shape) for k, v in x.items()}
    cur = {k: a.astype(np.float64) for k, a in x.items()}
    for rnd, avg in enumerate(avgs, start=1):
        d = {k: avg[k] - cur[k] for k in cur}
        m = {k: b1 * m[k] + (1 - b1) * d[k] for k in cur}
        v2 = {k: b2 * v2[k] + (1 - b2) * d[k] ** 2 for k in cur}
        eta_t = eta * np.sqrt(1 - b2 ** (rnd + 1)) / (1 - b1 ** (rnd + 1))
        cur = {k: cur[k] + eta_t * m[k] / (np.sqrt(v2[k]) + tau) for k in cur}
        xs.append(cur)
    return xs


def _close(a: Arrays, b: Arrays, **tol: float) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], err_msg=k, **tol)


# --- the formulas, two rounds ---------------------------------------------------
def test_fedavgm_two_rounds_equal_the_formula() -> None:
    strategy = build_strategy(
        _cfg(
            StrategyConfig(
                name="fedavgm", server_learning_rate=0.7, server_momentum=0.5
            )
        )
    )
    assert isinstance(strategy, ServerOptFedAvg)
    rng = np.random.default_rng(0)
    x0 = _global()
    s1 = [_site(x0, rng), _site(x0, rng)]
    x1 = _round(strategy, 1, x0, [make_reply(1, s1[0], 30), make_reply(2, s1[1], 10)])
    assert x1 is not None
    s2 = [_site(x1, rng), _site(x1, rng)]
    x2 = _round(strategy, 2, x1, [make_reply(1, s2[0], 30), make_reply(2, s2[1], 10)])
    assert x2 is not None
    avg1, avg2 = _mean(s1, [30, 10]), _mean(s2, [30, 10])
    want = ref_fedavgm(x0, [avg1, avg2], 0.7, 0.5)
    _close(x1, want[0], rtol=1e-5, atol=1e-7)
    # x2 is computed from the strategy's own x1 (float32), as the server does
    m1 = {k: avg1[k] - x0[k] for k in x0}
    want2 = {k: x1[k] + 0.7 * (0.5 * m1[k] + avg2[k] - x1[k]) for k in x0}
    _close(x2, want2, rtol=1e-5, atol=1e-7)
    # momentum carried round 1 into round 2: without it the result is elsewhere
    plain2 = {k: x1[k] + 0.7 * (avg2[k] - x1[k]) for k in x0}
    gap = max(float(np.max(np.abs(x2[k] - plain2[k]))) for k in x0)
    assert gap > 1e-3
    assert all(v.dtype == np.float32 for v in x2.values())


def test_fedadam_two_rounds_equal_the_formula() -> None:
    s = StrategyConfig(name="fedadam", eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-3)
    strategy = build_strategy(_cfg(s))
    rng = np.random.default_rng(1)
    x0 = _global()
    s1 = [_site(x0, rng), _site(x0, rng)]
    x1 = _round(strategy, 1, x0, [make_reply(1, s1[0], 5), make_reply(2, s1[1], 15)])
    assert x1 is not None
    s2 = [_site(x1, rng), _site(x1, rng)]
    x2 = _round(strategy, 2, x1, [make_reply(1, s2[0], 5), make_reply(2, s2[1], 15)])
    assert x2 is not None
    avg1, avg2 = _mean(s1, [5, 15]), _mean(s2, [5, 15])
    want = ref_fedadam(x0, [avg1, avg2], 0.05, 0.8, 0.95, 1e-3)
    _close(x1, want[0], rtol=1e-5, atol=1e-6)
    _close(x2, want[1], rtol=1e-5, atol=1e-6)
    assert Adam(0.05, 0.8, 0.95, 1e-3).step_size(1) == pytest.approx(
        0.05 * np.sqrt(1 - 0.95**2) / (1 - 0.8**2)
    )


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_same_step_as_flowers_own_strategy(name: str) -> None:
    """Three rounds on float arrays: ours and Flower's agree (conventions, bias)."""
    s = StrategyConfig(
        name=name, server_learning_rate=0.8, server_momentum=0.9, eta=0.1
    )
    ours = build_strategy(_cfg(s))
    flower: FedAvgM | FedAdam
    if name == "fedavgm":
        flower = FedAvgM(server_learning_rate=0.8, server_momentum=0.9)
    else:
        flower = FedAdam(eta=0.1, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau)
    rng = np.random.default_rng(2)
    x_ours = x_fl = _global()
    for rnd in (1, 2, 3):
        sites = [_site(x_ours, rng), _site(x_ours, rng)]

        def replies(sites: list[Arrays] = sites) -> list[Message]:
            return [make_reply(1, sites[0], 7), make_reply(2, sites[1], 3)]

        new = _round(ours, rnd, x_ours, replies())
        if isinstance(flower, FedAvgM):
            if flower.current_arrays is None:
                flower.current_arrays = arrays_to_record(x_fl)
        else:
            flower.current_arrays = dict(x_fl)
        rec, _ = flower.aggregate_train(rnd, replies())
        assert new is not None and rec is not None
        x_ours, x_fl = new, record_to_arrays(rec)
        _close(x_ours, x_fl, rtol=1e-4, atol=1e-6)


def test_momentum_zero_rate_one_is_fedavg_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    x0 = _global()
    sites = [_site(x0, rng) for _ in range(3)]

    def replies() -> list[Message]:
        return [make_reply(n + 1, s, 4 + 3 * n) for n, s in enumerate(sites)]

    plain = build_strategy(_cfg(StrategyConfig(name="fedavg")))
    m0 = build_strategy(
        _cfg(
            StrategyConfig(
                name="fedavgm", server_learning_rate=1.0, server_momentum=0.0
            )
        )
    )
    for rnd in (1, 2):
        a = _round(plain, rnd, x0, replies())
        b = _round(m0, rnd, x0, replies())
        assert a is not None and b is not None
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
            assert a[k].dtype == b[k].dtype


# --- guards ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_rejected_update_never_reaches_the_optimizer(name: str) -> None:
    """A x1e4 update is dropped by validation; the step uses the honest mean only."""
    s = StrategyConfig(name=name, server_learning_rate=0.5, server_momentum=0.9)
    strategy = build_strategy(_cfg(s))
    rng = np.random.default_rng(4)
    x0 = _global()
    honest = [_site(x0, rng), _site(x0, rng)]
    hostile = {k: v * np.float32(1e4) for k, v in honest[0].items()}
    out = _round(
        strategy,
        1,
        x0,
        [
            make_reply(1, honest[0], 10),
            make_reply(9, hostile, 10),
            make_reply(2, honest[1], 20),
        ],
    )
    assert out is not None
    assert [(r.node_id, r.check) for r in strategy.last["train"].rejected] == [
        (9, "norm")
    ]
    avg = _mean(honest, [10, 20])
    if name == "fedavgm":
        want = ref_fedavgm(x0, [avg], 0.5, 0.9)[0]
    else:
        want = ref_fedadam(x0, [avg], s.eta, s.beta_1, s.beta_2, s.tau)[0]
    _close(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_kept_round_leaves_model_and_state_alone(name: str) -> None:
    """Fewer valid updates than required: previous model kept, no optimizer step."""
    strategy = build_strategy(_cfg(StrategyConfig(name=name)))
    assert isinstance(strategy, ServerOptFedAvg)
    rng = np.random.default_rng(6)
    x0 = _global()
    assert _round(strategy, 1, x0, [make_reply(1, _site(x0, rng), 5)]) is not None
    before = strategy.optimizer.state()
    bad = {k: np.full(v.shape, np.nan, np.float32) for k, v in x0.items()}
    assert _round(strategy, 2, x0, [make_reply(1, bad, 5)]) is None
    after = strategy.optimizer.state()
    assert before and set(before) == set(after)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


@pytest.mark.parametrize("opt", [Momentum(0.5, 0.9), Adam(0.01, 0.9, 0.99, 1e-3)])
def test_only_floating_arrays_take_the_step(opt: Momentum | Adam) -> None:
    """Integer arrays and running statistics keep the FedAvg value and type."""
    x = {"w": np.full((2, 2), 0.5, np.float32), "n": np.array(7, np.int64)}
    avg = {"w": np.full((2, 2), 0.6, np.float32), "n": np.array(9, np.int64)}
    for rnd in (1, 2):
        out = opt.step(x, avg, rnd)
        assert out["n"].dtype == np.int64 and int(out["n"]) == 9
        assert out["w"].dtype == np.float32 and np.all(out["w"] > 0.5)
        x = out
    assert all(k.endswith("/w") for k in opt.state())
    # a running variance keeps the FedAvg value (never stepped below zero)
    var = {"bn.running_var": np.full(3, 0.2, np.float32)}
    low = {"bn.running_var": np.full(3, 0.01, np.float32)}
    for rnd in (3, 4, 5):
        var = opt.step(var, low, rnd)
        np.testing.assert_array_equal(var["bn.running_var"], low["bn.running_var"])
    assert not any("running_var" in k for k in opt.state())
    with pytest.raises(ValueError, match="differ from the global"):
        opt.step(x, {"w": avg["w"]}, 3)
    with pytest.raises(ValueError, match="'w' has shape"):
        opt.step(x, {"w": np.zeros(3, np.float32), "n": avg["n"]}, 3)


# --- config ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("server_learning_rate", 0.0),
        ("server_learning_rate", 11.0),
        ("server_momentum", 1.0),
        ("server_momentum", -0.1),
        ("eta", 0.0),
        ("beta_1", 1.0),
        ("beta_2", 1.0),
        ("tau", 0.0),
        ("tau", 2.0),
    ],
)
def test_bad_optimizer_config_names_file_and_key(
    key: str, value: float, tmp_path: Path
) -> None:
    y = tmp_path / "fed.yaml"
    y.write_text(f"name: x\nstrategy: {{name: fedadam, {key}: {value}}}\n")
    with pytest.raises(ConfigError, match=rf"fed\.yaml: strategy\.{key}: .*{value}"):
        load_federation_config(y)


def test_nan_optimizer_value_refused(tmp_path: Path) -> None:
    y = tmp_path / "fed.yaml"
    y.write_text("name: x\nstrategy: {name: fedavgm, server_momentum: .nan}\n")
    # refused by the loader's rule for every float (finite), naming the key
    with pytest.raises(
        ConfigError,
        match=r"fed\.yaml: strategy\.server_momentum: must be a finite number, got nan",
    ):
        load_federation_config(y)


def test_registered_and_defaults() -> None:
    assert {"fedavgm", "fedadam"} <= set(STRATEGIES)
    with pytest.raises(ConfigError, match="fedadam, fedavg, fedavgm"):
        build_strategy(_cfg(StrategyConfig(name="fedadamw")))
    s = StrategyConfig()
    assert (s.server_learning_rate, s.server_momentum) == (1.0, 0.7)
    assert (s.eta, s.beta_1, s.beta_2, s.tau) == (0.03, 0.9, 0.99, 1e-3)
    m = build_strategy(_cfg(StrategyConfig(name="fedavgm")))
    a = build_strategy(_cfg(StrategyConfig(name="fedadam")))
    assert isinstance(m, ServerOptFedAvg) and isinstance(m.optimizer, Momentum)
    assert isinstance(a, ServerOptFedAvg) and isinstance(a.optimizer, Adam)
    assert (m.optimizer.learning_rate, m.optimizer.momentum) == (1.0, 0.7)
    assert not m.optimizer.identity and m.optimizer.stateful
    assert (a.optimizer.eta, a.optimizer.beta_1, a.optimizer.beta_2) == (
        0.03,
        0.9,
        0.99,
    )


def test_documented_examples_load(tmp_path: Path) -> None:
    """The strategy blocks docs/federation.md shows are valid configs."""
    doc = (REPO / "docs" / "federation.md").read_text()
    section = doc[doc.index("## Server optimizers") :]
    blocks = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    for i, block in enumerate(blocks):
        y = tmp_path / f"{i}.yaml"
        y.write_text("name: x\n" + block)
        cfg = load_federation_config(y)
        assert cfg.strategy.name in ("fedavgm", "fedadam")
        assert isinstance(build_strategy(cfg), ServerOptFedAvg)


def test_state_file_checked_against_the_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another model's state restarts (warning); a broken one for this model raises."""
    strategy = build_strategy(_cfg(StrategyConfig(name="fedavgm")))
    assert isinstance(strategy, ServerOptFedAvg)
    strategy.attach_checkpoints(tmp_path)
    x = _global()
    state = tmp_path / "server-opt-00001.npz"
    m = {f"m/{k}": np.ones_like(v) for k, v in x.items()}
    save_arrays(state, {**m, DIGEST_KEY: model_digest(_global(seed=6))})
    with caplog.at_level(logging.WARNING, logger="server.strategies.serveropt"):
        _round(strategy, 2, x, [])
    assert "written for another model" in caplog.text
    assert strategy.optimizer.state() == {}
    again = build_strategy(_cfg(StrategyConfig(name="fedavgm")))
    assert isinstance(again, ServerOptFedAvg)
    again.attach_checkpoints(tmp_path)
    save_arrays(state, {**m, DIGEST_KEY: model_digest(x)})
    _round(again, 2, x, [])
    assert set(again.optimizer.state()) == set(m)
    bad = build_strategy(_cfg(StrategyConfig(name="fedavgm")))
    assert isinstance(bad, ServerOptFedAvg)
    bad.attach_checkpoints(tmp_path)
    unknown = {"m/unknown": np.zeros(3, np.float32)}
    save_arrays(state, {**unknown, DIGEST_KEY: model_digest(x)})
    with pytest.raises(CheckpointMismatch, match=r"server-opt-00001\.npz.*m/unknown"):
        _round(bad, 2, x, [])


# --- in-process federations with the toy ClientApp ------------------------------
def _federate(
    cfg: FederationConfig, run: Path, state: Path, *, persist: bool = True
) -> LocalGrid:
    """Run ``cfg`` in-process; with ``persist`` the config names ``run`` as run_dir."""
    cfg = dataclasses.replace(cfg, run_dir=run if persist else None)
    grid = LocalGrid(app, make_contexts(cfg, state, list(cfg.sites)))
    run_federation(grid, cfg, run)
    return grid


def _train_means(grid: LocalGrid) -> list[Arrays]:
    """FedAvg (float64) of each round's train replies, in round order."""
    train = [r for r in grid.replies if r.metadata.message_type == "train"]
    n = 2  # two sites answer every round
    out = []
    for i in range(0, len(train), n):
        batch = train[i : i + n]
        sites = [record_to_arrays(r.content[ARRAYS_KEY]) for r in batch]
        weights = [int(r.content[METRICS_KEY][NUM_EXAMPLES]) for r in batch]
        out.append(_mean(sites, weights))
    return out


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_federation_end_to_end(
    name: str, test_cfg: FederationConfig, tmp_path: Path
) -> None:
    """Two rounds with FedBN: checkpoints follow the formula over the real replies."""
    s = StrategyConfig(
        name=name, server_learning_rate=0.8, server_momentum=0.6, eta=0.02
    )
    cfg = dataclasses.replace(test_cfg, strategy=s, validation=NO_CLIP)
    grid = _federate(cfg, tmp_path / "run", tmp_path / "state")
    store = CheckpointStore(tmp_path / "run" / CHECKPOINT_DIR)
    assert store.rounds() == [0, 1, 2]
    x0, x1, x2 = (store.load(r).arrays for r in (0, 1, 2))
    avgs = _train_means(grid)
    assert len(avgs) == 2
    if name == "fedavgm":
        want = ref_fedavgm(x0, avgs, 0.8, 0.6)
    else:
        want = ref_fedadam(x0, avgs, 0.02, s.beta_1, s.beta_2, s.tau)
    _close(x1, want[0], rtol=1e-4, atol=1e-6)
    _close(x2, want[1], rtol=1e-4, atol=1e-6)
    assert not any("features.1." in k for k in x2)  # FedBN norms stay on the sites
    for k in x2:
        assert x2[k].dtype == np.float32 and np.all(np.isfinite(x2[k]))
    assert any(not np.array_equal(x2[k], x1[k]) for k in x2)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_resumed_run_continues_the_optimizer_state(
    name: str,
    test_cfg: FederationConfig,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """3 rounds straight == 2 rounds + resume; without the state, it differs."""
    cfg = dataclasses.replace(
        test_cfg, num_rounds=3, strategy=StrategyConfig(name=name)
    )
    two = dataclasses.replace(cfg, num_rounds=2)

    def final(run: Path) -> Arrays:
        ckpt = CheckpointStore(run / CHECKPOINT_DIR).latest()
        assert ckpt is not None and ckpt.round == 3
        return ckpt.arrays

    _federate(cfg, tmp_path / "a", tmp_path / "sa")
    straight = final(tmp_path / "a")
    names = sorted(p.name for p in (tmp_path / "a" / CHECKPOINT_DIR).glob("server-*"))
    assert names == ["server-opt-00002.npz", "server-opt-00003.npz"]  # two newest

    _federate(two, tmp_path / "b", tmp_path / "sb")
    _federate(cfg, tmp_path / "b", tmp_path / "sb")
    resumed = final(tmp_path / "b")
    for k in straight:
        np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)

    _federate(two, tmp_path / "c", tmp_path / "sc", persist=False)
    with caplog.at_level(logging.WARNING, logger="server.strategies.serveropt"):
        _federate(cfg, tmp_path / "c", tmp_path / "sc", persist=False)
    assert "no checkpoint folder attached" in caplog.text
    assert "restarts from zero" in caplog.text
    restarted = final(tmp_path / "c")
    assert any(not np.array_equal(restarted[k], straight[k]) for k in straight)
