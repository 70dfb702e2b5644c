"""The other breast as a second input channel (``ModelConfig.contralateral``).

Pairing (same woman, same view, the other laterality), the channel on the
image's grid, transforms that move both channels together while lesion paste
and the speck channel act on the image only, the model's input width, and
the refusals where images come one by one (predict, ONNX) or a second stage
that never sees the other breast.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from common.detector.checkpoint import save_checkpoint
from common.detector.model import ModelConfig, build_detector
from common.detector.model.fcos import SpeckEnhance
from common.detector.transforms import (
    IntensityJitter,
    LesionPaste,
    PatchCrop,
    RandomResize,
    VerticalFlip,
)
from common.errors import CheckpointMismatch
from common.imaging.annotations import ImageTargets
from common.imaging.data import SiteDataset
from common.imaging.geometry import Geometry
from common.imaging.image import ImageMeta, MammoImage
from tests.conftest import write_site_cache


def _img(
    i: int, pid: str, lat: str, view: str | None, shape: tuple[int, int]
) -> MammoImage:
    h, w = shape
    # a horizontal ramp, different per image, so resizing is checkable
    px = np.tile(np.linspace(0.1, 0.9, w, dtype=np.float32), (h, 1)) * (0.5 + 0.05 * i)
    meta = ImageMeta(
        source=f"{i}.dcm", sop_instance_uid=f"1.{i}", patient_id=pid, manufacturer="A",
        model="m", view=view, laterality=lat, laterality_source="ImageLaterality",
        stored_spacing_mm=0.1, spacing_source="PixelSpacing",
        presentation_intent=None, photometric="MONOCHROME2", rows=4 * h, cols=4 * w,
    )  # fmt: skip
    geo = Geometry((4 * h, 4 * w), (0, 0, 4 * w, 4 * h), lat == "R", (h, w))
    return MammoImage(px.clip(0, 1), 0.4, geo, meta)


def make_pairs(root: Path, n: int = 4) -> Path:
    """Woman p: L and R MLO of different sizes; the last woman has only her L
    image twice (no partner), and woman 0's R image has a mass."""

    def image(p: int, j: int) -> MammoImage:
        lat = "L" if (j == 0 or p == n - 1) else "R"
        shape = (48, 32) if j == 0 else (40, 28)
        return _img(2 * p + j, f"W{p}", lat, "MLO", shape)

    def targets(p: int, j: int) -> ImageTargets:
        if p == 0 and j == 1:
            b = [[8.0, 8.0, 20.0, 20.0]]
            return ImageTargets(True, False, True, b, b, [0], [], [], [])
        return ImageTargets(True, False, False, [], [], [], [], [], [])

    return write_site_cache(root, n, image, targets, None)


def test_pairs_same_woman_same_view_other_side(tmp_path: Path) -> None:
    ds = SiteDataset(make_pairs(tmp_path / "c"), test_fraction=0.0, contralateral=True)
    for i, j in ds.partner.items():
        a, b = ds.records[i], ds.records[j]
        assert a.patient_id == b.patient_id and a.meta.view == b.meta.view
        assert {a.meta.laterality, b.meta.laterality} == {"L", "R"}
    # three women with both sides: six paired images; the last woman none
    assert len(ds.partner) == 6
    alone = [i for i in range(len(ds)) if i not in ds.partner]
    assert {ds.records[i].patient_id for i in alone} == {"W3"}


def test_second_channel_is_the_other_breast_on_this_grid(tmp_path: Path) -> None:
    ds = SiteDataset(make_pairs(tmp_path / "c"), test_fraction=0.0, contralateral=True)
    view = ds.view("all")
    for k, i in enumerate(view.indices):
        image, _ = view[k]
        assert image.shape[0] == 2
        if i in ds.partner:
            r = ds.records[ds.partner[i]]
            other = ds.cache.load_pixels(r.key, r.geometry.model_shape)
            # resized onto this image's grid (the sides differ in size here):
            # the same ramp, so the same mean within resampling error
            assert tuple(image.shape[-2:]) != other.shape
            assert abs(float(image[1].mean()) - float(other.mean())) < 0.02
            assert not torch.equal(image[0], image[1])
        else:
            assert float(image[1].abs().max()) == 0.0
    plain = SiteDataset(make_pairs(tmp_path / "c2"), test_fraction=0.0)
    assert plain.view("all")[0][0].shape[0] == 1


