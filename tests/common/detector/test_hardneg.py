"""Hard-negative mining for patch training (common.detector.hardneg)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from common.config import load_config
from common.detector.froc import FrocImage
from common.detector.hardneg import (
    MIN_SCORE,
    HardNegativeMiner,
    HardNegatives,
    false_positives,
)
from common.detector.recipe import AugmentConfig, train_transform
from common.detector.transforms import PatchCrop
from common.errors import ConfigError
from common.imaging.data import SiteDataset
from simulation.train import TrainConfig, run_training, training_data
from tests.conftest import make_site_cache, write_train_yaml


def _image() -> FrocImage:
    """One mass at (50, 50) (10 px box, 1 mm pixels) and six detections."""
    dets = [
        ([45, 45, 55, 55], 0.9, 0),  # hits the mass
        ([46, 46, 56, 56], 0.85, 0),  # duplicate of the hit
        ([150, 150, 160, 160], 0.8, 0),  # false positive (mass)
        ([100, 20, 104, 24], 0.3, 1),  # false positive (calcification)
        ([200, 200, 210, 210], MIN_SCORE / 2, 0),  # too weak to be hard
        ([10, 180, 20, 190], 0.7, 0),  # inside the ignore region
    ]
    return FrocImage(
        key="img-1",
        spacing_mm=1.0,
        gt_boxes=np.array([[45.0, 45.0, 55.0, 55.0]]),
        gt_labels=np.array([0]),
        ignore_boxes=np.array([[0.0, 170.0, 30.0, 199.0]]),
        det_boxes=np.array([d[0] for d in dets], dtype=np.float64),
        det_scores=np.array([d[1] for d in dets]),
        det_labels=np.array([d[2] for d in dets], dtype=np.int64),
    )


def test_false_positives_are_the_evaluations_top_scoring_ones() -> None:
    got = false_positives(_image(), per_image=4, min_score=MIN_SCORE)
    # not the hit, its duplicate, the ignored one or the weak one; by score
    assert got.tolist() == [[155.0, 155.0], [102.0, 22.0]]
    assert false_positives(_image(), 1, MIN_SCORE).tolist() == [[155.0, 155.0]]
    with pytest.raises(ValueError, match="per_image"):
        false_positives(_image(), 0, MIN_SCORE)


def _plain(h: int = 400, w: int = 400) -> tuple[torch.Tensor, dict]:
    return torch.full((1, h, w), 0.5), {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "key": "img-1",
    }


def test_patch_crop_centres_a_share_of_patches_on_mined_false_positives() -> None:
    store = HardNegatives()
    store.replace(
        {"img-1": np.array([[300.0, 100.0]], np.float32), "other": np.zeros((0, 2))}
    )
    assert len(store) == 1 and "other" not in store.centres
    crop = PatchCrop(
        64, 0.0, generator=torch.Generator().manual_seed(0), hard=store, hard_p=1.0
    )
    for _ in range(50):
        ox, oy = crop._origin(*_plain())
        # the false positive is inside, within a quarter patch of the centre
        assert abs(ox + 32 - 300) <= 16 and abs(oy + 32 - 100) <= 16
    # half the patches with hard_p 0.5; an image without negatives: random ones
    half = PatchCrop(
        64, 0.0, generator=torch.Generator().manual_seed(1), hard=store, hard_p=0.5
    )
    near = sum(abs(half._origin(*_plain())[0] + 32 - 300) <= 16 for _ in range(400))
    assert 150 < near < 300
    image, target = _plain()
    target["key"] = "unmined"
    far = sum(abs(crop._origin(image, target)[0] + 32 - 300) > 16 for _ in range(50))
    assert far > 30


def test_patch_crop_without_negatives_draws_as_before() -> None:
    """An empty store, or none, leaves the random stream (old runs) unchanged."""
    plain = PatchCrop(64, 0.5, generator=torch.Generator().manual_seed(3))
    empty = PatchCrop(
        64, 0.5, generator=torch.Generator().manual_seed(3),
        hard=HardNegatives(), hard_p=0.7,
    )  # fmt: skip
    for _ in range(20):
        assert plain._origin(*_plain()) == empty._origin(*_plain())
    with pytest.raises(ValueError, match="hard_p"):
        PatchCrop(64, 0.5, hard_p=1.5)


def test_hard_negatives_need_patches() -> None:
    with pytest.raises(
        ValueError, match=r"hard_negative_p \(0.5\) needs augment.patch"
    ):
        AugmentConfig(hard_negative_p=0.5)
    aug = AugmentConfig(patch=64, hard_negative_p=0.5)
    store = HardNegatives()
    crops = [
        p for p in train_transform(aug, None, None, store).transforms
        if isinstance(p, PatchCrop)
    ]  # fmt: skip
    assert len(crops) == 1 and crops[0].hard is store and crops[0].hard_p == 0.5


def test_a_config_asking_hard_negatives_without_patches_names_the_field(
    tmp_path, site_cache
) -> None:
    path = write_train_yaml(tmp_path, [site_cache], augment={"hard_negative_p": 0.3})
    with pytest.raises(ConfigError, match="hard_negative_p"):
        load_config(path, TrainConfig)


def test_miner_cadence_and_resume_catch_up(monkeypatch) -> None:
    def counting(m: HardNegativeMiner) -> None:
        def mine(model: nn.Module) -> dict:
            m.minings += 1
            return {"n": m.minings}

        monkeypatch.setattr(m, "mine", mine)

    miner = HardNegativeMiner([], HardNegatives(), every=3, per_image=2)
    counting(miner)
    assert [e for e in range(9) if miner(nn.Identity(), e)] == [2, 5, 8]
    # a run resumed after epoch 3 has nothing mined: it mines at once, then
    # keeps the cadence
    resumed = HardNegativeMiner([], HardNegatives(), every=3, per_image=2)
    counting(resumed)
    assert not resumed.due(0) and not resumed.due(1)
    assert [e for e in range(3, 9) if resumed(nn.Identity(), e)] == [3, 5, 8]
    # nothing is mined after the run's last epoch: no patch would use it
    last = HardNegativeMiner([], HardNegatives(), every=3, per_image=2, epochs=6)
    counting(last)
    assert [e for e in range(6) if last(nn.Identity(), e)] == [2]
    with pytest.raises(ValueError, match="hard_negative_every"):
        HardNegativeMiner([], HardNegatives(), every=0, per_image=2)


def test_central_training_mines_its_own_training_images(tmp_path, monkeypatch) -> None:
    cache = make_site_cache(tmp_path / "siteA", n_patients=4)
    path = write_train_yaml(
        tmp_path, [cache], epochs=3, test_fraction=0.25, n_boot=0,
        augment={"patch": 32, "hard_negative_p": 0.5, "hard_negative_every": 2},
    )  # fmt: skip
    cfg = load_config(path, TrainConfig)
    site = SiteDataset(cache, test_fraction=0.25)
    idx = {"siteA": site.indices("labeled")}
    data = training_data(cfg, {"siteA": site}, idx, torch.device("cpu"))
    assert data.miner is not None and len(data.source) == len(idx["siteA"])
    crop = next(
        p for p in data.views[0].transform.transforms if isinstance(p, PatchCrop)
    )
    assert crop.hard is data.miner.store  # what is mined is what the crop reads
    off = training_data(
        load_config(write_train_yaml(tmp_path, [cache]), TrainConfig),
        {"siteA": site}, idx, torch.device("cpu"),
    )  # fmt: skip
    assert off.miner is None

    import common.detector.hardneg as hardneg

    mined_keys: set[str] = set()
    real = hardneg.detect_dataset

    def spy(model, dataset, *args, **kwargs):  # noqa: ANN001, ANN202
        mined_keys.update(dataset[i][1]["key"] for i in range(len(dataset)))
        return real(model, dataset, *args, **kwargs)

    monkeypatch.setattr(hardneg, "detect_dataset", spy)
    run_training(cfg)
    lines = (cfg.out_dir / "epochs.jsonl").read_text().splitlines()
    log = [json.loads(x) for x in lines]
    mining = {r["epoch"]: r.get("mining") for r in log}
    assert mining[0] is None and mining[2] is None
    assert mining[1]["images_mined"] == len(idx["siteA"])
    # what was mined: the training images, none of the held-out test women
    train_keys = {site.records[i].key for i in idx["siteA"]}
    test_keys = {site.records[i].key for i in site.indices("test")}
    assert mined_keys == train_keys and test_keys and not test_keys & mined_keys


def test_a_resumed_run_mines_before_it_goes_on(tmp_path, caplog) -> None:
    """Resumed after a mining epoch, the store is refilled before training."""
    cache = make_site_cache(tmp_path / "siteA", n_patients=3)
    aug = {"patch": 32, "hard_negative_p": 0.5, "hard_negative_every": 2}
    first = write_train_yaml(tmp_path, [cache], epochs=3, n_boot=0, augment=aug)
    run_training(load_config(first, TrainConfig))
    again = write_train_yaml(tmp_path, [cache], epochs=4, n_boot=0, augment=aug)
    caplog.set_level("INFO", logger="common.detector.hardneg")
    run_training(load_config(again, TrainConfig))
    mined = [r for r in caplog.records if r.message.startswith("hard negatives:")]
    assert len(mined) == 1  # at the resume; epoch 3 is the last: none after it
