"""Few-shot sites in the federation and per-site adaptation settings.

A site with fewer labeled images than ``adapt.fewshot_max_labeled`` trains
only the detection head on top of the federated shared layers (TFA-style):
its reply carries the received non-head arrays bit-identical. The site
config's ``adapt`` section overrides the adaptation settings for that site,
validated when the file is loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.app import resolve_site
from client.detector_trainer import DetectorTrainer
from common.config.site import load_site_config
from common.detector.adapt import fewshot_frozen_keys
from common.detector.model import head_keys
from common.errors import ConfigError
from common.keys import CLASSES
from common.wire.federation import (
    FederationConfig,
    FitInstructions,
    PersonalizationConfig,
)
from tests.client.conftest import SITE, one_site_config
from tests.conftest import make_site_cache


def _fed(root: Path, *, local_norm: bool = True) -> FederationConfig:
    return one_site_config(
        root, name="fewshot-test",
        strategy="personalized" if local_norm else "fedavg", learning_rate=1e-2,
        personalization=PersonalizationConfig(local_norm=local_norm),
        max_steps=2, head_epochs=0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_site_cache(tmp_path_factory.mktemp("fs") / SITE, n_patients=3)


def _fit(root: Path, cache: Path, overrides: dict | None = None, **kw):
    cfg = _fed(root, **kw)
    trainer = DetectorTrainer(SITE, root / "state", cfg, cache, overrides)
    shared = trainer.initial_shared()
    out, metrics = trainer.fit(shared, FitInstructions.from_federation(cfg, 1))
    return trainer, shared, out, metrics


@pytest.mark.parametrize("local_norm", [True, False])
def test_few_labeled_images_train_the_head_only(tmp_path, cache, local_norm):
    trainer, before, after, metrics = _fit(tmp_path, cache, local_norm=local_norm)
    assert metrics["num-examples"] > 0
    frozen = set(fewshot_frozen_keys(trainer.model, trainer.personalization))
    heads = set(head_keys(trainer.model))
    shared_frozen = [k for k in before if k in frozen]
    assert shared_frozen, "nothing frozen"
    for k in shared_frozen:  # BatchNorm running stats included (fedavg case)
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    moved = [
        k for k in before if k in heads and not np.array_equal(after[k], before[k])
    ]
    assert moved, "the head did not train"


def test_site_config_can_force_full_training(tmp_path, cache):
    trainer, before, after, _ = _fit(tmp_path, cache, {"head_only": False})
    heads = set(head_keys(trainer.model))
    backbone = [k for k in before if k not in heads and k.endswith("weight")]
    assert any(not np.array_equal(after[k], before[k]) for k in backbone)
    # the automatic rule, switched off by the threshold, gives the same
    _, _, after2, _ = _fit(tmp_path / "b", cache, {"fewshot_max_labeled": 0})
    for k in before:
        np.testing.assert_array_equal(after2[k], after[k], err_msg=k)


def test_fewshot_option_off_trains_every_layer(tmp_path, cache):
    """Plain FedAvg / personalized regimes switch the automatic rule off."""
    import dataclasses

    cfg = _fed(tmp_path / "a")
    opts = {**cfg.trainer.options, "fewshot": False}
    cfg = dataclasses.replace(
        cfg, trainer=dataclasses.replace(cfg.trainer, options=opts)
    )
    trainer = DetectorTrainer(SITE, tmp_path / "a" / "state", cfg, cache, None)
    before = trainer.initial_shared()
    after, _ = trainer.fit(before, FitInstructions.from_federation(cfg, 1))
    _, _, forced, _ = _fit(tmp_path / "b", cache, {"head_only": False})
    for k in before:
        np.testing.assert_array_equal(after[k], forced[k], err_msg=k)


def test_only_the_adaptation_regime_tunes_few_shot_heads(tmp_path):
    from simulation import regimes as R
    from simulation.run import RunRequest, regime_config

    base = _fed(tmp_path)
    req = RunRequest(scenario=tmp_path / "s.yaml", federation=tmp_path / "f.yaml",
                     out=tmp_path / "out")  # fmt: skip
    for regime in sorted(R.FEDERATED):
        cfg = regime_config(base, regime, req, tmp_path / "run", [SITE])
        want = regime == R.PERSONALIZED_SSL
        assert cfg.trainer.options["fewshot"] is want, regime


def test_site_config_adapt_overrides_reach_the_trainer(tmp_path, cache):
    site_yaml = tmp_path / "site.yaml"
    site_yaml.write_text(
        f"name: {SITE}\nstate_dir: {tmp_path / 'state'}\ncache_dir: {cache}\n"
        "adapt:\n  rampup_steps: 7\n  unlabeled_ratio: 2\n"
        "  score_thresholds: {mass: 0.3, calcification: 0.6}\n"
    )
    cfg = _fed(tmp_path)
    binding = resolve_site({"site-config": str(site_yaml)}, cfg)
    assert binding.adapt["rampup_steps"] == 7
    trainer = DetectorTrainer(SITE, binding.state_dir, cfg, cache, binding.adapt)
    assert trainer.adapt.rampup_steps == 7 and trainer.adapt.unlabeled_ratio == 2
    assert trainer.adapt.score_thresholds == {"mass": 0.3, "calcification": 0.6}
    assert set(trainer.adapt.score_thresholds) == set(CLASSES)
    # what the site does not override still comes from the federation
    assert trainer.adapt.ema_decay == trainer.opts.ema_decay


@pytest.mark.parametrize(
    ("adapt", "needle"),
    [
        ("{rampup: 3}", "adapt.rampup: unknown key"),
        ("{unlabeled_ratio: -1}", "adapt.unlabeled_ratio: must be >= 0"),
        ("{head_only: maybe}", "adapt.head_only"),
        ("{ssl_enabled: false}", "adapt.ssl_enabled: is set for every site"),
    ],
)
def test_bad_site_adapt_section_names_file_and_key(tmp_path, adapt, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(f"name: x\nadapt: {adapt}\n")
    with pytest.raises(ConfigError) as err:
        load_site_config(path)
    assert str(path) in str(err.value) and needle in str(err.value)


def test_shipped_adapt_configs_validate():
    from common.config import load_config
    from common.detector.adapt import AdaptConfig

    repo = Path(__file__).resolve().parents[2]
    paths = sorted((repo / "configs" / "adapt").glob("*.yaml"))
    assert paths
    for path in paths:
        cfg = load_config(path, AdaptConfig)
        assert set(cfg.score_thresholds) == set(CLASSES)


def _with_options(cfg, **options):  # noqa: ANN001, ANN202
    import dataclasses

    opts = {**cfg.trainer.options, **options}
    return dataclasses.replace(
        cfg, trainer=dataclasses.replace(cfg.trainer, options=opts)
    )


def test_a_site_pastes_its_own_lesions_and_under_dp_each_womans_own(tmp_path, cache):
    """The lesion recipe at a site: paste from its labeled training images only."""
    from common.detector.transforms import GrowSmallBoxes, LesionPaste

    cfg = _with_options(_fed(tmp_path / "a"), paste=True, min_box_mm=12.0)
    trainer = DetectorTrainer(SITE, tmp_path / "a" / "state", cfg, cache, None)
    view = trainer._view("labeled", train=True)
    parts = view.transform.transforms  # type: ignore[attr-defined]
    paste = next(p for p in parts if isinstance(p, LesionPaste))
    assert any(isinstance(p, GrowSmallBoxes) for p in parts)
    # the bank holds lesions of this site's labeled training images, nothing else
    labeled = trainer._site_view("labeled")
    assert paste.source is labeled or len(paste.source) == len(labeled)
    assert sum(len(v) for v in paste.bank().values()) > 0
    _, metrics = trainer.fit(
        trainer.initial_shared(), FitInstructions.from_federation(cfg, 1)
    )
    assert metrics["skipped-steps"] == 0
    aug = trainer.opts.recipe(0.01, 1).augment
    assert aug.paste and not aug.paste_same_woman
    dp = _with_options(cfg, dp=True)
    private = DetectorTrainer(SITE, tmp_path / "b" / "state", dp, cache, None)
    aug = private.opts.recipe(0.01, 1).augment
    assert aug.paste and aug.paste_same_woman
    parts = private._view("labeled", train=True).transform.transforms  # type: ignore[attr-defined]
    assert next(p for p in parts if isinstance(p, LesionPaste)).same_woman


def test_the_consistency_ramp_is_a_federation_option(tmp_path, cache):
    """``trainer.options.ssl_rampup_steps``, ``ssl_unsup_weight`` and
    ``ssl_unlabeled_ratio`` reach every site's AdaptConfig; values out of
    range or of the wrong type are refused by name."""
    import dataclasses

    from client.detector_trainer import detector_options

    cfg = _fed(tmp_path)
    assert detector_options(cfg, "f.yaml").adapt_config(0).rampup_steps == 200
    opts = {**cfg.trainer.options, "ssl": True, "ssl_rampup_steps": 12}
    cfg = dataclasses.replace(
        cfg, trainer=dataclasses.replace(cfg.trainer, options=opts)
    )
    trainer = DetectorTrainer(SITE, tmp_path / "state", cfg, cache, None)
    assert trainer.adapt.rampup_steps == 12 and trainer.adapt.ssl_enabled
    bad = dataclasses.replace(
        cfg,
        trainer=dataclasses.replace(
            cfg.trainer, options={**opts, "ssl_rampup_steps": -1}
        ),
    )
    with pytest.raises(ConfigError, match="ssl_rampup_steps"):
        detector_options(bad, "f.yaml")
    assert trainer.adapt.unsup_weight == 1.0
    opts = {**opts, "ssl_unsup_weight": 0.0}
    cfg = dataclasses.replace(
        cfg, trainer=dataclasses.replace(cfg.trainer, options=opts)
    )
    assert detector_options(cfg, "f.yaml").adapt_config(0).unsup_weight == 0.0
    opts = {**opts, "ssl_unlabeled_ratio": 3}
    cfg = dataclasses.replace(
        cfg, trainer=dataclasses.replace(cfg.trainer, options=opts)
    )
    assert detector_options(cfg, "f.yaml").adapt_config(0).unlabeled_ratio == 3
    for key, value in (
        ("ssl_unsup_weight", -0.5),
        ("ssl_unsup_weight", "heavy"),
        ("ssl_unlabeled_ratio", 0),
        ("ssl_unlabeled_ratio", 1.5),
    ):
        bad = dataclasses.replace(
            cfg,
            trainer=dataclasses.replace(cfg.trainer, options={**opts, key: value}),
        )
        with pytest.raises(ConfigError, match=key):
            detector_options(bad, "f.yaml")


def _ssl_site(root: Path, **options: object):
    """A site of 2 labeled and 2 unlabeled women under a federation with ``ssl``."""
    import dataclasses

    from tests.conftest import make_ssl_site_cache

    cache = make_ssl_site_cache(root / SITE)
    cfg = _fed(root)
    opts = {**cfg.trainer.options, "ssl": True, "ssl_rampup_steps": 0, **options}
    cfg = dataclasses.replace(
        cfg, trainer=dataclasses.replace(cfg.trainer, options=opts)
    )
    return cfg, cache


@pytest.mark.parametrize("sync", ["copy_shared", "keep"])
def test_teacher_sync_decides_whether_the_teacher_takes_the_global_layers(
    tmp_path, sync_shared_calls, sync
):
    """``adapt.teacher_sync: keep`` was once read by nobody: the teacher always
    took the new global layers. Now only ``copy_shared`` copies them."""
    cfg, cache = _ssl_site(tmp_path)
    calls = sync_shared_calls
    trainer = DetectorTrainer(
        SITE, tmp_path / "state", cfg, cache, {"teacher_sync": sync}
    )
    assert trainer.adapt.teacher_sync == sync
    trainer.fit(trainer.initial_shared(), FitInstructions.from_federation(cfg, 1))
    assert trainer.site_model.teacher_path.is_file()  # the SSL round ran
    assert len(calls) == (1 if sync == "copy_shared" else 0)


def test_a_semi_supervised_round_says_it_drops_the_proximal_term(tmp_path, caplog):
    """FedProx's term is not in the semi-supervised round: the site says so."""
    import dataclasses

    cfg, cache = _ssl_site(tmp_path)
    trainer = DetectorTrainer(SITE, tmp_path / "state", cfg, cache, None)
    fit = dataclasses.replace(FitInstructions.from_federation(cfg, 1), proximal_mu=0.01)
    with caplog.at_level("WARNING", logger="client.detector_trainer"):
        trainer.fit(trainer.initial_shared(), fit)
    assert "proximal-mu 0.01" in caplog.text and "no proximal term" in caplog.text


