"""Configuration knobs that must change behaviour, not only pass validation.

``augment.patch`` was once validated and never applied, and ``adapt.
teacher_sync: keep`` was read by nobody: each test here fails when the knob it
names is accepted but ignored (or applied to something other than what its
docstring promises).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

from common.detector.recipe import AugmentConfig, train_transform
from tests.conftest import make_site_cache, write_train_yaml


def _target(**extra: Any) -> dict[str, Any]:
    return {
        "boxes": torch.tensor([[8.0, 8.0, 24.0, 24.0]]),
        "labels": torch.tensor([0]),
        "spacing_mm": 0.4,
        **extra,
    }


_OFF = {"vflip": False, "scale": False, "intensity": False}


# --- the training augmentation (AugmentConfig) ---------------------------------
def test_augment_scale_range_sets_the_resize_factor() -> None:
    """``scale_min``/``scale_max`` are the factors the training images get."""
    img = torch.rand(1, 64, 80)
    aug = AugmentConfig(**{**_OFF, "scale": True}, scale_min=0.5, scale_max=0.5)
    out, t = train_transform(aug, torch.Generator().manual_seed(0))(img, _target())
    assert tuple(out.shape) == (1, 32, 40)
    assert t["boxes"].tolist() == [[4.0, 4.0, 12.0, 12.0]]
    assert t["spacing_mm"] == pytest.approx(0.8)
    big = AugmentConfig(**{**_OFF, "scale": True}, scale_min=2.0, scale_max=2.0)
    out, _ = train_transform(big, None)(img, _target())
    assert tuple(out.shape) == (1, 128, 160)
    out, _ = train_transform(AugmentConfig(**_OFF), None)(img, _target())
    assert torch.equal(out, img)


@pytest.mark.parametrize("switch", ["vflip", "intensity"])
def test_augment_switches_change_images_only_when_on(switch: str) -> None:
    img = torch.rand(1, 48, 40)
    on = train_transform(
        AugmentConfig(**{**_OFF, switch: True}), torch.Generator().manual_seed(0)
    )
    off = train_transform(AugmentConfig(**_OFF), torch.Generator().manual_seed(0))
    changed = [not torch.equal(on(img, _target())[0], img) for _ in range(16)]
    assert any(changed)
    if switch == "vflip":  # p = 0.5: some draws keep the image as it is
        assert not all(changed)
    assert all(torch.equal(off(img, _target())[0], img) for _ in range(16))


class _LesionSource(Dataset[tuple[torch.Tensor, dict[str, Any]]]):
    """Two images: one with a bright 6x6 lesion box, one normal breast."""

    def __init__(self) -> None:
        lesion = self.breast()
        lesion[:, 40:46, 30:36] += 0.5
        self.items = [
            (lesion, {"boxes": torch.tensor([[30.0, 40.0, 36.0, 46.0]]),
                      "labels": torch.tensor([1])}),
            (self.breast(), {"boxes": torch.zeros(0, 4),
                             "labels": torch.zeros(0, dtype=torch.int64)}),
        ]  # fmt: skip

    @staticmethod
    def breast() -> torch.Tensor:
        img = torch.full((1, 96, 96), 0.4)
        img[:, :, 80:] = 0.0
        return img

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.items[i]


def _pasted(p: float, most: int, draws: int = 24) -> list[int]:
    src = _LesionSource()
    aug = AugmentConfig(**_OFF, paste=True, paste_p=p, paste_max=most)
    tf = train_transform(aug, torch.Generator().manual_seed(0), src)
    image, target = src[1]
    return [len(tf(image.clone(), dict(target))[1]["boxes"]) for _ in range(draws)]


def test_augment_paste_p_and_paste_max_decide_how_often_and_how_many() -> None:
    assert set(_pasted(0.0, 3)) == {0}
    assert set(_pasted(1.0, 1)) == {1}
    many = _pasted(1.0, 3)
    assert max(many) >= 2 and max(many) <= 3
    half = _pasted(0.5, 1, draws=40)
    assert 0 in half and 1 in half


# --- optimisation (Recipe, TrainConfig, AdaptConfig) ---------------------------
def test_weight_decay_and_learning_rates_reach_the_optimizers(tmp_path: Path) -> None:
    from common.detector.adapt.config import AdaptConfig
    from common.detector.adapt.fewshot import _optimizer
    from simulation.train import TrainConfig

    model = torch.nn.Linear(2, 1)
    cfg = TrainConfig(
        caches=(tmp_path,), out_dir=tmp_path / "o", lr=0.02, weight_decay=0.3
    )
    group = cfg.recipe().optimizer(model.parameters()).param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.02, 0.3)
    adapt = AdaptConfig(fewshot_lr=0.005, fewshot_weight_decay=0.07)
    group = _optimizer(model, adapt).param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.005, 0.07)


# --- the detector (ModelConfig) ------------------------------------------------
def _detect(seed_image: torch.Tensor, **fields: Any) -> dict[str, torch.Tensor]:
    from common.detector.model import ModelConfig, build_detector

    torch.manual_seed(0)
    cfg = ModelConfig(arch="tiny", fpn_channels=16, head_convs=1, **fields)
    model = build_detector(cfg).eval()
    with torch.no_grad():
        return dict(model([seed_image])[0])


def test_model_postprocessing_and_normalization_fields_shape_the_detections() -> None:
    from common.detector.model import ModelConfig, build_detector

    img = torch.rand(1, 96, 96, generator=torch.Generator().manual_seed(1))
    plain = _detect(img, score_thresh=0.0)
    assert len(plain["scores"]) > 10
    assert len(_detect(img, score_thresh=0.0, detections_per_img=5)["scores"]) == 5
    assert len(_detect(img, score_thresh=0.0, topk_candidates=2)["scores"]) <= 2 * 5
    shifted = _detect(img, score_thresh=0.0, image_mean=0.1, image_std=0.5)
    assert not torch.equal(shifted["scores"], plain["scores"])
    # an untrained model's boxes are degenerate (NMS cannot be seen on them):
    # what torchvision's FCOS reads in its loss and post-processing
    model = build_detector(
        ModelConfig(arch="tiny", center_sampling_radius=0.5, nms_thresh=0.05)
    )
    assert (model.center_sampling_radius, model.nms_thresh) == (0.5, 0.05)


# --- central training (TrainConfig) --------------------------------------------
def test_central_run_draws_samples_per_epoch_and_evaluates_every_n(
    tmp_path: Path,
) -> None:
    from simulation.train import load_train_config, run_training

    cache = make_site_cache(tmp_path / "siteA", n_patients=3)
    cfg = load_train_config(
        write_train_yaml(
            tmp_path, [cache], epochs=2, samples_per_epoch=2, eval_every=2, n_boot=0
        )
    )
    run_training(cfg)
    rows = [
        json.loads(line)
        for line in (Path(cfg.out_dir) / "epochs.jsonl").read_text().splitlines()
    ]
    assert [r["images"] for r in rows] == [2, 2]  # not the 6 labeled images
    assert [r["steps"] + r["skipped_steps"] for r in rows] == [1, 1]
    assert rows[0]["eval"] == {}  # epoch 1 of 2: not evaluated
    assert set(rows[1]["eval"]) == {"siteA"}
    assert "cpm-mass" in rows[1]["eval"]["siteA"]


def test_resumed_central_run_keeps_its_eval_every_cadence(tmp_path: Path) -> None:
    """Epochs count from the run's start, not from the resume (was: from 1 again)."""
    from simulation.train import load_train_config, run_training

    cache = make_site_cache(tmp_path / "siteA", n_patients=3)

    def train(epochs: int) -> list[dict[str, Any]]:
        cfg = load_train_config(
            write_train_yaml(
                tmp_path,
                [cache],
                epochs=epochs,
                samples_per_epoch=2,
                eval_every=2,
                n_boot=0,
            )  # fmt: skip
        )
        run_training(cfg)
        log = Path(cfg.out_dir) / "epochs.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()]

    assert train(1)[0]["eval"] == {}  # epoch 1: not evaluated
    rows = train(2)  # resumes from last.pt after epoch 1
    assert [r["epoch"] for r in rows] == [0, 1]
    assert set(rows[1]["eval"]) == {"siteA"}  # epoch 2 of the run: evaluated


