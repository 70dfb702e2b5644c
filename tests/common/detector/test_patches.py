"""Patch training: lesion copy-paste and patch crops (common.detector.transforms)."""

from __future__ import annotations

import torch

from common.detector.recipe import AugmentConfig, train_transform
from common.detector.transforms import LesionPaste, PatchCrop, cut_lesion


def _breast(h: int = 96, w: int = 96, level: float = 0.4) -> torch.Tensor:
    img = torch.full((1, h, w), level)
    img[:, :, 80:] = 0.0  # air on the right
    return img


class _Source:
    """Two images: one with a bright 6x6 'calcification' box, one normal."""

    def __init__(self) -> None:
        lesion = _breast()
        lesion[:, 40:46, 30:36] += 0.5
        self.items = [
            (lesion, {"boxes": torch.tensor([[30.0, 40.0, 36.0, 46.0]]),
                      "labels": torch.tensor([1])}),
            (_breast(), {"boxes": torch.zeros(0, 4),
                         "labels": torch.zeros(0, dtype=torch.int64)}),
        ]  # fmt: skip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):  # noqa: ANN204
        return self.items[i]


def test_cut_lesion_keeps_contrast_not_background() -> None:
    img = _breast()
    img[:, 40:46, 30:36] += 0.5
    patch = cut_lesion(img, torch.tensor([30.0, 40.0, 36.0, 46.0]), 1)
    assert patch is not None
    inner = patch.signal[:, 3:9, 3:9]
    assert torch.allclose(inner, torch.full_like(inner, 0.5), atol=1e-4)
    # the flat tissue behind the lesion is removed: no step at the crop edge
    assert float(patch.signal[:, 0, :].abs().max()) < 1e-4
    assert patch.box.tolist() == [3.0, 3.0, 9.0, 9.0]


def test_cut_lesion_refuses_a_box_at_the_border() -> None:
    assert cut_lesion(_breast(), torch.tensor([0.0, 0.0, 5.0, 5.0]), 0) is None


def test_paste_adds_a_lesion_inside_the_breast_with_its_box() -> None:
    src = _Source()
    paste = LesionPaste(
        src, p=1.0, max_pastes=1, generator=torch.Generator().manual_seed(0)
    )
    image, target = src[1]
    out, t = paste(image, dict(target))
    assert t["boxes"].shape == (1, 4) and t["labels"].tolist() == [1]
    x0, y0, x1, y1 = (int(v) for v in t["boxes"][0])
    assert x1 <= 80  # never onto air
    assert torch.allclose(out[:, y0:y1, x0:x1], torch.full((1, 6, 6), 0.9), atol=1e-4)
    # outside the window nothing changed
    changed = (out - image).abs() > 1e-6
    assert int(changed.sum()) <= (6 + 2 * 3) ** 2
    assert torch.equal(image, _breast())  # the input was not modified


def test_same_woman_paste_uses_only_that_womans_lesions() -> None:
    """The DP form: an image gets its own woman's lesions, or nothing."""
    src = _Source()
    src.items[0][1]["patient_id"] = "W1"  # the lesion is W1's
    src.items[1][1]["patient_id"] = "W2"  # W2 has none
    paste = LesionPaste(
        src, p=1.0, max_pastes=1, generator=torch.Generator().manual_seed(0),
        same_woman=True,
    )  # fmt: skip
    image, target = src[1]
    out, t = paste(image, dict(target))  # W2: nothing of hers to paste
    assert torch.equal(out, image) and t["boxes"].shape == (0, 4)
    mine = dict(target, patient_id="W1")  # another image of W1
    out, t = paste(image, mine)
    assert t["boxes"].shape == (1, 4) and t["labels"].tolist() == [1]
    assert not torch.equal(out, image)
    # a target that names no woman gets nothing either
    anon = {k: v for k, v in target.items() if k != "patient_id"}
    assert paste(image, anon)[1]["boxes"].shape == (0, 4)
    # without same_woman, W2's image gets W1's lesion
    shared = LesionPaste(src, p=1.0, max_pastes=1, generator=torch.Generator())
    assert shared(image, dict(target))[1]["boxes"].shape == (1, 4)


def test_paste_avoids_existing_boxes_and_skips_unsupervised_images() -> None:
    src = _Source()
    paste = LesionPaste(
        src, p=1.0, max_pastes=4, generator=torch.Generator().manual_seed(1)
    )
    image, target = src[0]
    for _ in range(5):
        _, t = paste(image, dict(target))
        b = t["boxes"]
        for i in range(len(b)):
            for j in range(i + 1, len(b)):
                sep = (
                    (b[i, 0] >= b[j, 2])
                    | (b[i, 2] <= b[j, 0])
                    | (b[i, 1] >= b[j, 3])
                    | (b[i, 3] <= b[j, 1])
                )
                assert bool(sep)
    out, t = paste(image, {"boxes": torch.zeros(0, 4)})  # no labels key
    assert torch.equal(out, image) and len(t["boxes"]) == 0


