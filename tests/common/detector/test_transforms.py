"""Box-consistent transforms: boxes (and ignore boxes) follow the pixels."""

from __future__ import annotations

import pytest
import torch

from common.detector.recipe import AugmentConfig, train_transform
from common.detector.transforms import (
    Compose,
    IntensityJitter,
    RandomResize,
    VerticalFlip,
    resize,
)

H, W = 60, 44
BOX = [6.0, 10.0, 20.0, 30.0]
IGN = [30.0, 40.0, 40.0, 56.0]


def _sample() -> tuple[torch.Tensor, dict]:
    img = torch.zeros(1, H, W)
    img[0, 10:30, 6:20] = 1.0  # the lesion box, pixel-exact
    img[0, 40:56, 30:40] = 0.5  # the ignore box
    t = {
        "boxes": torch.tensor([BOX]),
        "labels": torch.tensor([0]),
        "ignore": torch.tensor([IGN]),
        "spacing_mm": 0.4,
        "key": "k",
    }
    return img, t


def _bright_box(img: torch.Tensor, level: float) -> list[float]:
    ys, xs = torch.nonzero((img[0] - level).abs() < 0.15, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def test_flip_moves_boxes_with_pixels() -> None:
    img, t = _sample()
    tf = VerticalFlip(p=1.0)
    out, t2 = tf(img, t)
    assert out.shape == img.shape
    assert t2["boxes"][0].tolist() == _bright_box(out, 1.0)
    assert t2["ignore"][0].tolist() == _bright_box(out, 0.5)
    assert t["boxes"][0].tolist() == BOX  # input not modified
    back, t3 = tf(out, t2)
    assert torch.equal(back, img) and t3["boxes"][0].tolist() == BOX


def test_flip_probability_zero_is_identity() -> None:
    img, t = _sample()
    out, t2 = VerticalFlip(p=0.0)(img, t)
    assert torch.equal(out, img) and t2["boxes"].tolist() == [BOX]


def test_resize_scales_boxes_and_spacing() -> None:
    img, t = _sample()
    out, t2 = resize(img, t, (120, 88))
    assert out.shape == (1, 120, 88)
    assert t2["boxes"][0].tolist() == [12.0, 20.0, 40.0, 60.0]
    assert t2["ignore"][0].tolist() == [60.0, 80.0, 80.0, 112.0]
    assert t2["spacing_mm"] == pytest.approx(0.2)
    got = _bright_box(out, 1.0)
    assert all(
        abs(a - b) <= 1.0 for a, b in zip(got, t2["boxes"][0].tolist(), strict=True)
    )


def test_random_resize_seeded_and_consistent() -> None:
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    img, t = _sample()
    a, ta = RandomResize((0.5, 1.5), g1)(img, t)
    b, tb = RandomResize((0.5, 1.5), g2)(img, t)
    assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])
    sx, sy = a.shape[2] / W, a.shape[1] / H
    assert ta["boxes"][0].tolist() == pytest.approx([6 * sx, 10 * sy, 20 * sx, 30 * sy])
    with pytest.raises(ValueError):
        RandomResize((0.0, 1.0))


def test_intensity_jitter_range_and_targets() -> None:
    img, t = _sample()
    img = img * 0.8 + 0.1
    out, t2 = IntensityJitter(
        noise_std=0.2, generator=torch.Generator().manual_seed(0)
    )(img, t)
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert not torch.equal(out, img)
    assert torch.equal(t2["boxes"], t["boxes"])
    with pytest.raises(ValueError):
        IntensityJitter(gamma_range=(0.0, 1.0))


def test_compose_and_empty_boxes() -> None:
    g = torch.Generator().manual_seed(1)
    img, t = _sample()
    out, t2 = Compose([VerticalFlip(1.0), VerticalFlip(1.0)])(img, t)
    assert t2["boxes"][0].tolist() == BOX and torch.equal(out, img)
    empty = {"boxes": torch.zeros(0, 4), "ignore": torch.zeros(0, 4), "spacing_mm": 0.4}
    out, t3 = train_transform(AugmentConfig(), g)(img, empty)
    assert t3["boxes"].shape == (0, 4)
    with pytest.raises(ValueError, match=r"\[1, H, W\]"):
        VerticalFlip(1.0)(torch.zeros(H, W), empty)