def test_geometric_transforms_move_both_channels() -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 64, 48)
    img[1] = img[0].flip(-1)  # a known relation between the channels
    t = {"boxes": torch.tensor([[10.0, 10.0, 20.0, 20.0]]), "labels": torch.tensor([0])}
    out, _ = VerticalFlip(1.0, g)(img, t)
    assert torch.equal(out[1], out[0].flip(-1))
    out, _ = PatchCrop(32, 1.0, generator=g)(img, t)
    assert out.shape == (2, 32, 32)
    out, _ = RandomResize((1.5, 1.5), g)(img, t)
    assert out.shape == (2, 96, 72)
    assert torch.allclose(out[1], out[0].flip(-1), atol=1e-5)
    out, _ = IntensityJitter(generator=g)(img, t)
    assert out.shape == img.shape and 0.0 <= float(out.min()) <= float(out.max()) <= 1.0


def test_patch_crop_takes_the_same_window_of_both() -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.rand(1, 80, 60) * 0.5 + 0.25
    img = torch.cat([base, base + 0.1])
    out, _ = PatchCrop(32, 0.0, generator=g)(img, {"boxes": torch.zeros(0, 4)})
    assert torch.allclose(out[1] - out[0], torch.full((32, 32), 0.1), atol=1e-6)


def test_paste_adds_lesions_to_the_image_only() -> None:
    src_img = torch.full((2, 64, 64), 0.4)
    src_img[0, 20:30, 20:30] = 0.9  # a lesion in the image, not in the other breast
    source = [(src_img, {"boxes": torch.tensor([[20.0, 20.0, 30.0, 30.0]]),
                         "labels": torch.tensor([0])})]  # fmt: skip
    paste = LesionPaste(
        source, p=1.0, max_pastes=1, generator=torch.Generator().manual_seed(1)
    )
    img = torch.full((2, 96, 96), 0.4)
    out, t = paste(
        img, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    )
    assert len(t["boxes"]) == 1
    assert float(out[0].max()) > 0.8
    assert torch.equal(out[1], img[1])


def test_model_takes_two_channels_and_trains() -> None:
    cfg = ModelConfig(arch="tiny", speck_channel=True, contralateral=True)
    model = build_detector(cfg)
    conv = model.backbone.body.conv1
    assert conv.in_channels == 3  # image, other breast, speck of the image
    model.train()
    images = [torch.rand(2, 128, 96) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[20.0, 20.0, 50.0, 50.0]]),
                "labels": torch.tensor([0])} for _ in range(2)]  # fmt: skip
    loss = sum(model(images, targets).values())
    loss.backward()
    assert conv.weight.grad is not None
    assert float(conv.weight.grad[:, 1].abs().sum()) > 0  # the other breast is read
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    plain = build_detector(ModelConfig(arch="tiny", contralateral=True))
    assert plain.backbone.body.conv1.in_channels == 2


def test_speck_channel_is_the_image_top_hat_only() -> None:
    enh = SpeckEnhance(3)
    x = torch.zeros(1, 2, 16, 16)
    x[0, 0, 8, 8] = 1.0  # a speck in the image
    x[0, 1, 4, 4] = 1.0  # a speck in the other breast
    y = enh(x)
    assert y.shape == (1, 3, 16, 16)
    assert float(y[0, 2, 8, 8]) == 1.0 and float(y[0, 2, 4, 4]) == 0.0
    one = enh(x[:, :1])
    assert one.shape == (1, 2, 16, 16) and torch.equal(one[:, 1], y[:, 2])


