"""The breast mask at inference: labels and air out, the chest wall and skin in."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.detector.adapt.teacher import MeanTeacher
from common.detector.model import build_detector, without_breast_mask
from common.detector.model.config import ModelConfig
from common.detector.model.fcos import in_breast
from common.imaging.preprocess import breast_mask, find_breast, inside_mask


def _film(h: int = 600, w: int = 400) -> np.ndarray:
    """Model space: breast against the chest wall (x = 0) and a film label."""
    img = np.zeros((h, w), np.float32)
    yy, xx = np.mgrid[:h, :w]
    img[((yy - h / 2) / (0.42 * h)) ** 2 + (xx / (0.75 * w)) ** 2 < 1] = 0.6
    img[40:90, 320:380] = 1.0  # a bright label, apart from the breast
    return img


def test_a_detection_on_a_label_or_in_the_air_is_dropped() -> None:
    mask, factor = breast_mask(_film())
    boxes = np.array(
        [
            [100.0, 280.0, 140.0, 320.0],  # in the breast
            [0.0, 290.0, 6.0, 310.0],  # on the chest wall, in the border band
            [280.0, 290.0, 296.0, 310.0],  # at the skin line (x = 300)
            [330.0, 50.0, 370.0, 80.0],  # on the label
            [5.0, 590.0, 15.0, 599.0],  # in the air
        ]
    )
    assert inside_mask(boxes, mask, factor).tolist() == [True, True, True, False, False]
    assert inside_mask(np.zeros((0, 4)), mask, factor).shape == (0,)


def test_a_large_image_is_masked_on_a_coarser_grid() -> None:
    big = np.kron(_film(), np.ones((3, 3), np.float32))  # 1800 x 1200
    mask, factor = breast_mask(big)
    assert factor == 4 and mask.shape == (450, 300)
    boxes = np.array([[300.0, 840.0, 420.0, 960.0], [990.0, 150.0, 1110.0, 240.0]])
    assert inside_mask(boxes, mask, factor).tolist() == [True, False]


@pytest.mark.parametrize(
    "img",
    [
        np.full((50, 50), 0.3, np.float32),  # flat: nothing found
        np.pad(np.ones((2, 2), np.float32), ((0, 198), (0, 198))),  # a speck only
    ],
)
def test_no_plausible_breast_drops_nothing(img: np.ndarray) -> None:
    mask, factor = breast_mask(img)
    assert mask.all() and not find_breast(img).found
    assert mask.shape == (-(-img.shape[0] // factor), -(-img.shape[1] // factor))


def _dets(boxes: list[list[float]]) -> dict[str, torch.Tensor]:
    n = len(boxes)
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.linspace(0.9, 0.1, n),
        "labels": torch.zeros(n, dtype=torch.int64),
    }


def test_in_breast_keeps_the_fields_aligned() -> None:
    image = torch.from_numpy(_film())[None]
    det = _dets([[330.0, 50.0, 370.0, 80.0], [100.0, 280.0, 140.0, 320.0]])
    out = in_breast(image, det)
    assert out["boxes"].tolist() == [[100.0, 280.0, 140.0, 320.0]]
    assert out["scores"].tolist() == [pytest.approx(0.1)]
    assert out["labels"].tolist() == [0]
    empty = _dets([])
    assert in_breast(image, empty) is empty


def test_the_model_drops_detections_outside_the_breast_in_eval_only() -> None:
    torch.manual_seed(0)
    img = torch.from_numpy(_film(192, 128))[None]
    cfg = dict(arch="tiny", score_thresh=0.0, detections_per_img=1000)
    plain = build_detector(ModelConfig(**cfg)).eval()
    masked = build_detector(ModelConfig(**cfg, breast_mask=True)).eval()
    masked.load_state_dict(plain.state_dict())
    with torch.no_grad():
        a, b = plain([img])[0], masked([img])[0]
        with without_breast_mask(masked):
            raw = masked([img])[0]
    assert masked.cfg.breast_mask  # restored after the block
    mask, factor = breast_mask(img[0].numpy())
    keep = inside_mask(a["boxes"].numpy(), mask, factor)
    assert 0 < keep.sum() < len(keep)  # the test means something
    assert torch.equal(b["boxes"], a["boxes"][torch.from_numpy(keep)])
    assert torch.equal(b["scores"], a["scores"][torch.from_numpy(keep)])
    assert torch.equal(raw["boxes"], a["boxes"])
    masked.train()  # training is untouched: losses as usual
    target = {
        "boxes": torch.tensor([[10.0, 80.0, 30.0, 100.0]]),
        "labels": torch.tensor([0]),
    }
    assert set(masked([img], [target])) == {
        "classification", "bbox_regression", "bbox_ctrness",
    }  # fmt: skip


def test_without_breast_mask_restores_the_config_when_the_block_fails() -> None:
    m = build_detector(ModelConfig(arch="tiny", breast_mask=True))
    with pytest.raises(RuntimeError), without_breast_mask(m):
        assert not m.cfg.breast_mask
        raise RuntimeError("boom")
    assert m.cfg.breast_mask


def test_the_teacher_proposes_pseudo_boxes_without_the_mask() -> None:
    """Semi-supervision learns from what the model proposes, mask or not."""
    torch.manual_seed(0)
    img = torch.from_numpy(_film(192, 128))[None]
    cfg = dict(arch="tiny", norm="group", score_thresh=0.0, detections_per_img=1000)
    plain = build_detector(ModelConfig(**cfg)).eval()
    masked = build_detector(ModelConfig(**cfg, breast_mask=True))
    masked.load_state_dict(plain.state_dict())
    teacher = MeanTeacher(masked, 0.99)
    with torch.no_grad():
        want = plain([img])[0]
    got = teacher.detect([img])[0]
    assert torch.equal(got["boxes"], want["boxes"])
    assert teacher.module.cfg.breast_mask  # restored after the block
