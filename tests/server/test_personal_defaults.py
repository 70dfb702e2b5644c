"""Two-phase protocol under FedBN: the initial model's norm layers reach the sites."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord

from common.detector.checkpoint import save_checkpoint
from common.detector.model import build_detector, norm_keys
from common.detector.model.initial import detector_model_config
from common.keys import PERSONAL_DEFAULTS_KEY
from common.wire.federation import (
    PersonalizationConfig,
    arrays_to_record,
    load_federation_config,
)
from server.initial import initial_global_arrays, initial_personal_defaults
from server.strategies import build_strategy
from simulation.grid import InProcessGrid
from tests.conftest import REPO

SIM_TEST = REPO / "configs" / "federation" / "sim-test.yaml"


def _base(tmp_path: Path, local_norm: bool):
    cfg = load_federation_config(SIM_TEST)
    cfg = dataclasses.replace(
        cfg,
        strategy=dataclasses.replace(cfg.strategy, name="personalized"),
        personalization=PersonalizationConfig(
            local_norm=local_norm, personal_head=True
        ),
        run_dir=tmp_path / "run",
        state_dir=tmp_path / "state",
    )
    model_cfg = detector_model_config(cfg.trainer.options)
    model = build_detector(model_cfg)
    for k in norm_keys(model):
        t = model.state_dict()[k]
        if t.is_floating_point():
            t.fill_(0.5)
    path = save_checkpoint(tmp_path / "base.pt", model, model_cfg)
    return dataclasses.replace(cfg, initial_checkpoint=path), model


def test_fedbn_run_sends_the_base_norms_with_every_message(tmp_path: Path) -> None:
    cfg, model = _base(tmp_path, local_norm=True)
    defaults = initial_personal_defaults(cfg)
    floats = {k for k in norm_keys(model) if model.state_dict()[k].is_floating_point()}
    assert set(defaults) == floats
    assert all(np.all(v == 0.5) for v in defaults.values())
    # never part of the aggregated model
    assert not set(defaults) & set(initial_global_arrays(cfg))
    strategy = build_strategy(cfg)
    strategy.personal_defaults = arrays_to_record(defaults)
    arrays = arrays_to_record(initial_global_arrays(cfg))
    grid = InProcessGrid(lambda m, c: m, {1: ("A", "s", None), 2: ("B", "s", None)}, {})
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    assert len(msgs) == 2
    for msg in msgs:
        sent = msg.content.array_records[PERSONAL_DEFAULTS_KEY]
        assert set(sent) == floats


def test_no_defaults_without_fedbn_or_checkpoint(tmp_path: Path) -> None:
    cfg, _ = _base(tmp_path, local_norm=False)
    assert initial_personal_defaults(cfg) == {}
    assert (
        initial_personal_defaults(dataclasses.replace(cfg, initial_checkpoint=None))
        == {}
    )


def test_a_site_takes_defaults_only_where_it_has_no_personal_copy(
    tmp_path: Path,
) -> None:
    from client.site_model import SiteModel
    from client.state import SiteState
    from common.errors import ConfigError

    cfg, base = _base(tmp_path, local_norm=True)
    defaults = initial_personal_defaults(cfg)
    shared = initial_global_arrays(cfg)
    model = build_detector(detector_model_config(cfg.trainer.options))
    site = SiteModel(model, cfg.personalization, SiteState(tmp_path / "s", "A"))
    site.set_defaults(defaults, "server message")
    sd = site.compose(shared).state_dict()
    assert all(np.allclose(sd[k].numpy(), 0.5) for k in defaults)
    # a site with its own norms keeps them
    for k in defaults:
        model.state_dict()[k].fill_(2.0)
    site.save_personal(None)  # no round in progress: committed directly
    assert site.personal()
    sd = site.compose(shared).state_dict()
    assert all(np.allclose(sd[k].numpy(), 2.0) for k in defaults)
    # hostile defaults are refused, naming the array
    name = sorted(defaults)[0]
    bad = [
        {"backbone.body.conv1.weight": shared["backbone.body.conv1.weight"]},
        {name: np.zeros((3, 3), np.float32)},
        {name: np.full(defaults[name].shape, np.nan, np.float32)},
        {name: np.zeros(defaults[name].shape, np.float16)},  # would quantise
    ]
    for arrays in bad:
        with pytest.raises(ConfigError, match="personal defaults"):
            site.set_defaults(arrays, "server message")