@pytest.mark.parametrize(
    ("weight", "site_override"), [(1.0, None), (0.0, None), (1.0, 0.0)]
)
def test_unlabeled_images_count_toward_the_averaging_weight_only_with_their_loss(
    tmp_path, weight, site_override
):
    """``num-examples`` (the server's FedAvg weight) counts the unlabeled images
    a round ran only where their loss reaches the update: with
    ``ssl_unsup_weight`` 0 the shared layers learn from the labeled images
    alone, and the site weighs as much as a labeled-only site would. A site
    config's ``adapt.unsup_weight`` is the weight that decides."""
    from common.keys import NUM_EXAMPLES

    cfg, cache = _ssl_site(tmp_path, ssl_unsup_weight=weight, max_steps=0)
    over = None if site_override is None else {"unsup_weight": site_override}
    trainer = DetectorTrainer(SITE, tmp_path / "state", cfg, cache, over)
    if site_override is not None:
        weight = site_override
    n_lab = len(trainer._view("labeled", train=False))
    steps = -(-n_lab // cfg.trainer.batch_size)
    _, metrics = trainer.fit(
        trainer.initial_shared(), FitInstructions.from_federation(cfg, 1)
    )
    labeled = steps * cfg.trainer.batch_size * cfg.trainer.local_epochs
    if weight > 0:
        assert metrics[NUM_EXAMPLES] > labeled  # the unlabeled passes count
    else:
        assert metrics[NUM_EXAMPLES] == labeled


@pytest.fixture
def loader_draws(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of images each training loader is asked to draw, in order."""
    from common.detector.recipe import Recipe

    drawn: list[int] = []
    real = Recipe.loader

    def spy(self, dataset, num_samples, seed, num_workers=0):  # type: ignore[no-untyped-def]
        drawn.append(num_samples)
        return real(self, dataset, num_samples, seed, num_workers)

    monkeypatch.setattr(Recipe, "loader", spy)
    return drawn


@pytest.mark.parametrize("ssl", [True, False])
@pytest.mark.parametrize("rule", ["labeled", "all"])
def test_round_steps_all_takes_a_pass_over_every_training_image(
    tmp_path, loader_draws, ssl, rule
):
    """``round_steps: all`` sizes a local epoch by the site's labeled and
    unlabeled training images together (the steps a fully labeled site of its
    size takes), with or without the teacher; ``labeled`` by the labeled ones."""
    from common.keys import NUM_EXAMPLES

    cfg, cache = _ssl_site(tmp_path, ssl=ssl, max_steps=0, round_steps=rule)
    trainer = DetectorTrainer(SITE, tmp_path / "state", cfg, cache, None)
    n_lab = len(trainer._indices("labeled"))
    n_unl = len(trainer._indices("unlabeled"))
    assert n_lab > 0 and n_unl > 0
    _, metrics = trainer.fit(
        trainer.initial_shared(), FitInstructions.from_federation(cfg, 1)
    )
    batch = cfg.trainer.batch_size
    n = n_lab + (n_unl if rule == "all" else 0)
    steps = -(-n // batch)
    assert loader_draws[0] == steps * batch
    if not ssl:  # every step a labeled batch, nothing else counted
        assert metrics[NUM_EXAMPLES] == steps * batch * cfg.trainer.local_epochs


def test_round_steps_all_is_refused_under_dp(tmp_path):
    """DP-SGD draws its own women each step; ``round_steps: all`` would be
    silently ignored there, so the site refuses it, naming the field."""
    cfg, cache = _ssl_site(tmp_path, ssl=False, dp=True, round_steps="all")
    with pytest.raises(ConfigError, match=r"trainer\.options\.round_steps.*DP-SGD"):
        DetectorTrainer(SITE, tmp_path / "state", cfg, cache, None)


def test_round_steps_all_sizes_central_training_too(tmp_path, loader_draws):
    """The site-alone and central regimes follow the same rule
    (``client.local_training.train_central``)."""
    import dataclasses

    import torch

    from client.detector_trainer import detector_options
    from client.local_training import train_central
    from tests.conftest import make_ssl_site_cache

    cache = make_ssl_site_cache(tmp_path / SITE)
    cfg = _fed(tmp_path)
    for rule in ("labeled", "all"):
        opts = {**cfg.trainer.options, "max_steps": 0, "round_steps": rule}
        trainer = dataclasses.replace(cfg.trainer, options=opts)
        o = detector_options(dataclasses.replace(cfg, trainer=trainer), "test")
        train_central(
            [cache], o, epochs=1, lr=1e-3, batch_size=2, seed=0,
            device=torch.device("cpu"), label=f"test-{rule}",
        )  # fmt: skip
    assert loader_draws[1] > loader_draws[0]  # the unlabeled images add steps


def test_paste_consistency_cuts_lesions_from_the_site_labeled_images(
    tmp_path, monkeypatch
):
    """``ssl_consistency: paste`` reaches the site's AdaptConfig, and the
    consistency loss gets the site's labeled training images (never an
    unlabeled or test one) to cut its lesions from, in the federated round
    and in central training alike; an unknown mode is refused by name."""
    import dataclasses

    import torch

    from client.detector_trainer import detector_options
    from client.local_training import train_central
    from common.detector.adapt import teacher as teacher_mod

    seen: list[int] = []
    real = teacher_mod.ConsistencyLoss.__init__

    def spy(self, teacher, cfg, lesions=None):  # type: ignore[no-untyped-def]
        assert cfg.consistency == "paste"
        seen.append(len(lesions))
        real(self, teacher, cfg, lesions)

    monkeypatch.setattr(teacher_mod.ConsistencyLoss, "__init__", spy)
    cfg, cache = _ssl_site(tmp_path, ssl_consistency="paste", max_steps=0)
    trainer = DetectorTrainer(SITE, tmp_path / "state", cfg, cache, None)
    assert trainer.adapt.consistency == "paste"
    n_lab = len(trainer._indices("labeled"))
    trainer.fit(trainer.initial_shared(), FitInstructions.from_federation(cfg, 1))
    assert seen and set(seen) == {n_lab}
    assert trainer.site_model.teacher_path.is_file()
    o = detector_options(cfg, "test")
    train_central(
        [cache], o, epochs=1, lr=1e-3, batch_size=2, seed=0,
        device=torch.device("cpu"), label="test-paste", ssl=o.adapt_config(0),
    )  # fmt: skip
    assert len(seen) >= 2
    bad = dataclasses.replace(
        cfg,
        trainer=dataclasses.replace(
            cfg.trainer, options={**cfg.trainer.options, "ssl_consistency": "mixup"}
        ),
    )
    with pytest.raises(ConfigError, match="ssl_consistency"):
        detector_options(bad, "f.yaml")
