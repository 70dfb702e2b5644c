from __future__ import annotations

import torch

from common.detector.adapt.augment import (
    Affine,
    StrongAugment,
    WeakAugment,
    hflip,
    similarity,
    vflip,
)


def _bright_bbox(img: torch.Tensor, thr: float = 0.5) -> list[float]:
    ys, xs = torch.nonzero(img[0] > thr, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1]


def test_vflip_matches_torch_flip_and_moves_boxes() -> None:
    img = torch.rand(1, 40, 30)
    t = vflip((40, 30))
    out = t.apply_image(img)
    assert torch.allclose(out, torch.flip(img, dims=[1]), atol=1e-5)
    boxes, keep = t.apply_boxes(torch.tensor([[2.0, 5.0, 10.0, 15.0]]))
    assert keep.tolist() == [True]
    assert torch.allclose(boxes, torch.tensor([[2.0, 25.0, 10.0, 35.0]]))


def test_hflip_moves_x() -> None:
    img = torch.rand(1, 20, 50)
    t = hflip((20, 50))
    assert torch.allclose(t.apply_image(img), torch.flip(img, dims=[2]), atol=1e-5)
    boxes, _ = t.apply_boxes(torch.tensor([[0.0, 0.0, 10.0, 4.0]]))
    assert torch.allclose(boxes, torch.tensor([[40.0, 0.0, 50.0, 4.0]]))


def test_similarity_box_follows_pixels() -> None:
    box = [20.0, 30.0, 36.0, 44.0]
    img = torch.zeros(1, 96, 80)
    img[:, 30:44, 20:36] = 1.0
    for scale, rot, tx, ty in [(1.1, 0.0, 3.0, -4.0), (0.9, 0.0, -5.0, 2.0)]:
        t = similarity((96, 80), scale=scale, rotate_deg=rot, translate=(tx, ty))
        moved, keep = t.apply_boxes(torch.tensor([box]))
        assert keep.all()
        seen = _bright_bbox(t.apply_image(img))
        assert torch.allclose(moved[0], torch.tensor(seen), atol=1.01), (moved, seen)


def test_rotation_box_encloses_pixels() -> None:
    img = torch.zeros(1, 64, 64)
    img[:, 20:40, 24:34] = 1.0
    t = similarity((64, 64), rotate_deg=5.0)
    moved, _ = t.apply_boxes(torch.tensor([[24.0, 20.0, 34.0, 40.0]]))
    seen = _bright_bbox(t.apply_image(img), thr=0.5)
    x1, y1, x2, y2 = moved[0].tolist()
    assert x1 <= seen[0] + 0.5 and y1 <= seen[1] + 0.5
    assert x2 >= seen[2] - 0.5 and y2 >= seen[3] - 0.5


def test_box_leaving_image_is_dropped_with_its_label() -> None:
    t = similarity((64, 64), translate=(-40.0, 0.0))
    target = {
        "boxes": torch.tensor([[2.0, 2.0, 12.0, 12.0], [50.0, 10.0, 60.0, 20.0]]),
        "labels": torch.tensor([0, 1]),
        "key": "k",
    }
    _, out = t.apply(torch.rand(1, 64, 64), target)
    assert out["labels"].tolist() == [1]
    assert torch.allclose(out["boxes"], torch.tensor([[10.0, 10.0, 20.0, 20.0]]))
    assert out["key"] == "k"


def test_compose_order() -> None:
    a = vflip((10, 10))
    b = similarity((10, 10), translate=(1.0, 0.0))
    pt = torch.tensor([[2.0, 3.0]])
    assert torch.allclose(a.then(b).apply_points(pt), torch.tensor([[3.0, 7.0]]))
    assert torch.allclose(Affine.identity((10, 10)).apply_points(pt), pt)


def test_strong_augment_keeps_range_shape_and_box_consistency() -> None:
    aug = StrongAugment(seed=3)
    for i in range(5):
        img = torch.zeros(1, 64, 64)
        img[:, 10:30, 12:28] = 0.8
        target = {
            "boxes": torch.tensor([[12.0, 10.0, 28.0, 30.0]]),
            "labels": torch.tensor([1]),
        }
        out, t = aug(img, target)
        assert out.shape == img.shape
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        assert t["boxes"].shape[0] == t["labels"].shape[0]
        if t["boxes"].shape[0]:
            x1, y1, x2, y2 = t["boxes"][0].round().long().tolist()
            inside = out[0, y1:y2, x1:x2].mean()
            outside = out[0].sum() - out[0, y1:y2, x1:x2].sum()
            n_out = out[0].numel() - out[0, y1:y2, x1:x2].numel()
            assert inside > outside / n_out, f"draw {i}: box lost its lesion"


def test_weak_augment_is_reproducible_and_only_flips() -> None:
    img = torch.rand(1, 32, 32)
    t = {"boxes": torch.tensor([[1.0, 2.0, 5.0, 9.0]]), "labels": torch.tensor([0])}
    a1, t1 = WeakAugment(seed=1)(img, t)
    a2, t2 = WeakAugment(seed=1)(img, t)
    assert torch.equal(a1, a2) and torch.equal(t1["boxes"], t2["boxes"])
    assert torch.allclose(a1, img, atol=1e-5) or torch.allclose(
        a1, torch.flip(img, dims=[1]), atol=1e-5
    )


def test_strong_intensity_keeps_background_black() -> None:
    img = torch.zeros(1, 32, 32)
    img[:, :, :16] = 0.4
    out = StrongAugment(seed=0, geometric=False).intensity(img)
    assert float(out[:, :, 16:].abs().max()) == 0.0
    assert not torch.allclose(out[:, :, :16], img[:, :, :16])
