"""Model options of the lesion recipe: the speck channel and flip TTA."""

from __future__ import annotations

import pytest
import torch

from common.detector.checkpoint import load_checkpoint, save_checkpoint
from common.detector.model import ModelConfig, build_detector
from common.detector.model.fcos import SpeckEnhance, speck_size
from common.errors import CheckpointMismatch


def test_top_hat_keeps_a_speck_and_drops_the_background() -> None:
    x = torch.linspace(0, 1, 40).repeat(40, 1).reshape(1, 1, 40, 40)  # a ramp
    x = x.clone()
    x[0, 0, 20, 20] += 0.5
    out = SpeckEnhance(3)(x)
    assert out.shape == (1, 2, 40, 40)
    assert torch.equal(out[:, :1], x)
    th = out[0, 1]
    assert float(th[20, 20]) == pytest.approx(0.5, abs=0.03)
    th[20, 20] = 0
    assert float(th[2:-2, 2:-2].abs().max()) < 0.03  # the ramp is gone


def test_speck_size_is_odd_and_wider_than_a_millimetre() -> None:
    assert speck_size(0.4) == 3 and speck_size(0.2) == 5 and speck_size(0.1) == 11


def test_speck_channel_is_structural() -> None:
    plain = ModelConfig(arch="tiny")
    speck = ModelConfig(arch="tiny", speck_channel=True)
    m = build_detector(speck)
    assert m.state_dict()["backbone.body.conv1.weight"].shape[1] == 2
    assert build_detector(plain).state_dict().keys() == m.state_dict().keys()


def test_checkpoint_with_speck_channel_refused_for_a_plain_model(tmp_path) -> None:  # noqa: ANN001
    cfg = ModelConfig(arch="tiny", speck_channel=True)
    path = tmp_path / "m.pt"
    save_checkpoint(path, build_detector(cfg), cfg)
    assert load_checkpoint(path, expected_cfg=cfg).model_config.speck_channel
    with pytest.raises(CheckpointMismatch, match="speck_channel"):
        load_checkpoint(path, expected_cfg=ModelConfig(arch="tiny"))


def _det(boxes, scores, labels):  # noqa: ANN001, ANN202
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def test_flip_fusion_keeps_agreed_detections_and_halves_the_rest() -> None:
    m = build_detector(ModelConfig(arch="tiny", tta_flip=True))
    a = _det([[10, 10, 30, 30], [50, 50, 60, 60]], [0.8, 0.6], [0, 1])
    b = _det([[11, 11, 31, 31], [70, 70, 80, 80]], [0.6, 0.4], [0, 0])
    out = m._fuse(a, b)
    got = sorted(
        zip(out["scores"].tolist(), out["labels"].tolist(), strict=True), reverse=True
    )
    # the agreed mass: (0.8 + 0.6) / 2 kept once after NMS; the others halved
    assert got[0] == (pytest.approx(0.7), 0)
    assert sorted(s for s, _ in got[1:]) == [pytest.approx(0.2), pytest.approx(0.3)]
    assert len(got) == 3


def test_flip_tta_runs_in_eval_only_and_returns_image_space_boxes() -> None:
    torch.manual_seed(0)
    m = build_detector(ModelConfig(arch="tiny", tta_flip=True, score_thresh=0.0))
    img = torch.rand(1, 96, 64)
    m.train()
    losses = m(
        [img],
        [
            {
                "boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0]]),
                "labels": torch.tensor([0]),
            }
        ],
    )
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    m.eval()
    with torch.no_grad():
        out = m([img])[0]
    assert len(out["boxes"]) > 0
    assert (
        float(out["boxes"][:, 3].max()) <= 96 and float(out["boxes"][:, 1].min()) >= 0
    )


@pytest.mark.parametrize("tta_flip", [False, True])
def test_an_images_findings_do_not_depend_on_the_images_batched_with_it(
    tta_flip: bool,
) -> None:
    # a batch is padded to its largest image and the network sees the padding:
    # an image's scores near its edges must not change with its company
    torch.manual_seed(0)
    m = build_detector(ModelConfig(arch="tiny", tta_flip=tta_flip, score_thresh=0.0))
    m.eval()
    small, large = torch.rand(1, 96, 64), torch.rand(1, 160, 192)
    same = torch.rand(1, 90, 60)
    with torch.no_grad():
        alone = m([small])[0]
        batched = m([large, small, same])
    # equal up to float rounding (a batch of two may sum in another order, so
    # near-equal scores may swap); before the fix the padding moved scores by
    # up to 0.01 and boxes by pixels
    assert _same_findings(batched[1], alone)
    with torch.no_grad():  # an image of the same padded size shares the pass
        assert _same_findings(batched[2], m([same])[0])


def _same_findings(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Every finding of ``a`` is one of ``b`` (label, score within 1e-6, box 1e-3)."""
    if len(a["scores"]) != len(b["scores"]):
        return False
    same = (
        (a["labels"][:, None] == b["labels"][None, :])
        & ((a["scores"][:, None] - b["scores"][None, :]).abs() <= 1e-6)
        & ((a["boxes"][:, None, :] - b["boxes"][None, :, :]).abs().amax(-1) <= 1e-3)
    )
    return bool(same.any(dim=1).all()) and bool(same.any(dim=0).all())
