"""Every federated round draws its own images and augmentations.

A site's sampler and augmentation generator were seeded from the run's seed
alone, so every round drew the same images in the same order with the same
augmentations, and the images the with-replacement draw missed never trained
the federation. Round ``r``'s local epoch ``e`` now draws as central epoch
``(r - 1) * local_epochs + e`` (round 1 unchanged).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from client.detector_trainer import DetectorTrainer, round_seed
from common.detector.recipe import Recipe
from common.wire.federation import FitInstructions, PersonalizationConfig
from tests.client.conftest import SITE, one_site_config
from tests.conftest import make_site_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_site_cache(tmp_path_factory.mktemp("rd") / SITE, n_patients=5)


def test_rounds_draw_other_images_and_augmentations(tmp_path, cache, monkeypatch):
    cfg = one_site_config(
        tmp_path, name="round-draws", strategy="personalized", learning_rate=1e-3,
        personalization=PersonalizationConfig(local_norm=True),
        max_steps=2, head_epochs=0,
    )  # fmt: skip
    cfg = dataclasses.replace(
        cfg, trainer=dataclasses.replace(cfg.trainer, local_epochs=2)
    )
    seeds: list[int] = []
    draws: list[list[int]] = []
    real = Recipe.loader

    def spy(self, dataset, num_samples, seed, num_workers=0):  # type: ignore[no-untyped-def]
        loader = real(self, dataset, num_samples, seed, num_workers)
        seeds.append(seed)
        draws.append(list(loader.sampler))  # type: ignore[arg-type]
        return loader

    monkeypatch.setattr(Recipe, "loader", spy)
    trainer = DetectorTrainer(SITE, tmp_path / "state", cfg, cache, None)
    shared = trainer.initial_shared()
    views = []
    for rnd in (1, 2, 3):
        shared, _ = trainer.fit(shared, FitInstructions.from_federation(cfg, rnd))
        views.append(trainer._view("labeled", train=True, server_round=rnd))
    s = cfg.seed
    assert seeds == [s, s + 1, s + 2, s + 3, s + 4, s + 5]  # central epochs 0..5
    assert len({tuple(d) for d in draws}) > 1
    # the augmentations differ by round too (round 1: the run's seed itself)
    assert round_seed(s, 1) == s and len({round_seed(s, r) for r in (1, 2, 3)}) == 3
    img = [v[0][0] for v in views]  # type: ignore[index]
    assert not torch.equal(img[0], img[1]) or not torch.equal(img[1], img[2])