def test_train_transform_pastes_only_with_a_source() -> None:
    aug = AugmentConfig(
        vflip=False, scale=False, intensity=False, paste=True, paste_p=1.0
    )
    assert len(train_transform(aug, None).transforms) == 0
    assert isinstance(train_transform(aug, None, _Source()).transforms[0], LesionPaste)


def test_train_transform_trains_on_patches_when_augment_patch_is_set() -> None:
    """``augment.patch`` was once validated and then never applied: every
    "patch" run trained on whole images. The transform must crop."""
    img = torch.full((1, 300, 200), 0.5)
    target = {
        "boxes": torch.tensor([[100.0, 200.0, 120.0, 230.0]]),
        "labels": torch.tensor([0]),
    }
    aug = AugmentConfig(
        vflip=False, scale=False, intensity=False, patch=64, patch_lesion_p=1.0
    )
    tf = train_transform(aug, torch.Generator().manual_seed(0))
    assert any(isinstance(p, PatchCrop) for p in tf.transforms)
    for _ in range(5):
        out, t = tf(img, dict(target))
        assert tuple(out.shape) == (1, 64, 64)
        assert len(t["boxes"]) == 1  # lesion_p=1: the lesion is in the patch
        b = t["boxes"][0]
        assert float(b[2] - b[0]) == 20.0 and float(b[3] - b[1]) == 30.0
    whole = train_transform(
        AugmentConfig(vflip=False, scale=False, intensity=False), None
    )
    assert tuple(whole(img, dict(target))[0].shape) == (1, 300, 200)


def _big(h: int = 300, w: int = 200) -> tuple[torch.Tensor, dict]:
    img = torch.zeros(1, h, w)
    img[:, :, :150] = 0.5  # breast on the left, air on the right
    boxes = torch.tensor([[100.0, 200.0, 120.0, 230.0], [10.0, 10.0, 20.0, 20.0]])
    return img, {"boxes": boxes, "labels": torch.tensor([0, 1])}


def test_patch_crop_keeps_a_lesion_whole_and_moves_its_box() -> None:
    img, t = _big()
    img[:, 200:230, 100:120] = 0.9
    crop = PatchCrop(64, lesion_p=1.0, generator=torch.Generator().manual_seed(3))
    for _ in range(20):
        out, ct = crop(img, dict(t))
        assert out.shape == (1, 64, 64)
        assert len(ct["boxes"]) >= 1 and len(ct["boxes"]) == len(ct["labels"])
        for b, lab in zip(ct["boxes"], ct["labels"], strict=True):
            x0, y0, x1, y1 = (int(v) for v in b)
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            if int(lab) == 0:  # the bright 20x30 mass, whole, under its box
                assert (x1 - x0, y1 - y0) == (20, 30)
                assert float(out[:, y0:y1, x0:x1].min()) > 0.89


def test_patch_crop_drops_a_mostly_hidden_box_and_prefers_breast() -> None:
    img, t = _big()
    crop = PatchCrop(64, lesion_p=0.0, generator=torch.Generator().manual_seed(0))
    for _ in range(20):
        out, ct = crop(img, dict(t))
        assert float(out[0, 32, 32]) == 0.5  # centre in the breast
        for b in ct["boxes"]:
            assert (
                float((b[2] - b[0]) * (b[3] - b[1])) >= 0.5 * 100 - 1e-4
                or float((b[2] - b[0]) * (b[3] - b[1])) >= 0.5 * 600 - 1e-4
            )
    small = torch.zeros(1, 50, 40)
    same, st = crop(small, {"boxes": torch.zeros(0, 4)})
    assert same is small


def test_grow_small_boxes_widens_only_small_boxes_about_their_centre() -> None:
    from common.detector.transforms import GrowSmallBoxes

    img = torch.zeros(1, 100, 100)
    boxes = torch.tensor(
        [[40.0, 40.0, 45.0, 50.0], [0.0, 0.0, 4.0, 4.0], [10.0, 60.0, 50.0, 95.0]]
    )
    t = {"boxes": boxes, "labels": torch.tensor([1, 1, 0]), "spacing_mm": 0.5}
    _, out = GrowSmallBoxes(10.0)(img, t)  # 10 mm = 20 px
    b = out["boxes"]
    assert b[0].tolist() == [32.5, 35.0, 52.5, 55.0]  # centre kept, 20 px wide
    assert b[1].tolist() == [0.0, 0.0, 12.0, 12.0]  # clipped at the border
    assert b[2].tolist() == boxes[2].tolist()  # large enough: unchanged
    assert torch.equal(t["boxes"], boxes)  # input untouched
    _, same = GrowSmallBoxes(10.0)(img, {"boxes": boxes})  # no spacing: as is
    assert torch.equal(same["boxes"], boxes)


def test_patch_crop_refuses_bad_settings() -> None:
    import pytest

    for kw in ({"size": 16}, {"size": 64, "lesion_p": 1.5}, {"size": 64, "tries": 0}):
        with pytest.raises(ValueError, match="patch"):
            PatchCrop(**kw)
