"""Replies that move nothing, and replies that lie, through the real strategies.

A site that did not train this round (its DP budget spent:
``client.detector_trainer``'s ``replying the received shared arrays
unchanged``) sends the global model back, a delta of norm exactly 0. When
such replies are half the round, the lower median of the delta norms is 0;
the clip must not then scale every update that did move to nothing and
freeze the model for the rest of the run, nor let an attacker go unclipped
while one honest site trained.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.attacks import (
    add,
    aggregate,
    diff,
    fedavg,
    make_reply,
    norm,
    regime_config,
)
from common.wire.federation import FederationConfig

Arrays = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def fed() -> FederationConfig:
    """A plain-FedAvg config (default validation: clip 2.0, cap on)."""
    return FederationConfig(name="lying")


@pytest.fixture(scope="module")
def g() -> Arrays:
    rng = np.random.default_rng(3)
    return {
        "conv.weight": rng.normal(0, 0.1, (8, 4, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(0, 0.1, 8).astype(np.float32),
    }


def _delta(g: Arrays, seed: int, size: float = 0.01) -> Arrays:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, size, v.shape) for k, v in g.items()}


def _close(a: Arrays, b: Arrays, atol: float = 1e-6) -> None:
    for k in b:
        np.testing.assert_allclose(a[k], b[k], atol=atol, err_msg=k)


@pytest.mark.parametrize("strategy", ["fedavg", "fedmedian", "fedavgm"])
def test_a_site_that_did_not_train_does_not_freeze_the_round(
    strategy: str, fed: FederationConfig, g: Arrays
) -> None:
    """One site trains, the other replies the global model (1 example)."""
    d = _delta(g, 1)
    site = add(g, d)
    replies = [make_reply(1, site, 160), make_reply(2, dict(g), 1)]
    out, s = aggregate(regime_config(fed, strategy, {}), g, [replies])
    assert out is not None
    assert s.last["train"].adjusted == []  # nothing to clip: one update moved
    if strategy == "fedmedian":  # the median of two is their mean
        expected = add(g, d, 0.5)
    else:  # FedAvg (FedAvgM's first step is FedAvg's at rate 1)
        expected = add(g, d, 160 / 161)
    _close(out, expected)
    # without the clip the result is the same: the idle site costs nothing more
    plain, _ = aggregate(
        regime_config(fed, strategy, {"clip_factor": 0.0}),
        g,
        [[make_reply(1, site, 160), make_reply(2, dict(g), 1)]],
    )
    assert plain is not None
    _close(out, plain)


def test_idle_majority_still_clips_an_attacker_to_the_trained_update(
    fed: FederationConfig, g: Arrays
) -> None:
    """Two idle sites, one honest h, one attacker 20 h: attacker clipped to 2 h."""
    d = _delta(g, 2)
    h = norm(d)
    replies = [
        make_reply(1, dict(g), 10),
        make_reply(2, dict(g), 10),
        make_reply(3, add(g, d), 10),
        make_reply(4, add(g, _delta(g, 9), 20 * h / norm(_delta(g, 9))), 10),
    ]
    out, s = aggregate(regime_config(fed, "fedavg", {}), g, [replies])
    assert out is not None and len(s.last["train"].valid) == 4
    adj = [a.as_dict() for a in s.last["train"].adjusted]
    assert [(a["node"], a["kind"]) for a in adj] == [(4, "clip")]
    assert adj[0]["after"] == pytest.approx(2 * h, rel=1e-6)
    # every aggregated delta <= c * h: the mean moved at most (c + 1) h from d's
    assert norm(diff(out, g)) <= 2 * h * (1 + 1e-5)


@pytest.mark.parametrize("strategy", ["fedavg", "fedmedian", "fedadam", "fedavgm"])
def test_a_round_in_which_no_site_moved_keeps_the_global_model(
    strategy: str, fed: FederationConfig, g: Arrays
) -> None:
    """Every delta 0: no clip, no division by 0, the global model (float32 sums)."""
    replies = [make_reply(n, dict(g), 10) for n in (1, 2, 3)]
    out, s = aggregate(regime_config(fed, strategy, {}), g, [replies])
    assert out is not None and s.last["train"].adjusted == []
    for k in g:
        assert np.all(np.isfinite(out[k]))
        np.testing.assert_allclose(out[k], g[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n_honest", [1, 2])
def test_a_first_claim_of_max_weight_reaches_but_never_passes_the_bound(
    n_honest: int, fed: FederationConfig, g: Arrays
) -> None:
    """Sign flip x5 claiming 1e7 examples in its first round: <= (c + 1) h."""
    ds = [_delta(g, 10 + i) for i in range(n_honest)]
    h = max(norm(d) for d in ds)
    sizes = [160, 32][:n_honest]
    honest = [add(g, d) for d in ds]
    replies = [
        make_reply(i + 1, a, n)
        for i, (a, n) in enumerate(zip(honest, sizes, strict=True))
    ]
    replies.append(make_reply(99, add(g, ds[0], -5.0), 10_000_000))
    out, _ = aggregate(regime_config(fed, "fedavg", {}), g, [replies])
    assert out is not None
    moved = norm(diff(out, fedavg(honest, sizes)))
    c = fed.validation.clip_factor
    assert moved <= (c + 1) * h * (1 + 1e-5)
    assert moved > 0.9 * (c + 1) * h  # and it is reached (sign flip, all weight)
    assert math.isfinite(moved)
