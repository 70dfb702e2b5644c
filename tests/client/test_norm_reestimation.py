"""``trainer.options.reestimate_norm``: fresh FedBN statistics at the site.

After each round's local training the site re-estimates its BatchNorm running
statistics on its own training images (never the test women) with the weights
it now has; they stay on the site like every FedBN layer, so what it sends is
the same with or without them. Settings under which the statistics would
leave the site, or escape DP's clipping, are refused by name.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from client.detector_trainer import DetectorTrainer
from client.selection import reestimate_norm_stats
from common.errors import ConfigError
from common.wire.federation import FitInstructions, PersonalizationConfig
from tests.client.conftest import SITE, one_site_config
from tests.conftest import make_site_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_site_cache(tmp_path_factory.mktemp("restat") / SITE, n_patients=4)


def _cfg(root: Path, *, local_norm: bool = True, **options: object):  # noqa: ANN202
    return one_site_config(
        root,
        name="restat-test",
        learning_rate=1e-2,
        personalization=PersonalizationConfig(local_norm=local_norm),
        max_steps=2,
        head_epochs=0,
        fewshot=False,
        **options,
    )


def _fit(root: Path, cache: Path, **options: object):  # noqa: ANN202
    cfg = _cfg(root, **options)
    trainer = DetectorTrainer(SITE, root / "state", cfg, cache, None)
    shared = trainer.initial_shared()
    out, _ = trainer.fit(shared, FitInstructions.from_federation(cfg, 1))
    return trainer, out


def _stats(model: nn.Module) -> dict[str, np.ndarray]:
    return {
        k: v.detach().cpu().numpy().copy()
        for k, v in model.state_dict().items()
        if k.endswith(("running_mean", "running_var"))
    }


def test_statistics_are_re_estimated_on_training_images_and_never_sent(tmp_path, cache):
    fresh, sent_fresh = _fit(tmp_path / "a", cache, reestimate_norm=True)
    plain, sent_plain = _fit(tmp_path / "b", cache)
    # what crosses the network does not change (the statistics stay home)
    assert set(sent_fresh) == set(sent_plain)
    for k in sent_plain:
        np.testing.assert_array_equal(sent_fresh[k], sent_plain[k], err_msg=k)
    got = _stats(fresh.model)
    assert got, "the tiny detector has no BatchNorm layer"
    # the site's statistics are the ones its training images give (test women
    # excluded): recomputed independently on a copy of the trained model
    twin = copy.deepcopy(fresh.model)
    reestimate_norm_stats(twin, fresh.training_images(), fresh.device)
    want = _stats(twin)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    with_test = copy.deepcopy(fresh.model)
    reestimate_norm_stats(with_test, fresh.dataset.view("all"), fresh.device)
    assert any(not np.allclose(got[k], v) for k, v in _stats(with_test).items()), (
        "test women's images would have given the same statistics"
    )
    # and they differ from the momentum-averaged ones of the plain run
    assert any(not np.allclose(got[k], v) for k, v in _stats(plain.model).items())
    # the stored personal state carries them
    stored = fresh.site_model.state.load_personal() or {}
    keys = [k for k in stored if k.endswith("running_mean")]
    assert keys
    for k in keys:
        np.testing.assert_allclose(stored[k], got[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize(
    ("local_norm", "options", "needle"),
    [
        (False, {}, "needs personalization.local_norm: true"),
        (True, {"dp": True}, "cannot be combined with trainer.options.dp"),
    ],
)
def test_settings_that_would_leak_the_statistics_are_refused(
    tmp_path, cache, local_norm, options, needle
):
    cfg = _cfg(tmp_path, local_norm=local_norm, reestimate_norm=True, **options)
    with pytest.raises(ConfigError) as err:
        DetectorTrainer(SITE, tmp_path / "state", cfg, cache, None)
    assert "trainer.options.reestimate_norm" in str(err.value)
    assert needle in str(err.value)


def test_the_regime_turns_it_on_and_only_it(tmp_path):
    from simulation import regimes as R
    from simulation.run import RunRequest, regime_config

    base = dataclasses.replace(_cfg(tmp_path), sites=(SITE,))
    req = RunRequest(scenario=tmp_path / "s.yaml", federation=tmp_path / "f.yaml",
                     out=tmp_path / "out")  # fmt: skip
    for regime in sorted(R.FEDERATED):
        cfg = regime_config(base, regime, req, tmp_path / "run", [SITE])
        want = regime == R.PERSONALIZED_STATS
        assert bool(cfg.trainer.options.get("reestimate_norm")) is want, regime