def test_structural_field_and_refusals(tmp_path: Path) -> None:
    from client.export import load_detectors
    from client.onnx_export import ExportError, export_onnx

    cfg = ModelConfig(arch="tiny", contralateral=True)
    path = tmp_path / "m.pt"
    save_checkpoint(path, build_detector(cfg), cfg)
    # predict and the DICOM node take images one by one
    with pytest.raises(CheckpointMismatch, match="contralateral"):
        load_detectors(path, torch.device("cpu"))
    assert load_detectors(path, torch.device("cpu"), pairs_breasts=True)
    with pytest.raises(ExportError, match="contralateral"):
        export_onnx(path, tmp_path / "m.onnx")
    # a one-channel model's weights do not fit a contralateral one
    from common.detector.checkpoint import load_checkpoint

    with pytest.raises(CheckpointMismatch, match="contralateral"):
        load_checkpoint(path, dataclasses.replace(cfg, contralateral=False))


def test_train_config_refuses_what_never_sees_the_other_breast(tmp_path: Path) -> None:
    from common.config import load_config
    from simulation.train import TrainConfig

    cache = make_pairs(tmp_path / "c")
    for extra in ("rescore: {enabled: true}", "pretrain: {epochs: 1}"):
        f = tmp_path / "t.yaml"
        f.write_text(
            f"caches: [{cache}]\nout_dir: {tmp_path / 'o'}\n"
            f"model: {{arch: tiny, contralateral: true}}\n{extra}\n"
        )
        with pytest.raises(Exception, match="contralateral"):
            load_config(f, TrainConfig)


def test_train_evaluate_and_crossval_end_to_end(tmp_path: Path) -> None:
    """The whole central path with the other breast: crossval (paste, patches,
    hard negatives), train, then ``evaluate`` pairs the cache's images itself."""
    import json

    from client.evaluate import evaluate_checkpoint
    from simulation.cli import main as sim_main
    from simulation.train import FINAL_CHECKPOINT
    from tests.conftest import write_train_yaml

    cache = make_pairs(tmp_path / "c", n=6)
    recipe = {
        "model": {"arch": "tiny", "working_spacing_mm": 0.4, "contralateral": True,
                  "speck_channel": True},
        "augment": {"paste": True, "patch": 32, "hard_negative_p": 0.5,
                    "hard_negative_every": 1},
        "epochs": 2,
    }  # fmt: skip
    cv = write_train_yaml(tmp_path, [cache], out_dir=str(tmp_path / "cv"),
                          test_fraction=0.0, n_boot=10, **recipe)  # fmt: skip
    assert sim_main(["crossval", "--config", str(cv), "--folds", "2"]) == 0
    doc = json.loads((tmp_path / "cv" / "cv_metrics.json").read_text())
    assert doc["config"]["model"]["contralateral"] is True
    assert doc["n_images"] == 12
    cfg = write_train_yaml(tmp_path, [cache], out_dir=str(tmp_path / "run"),
                           test_fraction=0.34, **recipe)  # fmt: skip
    assert sim_main(["train", "--config", str(cfg)]) == 0
    final = tmp_path / "run" / FINAL_CHECKPOINT
    res = evaluate_checkpoint(final, cache, tmp_path / "ev", n_boot=10, device="cpu")
    # scored its own test women, the model reading two-channel images
    # the women of the split `train` recorded (test_fraction 0.34), none other
    assert res["split"]["source"] == "checkpoint"
    test_n = len(SiteDataset(cache, test_fraction=0.34).indices("test"))
    assert res["n_images"] == test_n > 0
    # a one-channel model scored together with it sees other images: refused
    one = tmp_path / "one.pt"
    save_checkpoint(
        one, build_detector(ModelConfig(arch="tiny")), ModelConfig(arch="tiny")
    )
    with pytest.raises(CheckpointMismatch, match="contralateral"):
        evaluate_checkpoint([final, one], cache, tmp_path / "ev2", device="cpu")