# --- semi-supervision (AdaptConfig) --------------------------------------------
def test_consistency_loss_honours_dense_top_fraction_and_unsup_losses() -> None:
    from common.detector.adapt.config import AdaptConfig
    from common.detector.adapt.teacher import ConsistencyLoss, MeanTeacher
    from common.detector.model import ModelConfig, build_detector

    torch.manual_seed(0)
    student = build_detector(ModelConfig(arch="tiny", fpn_channels=16, head_convs=1))
    teacher = MeanTeacher(student, 0.99)
    images = [torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(2))]

    def loss(**fields: Any) -> float:
        cons = ConsistencyLoss(teacher, AdaptConfig(**fields))
        return float(cons(student.train(), images)[0].detach())

    assert loss(dense_top_fraction=0.01) != loss(dense_top_fraction=0.5)

    # an untrained teacher finds no usable box: give it one confident mass
    def detect(imgs: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        one = {
            "boxes": torch.tensor([[16.0, 16.0, 40.0, 40.0]]),
            "scores": torch.tensor([0.9]),
            "labels": torch.tensor([0]),
        }
        return [one for _ in imgs]

    teacher.detect = detect  # type: ignore[method-assign,assignment]
    boxes = {"consistency": "pseudo_boxes"}
    cls_only = loss(**boxes, unsup_losses=("classification",))
    with_reg = loss(**boxes, unsup_losses=("classification", "bbox_regression"))
    assert with_reg > cls_only > 0


def test_a_semi_supervised_round_keeps_one_teacher_through_its_local_epochs(
    tmp_path: Path, sync_shared_calls: list[int]
) -> None:
    """With ``trainer.local_epochs`` 2, every epoch of a round once reloaded the
    round's *committed* teacher: the first epoch's EMA and ramp-up steps were
    thrown away, and ``teacher_sync: copy_shared`` copied the student's own
    locally trained layers into the teacher (not a new global model)."""
    from client.detector_trainer import DetectorTrainer
    from common.wire.federation import FitInstructions, PersonalizationConfig
    from tests.client.conftest import SITE, one_site_config
    from tests.conftest import make_ssl_site_cache

    cache = make_ssl_site_cache(tmp_path / SITE)
    syncs = sync_shared_calls
    cfg = one_site_config(
        tmp_path, strategy="personalized", learning_rate=1e-2,
        personalization=PersonalizationConfig(local_norm=True),
        max_steps=2, head_epochs=0, ssl=True, ssl_rampup_steps=50,
    )  # fmt: skip
    cfg = dataclasses.replace(
        cfg, trainer=dataclasses.replace(cfg.trainer, local_epochs=2)
    )
    trainer = DetectorTrainer(SITE, tmp_path / "state", cfg, cache, None)
    n_lab = len(trainer._view("labeled", train=False))  # type: ignore[arg-type]
    steps = min(-(-n_lab // cfg.trainer.batch_size), 2)
    # as the ClientApp does: this round's personal files are pending
    trainer.state.begin_round(1, 0)
    trainer.fit(trainer.initial_shared(), FitInstructions.from_federation(cfg, 1))
    saved = torch.load(trainer.site_model.teacher_write_path(), weights_only=True)
    assert saved["step"] == saved["updates"] == 2 * steps  # both epochs counted
    assert len(syncs) == 1  # the global layers, once, before the first epoch


def test_central_lesion_prob_and_ema_decay_reach_the_training(tmp_path: Path) -> None:
    """``lesion_prob`` steers the sampler; ``ema_decay`` makes the EMA the result."""
    from common.detector.recipe import Pooled
    from simulation.train import load_train_config, train_model

    cache = make_site_cache(tmp_path / "siteA", n_patients=3)

    def cfg(**kw: Any):  # noqa: ANN202
        return load_train_config(write_train_yaml(tmp_path, [cache], **kw))

    c = cfg(lesion_prob=1.0)
    site = c.sites()["siteA"]
    labeled = Pooled([site.view("labeled")])
    flags = [bool(len(site.records[i].boxes)) for i in site.indices("labeled")]
    drawn = list(c.recipe().loader(labeled, 40, seed=0).sampler)
    assert {flags[i] for i in drawn} == {True}
    drawn = list(cfg(lesion_prob=0.0).recipe().loader(labeled, 40, seed=0).sampler)
    assert {flags[i] for i in drawn} == {False}

    dev = torch.device("cpu")
    torch.manual_seed(0)
    plain = train_model(cfg(), [labeled], tmp_path / "a", dev).model
    torch.manual_seed(0)
    trained = train_model(cfg(ema_decay=0.5), [labeled], tmp_path / "b", dev)
    ema = trained.model
    assert not ema.training  # ModelEMA.module: a frozen copy in eval mode
    assert all(not p.requires_grad for p in ema.parameters())
    assert plain.training
    moved = [
        k
        for k, v in plain.state_dict().items()
        if v.is_floating_point() and not torch.equal(v, ema.state_dict()[k])
    ]
    assert moved  # the EMA is not the last weights
    # the student is the trained weights: the EMA only reads them
    assert trained.student.training
    for k, v in trained.student.state_dict().items():
        assert torch.equal(v, plain.state_dict()[k]), k
