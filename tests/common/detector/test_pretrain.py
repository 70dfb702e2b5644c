"""Self-supervised pretraining of the body (common.detector.pretrain)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch.utils.data import Dataset

from common.config import load_config
from common.detector.model import ModelConfig, build_detector
from common.detector.pretrain import (
    PRETRAIN_FILE,
    PRETRAIN_LOG,
    PretrainConfig,
    body_of,
    pretrain_body,
)
from common.errors import ConfigError
from simulation.cli import main as sim_main
from simulation.train import TrainConfig, train_model, training_data
from tests.conftest import write_train_yaml

CPU = torch.device("cpu")
FAST = PretrainConfig(
    epochs=3, patch=64, mask_block=32, patches_per_image=4, batch_size=8
)


class Images(Dataset):
    """Breast-like images (a bright half-disc with texture); targets are not read."""

    def __init__(self, n: int, size: int = 96, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        disc = ((xx / size) ** 2 + ((yy - size / 2) / size) ** 2 < 0.5).float()
        self.images = []
        for _ in range(n):
            texture = torch.nn.functional.avg_pool2d(
                torch.rand(1, 1, size, size, generator=g), 5, 1, 2
            )[0]
            self.images.append((0.3 + 0.5 * texture) * disc)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], _NoTarget()


class _NoTarget(dict):
    def __getitem__(self, key):  # labels are never read
        raise AssertionError(f"pretraining read the target's {key!r}")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector(ModelConfig(arch="tiny", working_spacing_mm=0.4))


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_config_checks_blocks_against_stride_and_patch():
    with pytest.raises(ValueError, match="mask_block.*multiple of 32.*48"):
        PretrainConfig(epochs=1, patch=96, mask_block=48)
    with pytest.raises(ValueError, match="patch.*multiple of pretrain.mask_block.*96"):
        PretrainConfig(epochs=1, patch=96, mask_block=64)
    assert not PretrainConfig().enabled and PretrainConfig(epochs=1).enabled


def test_bad_pretrain_config_names_file_and_key(tmp_path, site_cache):
    p = write_train_yaml(
        tmp_path, [site_cache], pretrain={"epochs": 1, "mask_block": 40}
    )
    with pytest.raises((ConfigError, ValueError), match="mask_block"):
        load_config(p, TrainConfig)
    p = write_train_yaml(tmp_path, [site_cache], pretrain={"mask_ratio": 1.5})
    with pytest.raises(ConfigError, match=r"train\.yaml.*pretrain.*mask_ratio"):
        load_config(p, TrainConfig)


def test_only_the_body_learns(tmp_path):
    model = _model()
    before = _params(model)
    hist = pretrain_body(
        model, Images(6), FAST, device=CPU, seed=1, image_keys=["a"], out_dir=tmp_path
    )
    after = _params(model)
    body_keys = {"backbone.body." + k for k in body_of(model).state_dict()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= body_keys  # FPN and heads untouched
    assert any(k.endswith("conv1.weight") for k in changed)
    assert any("layer4" in k for k in changed)
    assert [int(h["epoch"]) for h in hist] == [1, 2, 3]
    rows = [json.loads(s) for s in (tmp_path / PRETRAIN_LOG).read_text().splitlines()]
    assert [r["loss"] for r in rows] == [h["loss"] for h in hist]
    assert all(r["baseline"] > 0 for r in rows)


def test_it_learns_the_masked_pixels():
    cfg = PretrainConfig(
        epochs=12, patch=64, patches_per_image=8, batch_size=8, lr=3e-3
    )
    hist = pretrain_body(_model(), Images(8), cfg, device=CPU, seed=0)
    assert hist[-1]["loss"] < hist[0]["loss"]
    # better than predicting every masked pixel as the visible pixels' mean
    assert hist[-1]["loss"] < hist[-1]["baseline"]


def test_same_seed_same_body_other_seed_other_body():
    a, b, c = _model(), _model(), _model()
    for m, seed in ((a, 3), (b, 3), (c, 4)):
        torch.manual_seed(0)  # the decoder's start
        pretrain_body(m, Images(4), FAST, device=CPU, seed=seed)
    sa, sb, sc = (body_of(m).state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_resume_reuses_the_body_only_for_the_same_images(tmp_path, caplog):
    first = _model()
    pretrain_body(first, Images(4), FAST, device=CPU, seed=0, image_keys=["a", "b"],
                  out_dir=tmp_path)  # fmt: skip
    assert (tmp_path / PRETRAIN_FILE).is_file()
    again = _model()
    with caplog.at_level(logging.INFO, logger="common.detector.pretrain"):
        pretrain_body(again, Images(4, seed=9), FAST, device=CPU, seed=0,
                      image_keys=["b", "a"], out_dir=tmp_path)  # fmt: skip
    assert "loaded from" in caplog.text
    s1, s2 = body_of(first).state_dict(), body_of(again).state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    caplog.clear()
    other = _model()
    with caplog.at_level(logging.WARNING, logger="common.detector.pretrain"):
        pretrain_body(other, Images(4), FAST, device=CPU, seed=0, image_keys=["c"],
                      out_dir=tmp_path)  # fmt: skip
    assert "other images or settings; redone" in caplog.text


def test_refuses_nothing_to_do_and_bad_images():
    with pytest.raises(ValueError, match="epochs is 0"):
        pretrain_body(_model(), Images(2), PretrainConfig(), device=CPU, seed=0)
    with pytest.raises(ValueError, match="no images"):
        pretrain_body(_model(), Images(0), FAST, device=CPU, seed=0)

    class Flat(Images):
        def __getitem__(self, i):
            return torch.zeros(32, 32), {}

    with pytest.raises(ValueError, match=r"image 0: expected FloatTensor\[1, H, W\]"):
        pretrain_body(_model(), Flat(2), FAST, device=CPU, seed=0)
    with pytest.raises(TypeError, match="no backbone.body"):
        pretrain_body(torch.nn.Linear(2, 2), Images(2), FAST, device=CPU, seed=0)


def test_train_model_pretrains_on_labeled_and_unlabeled_images(tmp_path, site_cache):
    cfg = load_config(
        write_train_yaml(
            tmp_path,
            [site_cache],
            pretrain={
                "epochs": 1,
                "patch": 64,
                "patches_per_image": 1,
                "batch_size": 4,
            },
        ),  # fmt: skip
        TrainConfig,
    )
    sites = cfg.sites()
    train_idx = {n: s.indices("labeled") for n, s in sites.items()}
    data = training_data(cfg, sites, train_idx, CPU)
    images, keys = data.pretrain_images()
    assert len(images) == len(keys) == sum(len(v) for v in train_idx.values())
    with pytest.raises(ValueError, match="needs pretrain_on"):
        train_model(cfg, data.views, tmp_path / "a", CPU)
    train_model(cfg, data.views, tmp_path / "b", CPU, pretrain_on=data)
    saved = torch.load(tmp_path / "b" / PRETRAIN_FILE, weights_only=True)
    assert saved["record"]["n_images"] == len(keys)


def test_sim_train_with_pretraining_writes_its_log(tmp_path, site_cache):
    p = write_train_yaml(
        tmp_path, [site_cache],
        pretrain={"epochs": 2, "patch": 64, "patches_per_image": 1, "batch_size": 4},
    )  # fmt: skip
    assert sim_main(["train", "--config", str(p)]) == 0
    rows = (tmp_path / "run" / PRETRAIN_LOG).read_text().splitlines()
    assert len(rows) == 2


@pytest.mark.parametrize(
    ("patch", "block", "ratio"), [(128, 32, 0.6), (128, 64, 0.5), (96, 32, 0.3)]
)
def test_masks_cover_the_asked_share_in_whole_blocks(patch, block, ratio):
    from common.detector.pretrain import _masks

    cfg = PretrainConfig(epochs=1, patch=patch, mask_block=block, mask_ratio=ratio)
    m = _masks(5, cfg, torch.Generator().manual_seed(0))
    assert m.shape == (5, 1, patch, patch)
    g = patch // block
    per_block = (
        m.view(5, g, block, g, block).permute(0, 1, 3, 2, 4).reshape(5, g * g, -1)
    )
    assert torch.all(
        per_block.min(-1).values == per_block.max(-1).values
    )  # whole blocks
    assert torch.all(per_block[..., 0].sum(1) == max(1, round(ratio * g * g)))


def test_a_corrupt_saved_body_is_redone_not_fatal(tmp_path, caplog):
    (tmp_path / PRETRAIN_FILE).write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING, logger="common.detector.pretrain"):
        hist = pretrain_body(
            _model(), Images(4), FAST, device=CPU, seed=0, out_dir=tmp_path
        )
    assert "pretrain.pt is unreadable" in caplog.text and len(hist) == FAST.epochs
    saved = torch.load(tmp_path / PRETRAIN_FILE, weights_only=True)
    assert saved["record"]["n_images"] == 4
