"""Self-training's pseudo-labels: fused findings become boxes, ignore or background."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from common.detector.adapt.pseudo import PseudoConfig, PseudoLabeled, pseudo_label
from common.detector.sampling import lesion_flags
from common.keys import CLASS_TO_LABEL

MASS, CALC = CLASS_TO_LABEL["mass"], CLASS_TO_LABEL["calcification"]


class Fixed(nn.Module):
    """A 'detector' that returns the same findings on every image."""

    def __init__(
        self, boxes: list[list[float]], scores: list[float], labels: list[int]
    ):
        super().__init__()
        self.out = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }
        self.calls = 0

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        self.calls += len(images)
        return [{k: v.clone() for k, v in self.out.items()} for _ in images]


class Unlabeled(Dataset[tuple[Tensor, dict[str, Any]]]):
    """Images without labels, as a site's unlabeled view gives them."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.loaded = 0

    def __len__(self) -> int:
        return self.n

    def target(self, i: int) -> dict[str, Any]:
        return {
            "boxes": torch.zeros((0, 4)),
            "labels": torch.zeros(0, dtype=torch.int64),
            "ignore": torch.zeros((0, 4)),
            "key": f"img{i}",
            "spacing_mm": 0.4,
            "labeled": False,
            "patient_id": f"w{i // 2}",
        }

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Any]]:
        self.loaded += 1
        return torch.full((1, 64, 64), i / 10), self.target(i)


def test_fused_findings_become_boxes_ignore_regions_and_background() -> None:
    # both models agree on a mass (fused 0.8), one alone sees a second mass
    # (0.9 / 2 = 0.45: doubt) and a cluster at 0.3 (0.15: background)
    a = Fixed([[10, 10, 30, 30], [40, 40, 50, 50]], [0.8, 0.9], [MASS, MASS])
    b = Fixed([[11, 11, 31, 31], [5, 40, 9, 44]], [0.8, 0.3], [MASS, CALC])
    data, fused = pseudo_label([a, b], Unlabeled(3), PseudoConfig(keep=0.5, ignore=0.2))
    assert len(data) == 3 and len(fused) == 3
    assert a.calls == b.calls == 3  # each image once per model
    t = data.target(0)
    assert t["labeled"] is True and t["pseudo"] is True
    assert t["labels"].tolist() == [MASS]
    assert t["boxes"][0].tolist() == pytest.approx([10.5, 10.5, 30.5, 30.5])
    assert t["ignore"].tolist() == [[40, 40, 50, 50]]
    assert t["key"] == "img0" and t["spacing_mm"] == 0.4
    assert sorted(np.round(fused[0]["scores"], 3).tolist()) == [0.15, 0.45, 0.8]
    assert data.counts() == {
        "images": 3,
        "images_with_boxes": 3,
        "boxes": {"mass": 3, "calcification": 0},
        "ignore_regions": 3,
    }
    # the training sampler sees them as lesion images, without decoding pixels
    base = data.base
    assert isinstance(base, Unlabeled)
    before = base.loaded
    assert lesion_flags(data) == [True, True, True]
    assert base.loaded == before
    image, target = data[2]
    assert float(image.mean()) == pytest.approx(0.2)
    assert target["labels"].tolist() == [MASS]


def test_thresholds_move_findings_between_the_three_kinds() -> None:
    m = Fixed([[10, 10, 30, 30]], [0.6], [CALC])
    keep_all, _ = pseudo_label([m], Unlabeled(1), PseudoConfig(keep=0.6, ignore=0.0))
    assert keep_all.target(0)["labels"].tolist() == [CALC]
    doubt, _ = pseudo_label([m], Unlabeled(1), PseudoConfig(keep=0.7, ignore=0.6))
    assert len(doubt.target(0)["boxes"]) == 0 and len(doubt.target(0)["ignore"]) == 1
    none, _ = pseudo_label([m], Unlabeled(1), PseudoConfig(keep=0.9, ignore=0.7))
    t = none.target(0)
    assert len(t["boxes"]) == 0 and len(t["ignore"]) == 0
    assert t["labeled"] is True  # background: a negative image now
    assert none.counts()["images_with_boxes"] == 0


def test_bad_settings_and_inputs_are_refused() -> None:
    for keep, ignore in ((0.3, 0.5), (1.2, 0.1), (0.5, -0.1)):
        with pytest.raises(ValueError, match="ignore <= keep"):
            PseudoConfig(keep=keep, ignore=ignore)
    with pytest.raises(ValueError, match="no model"):
        pseudo_label([], Unlabeled(1), PseudoConfig())
    with pytest.raises(ValueError, match="2 boxes, 1 labels and 2 ignore lists for 2"):
        PseudoLabeled(
            Unlabeled(2),
            [np.zeros((0, 4))] * 2,
            [np.zeros(0)],
            [np.zeros((0, 4))] * 2,
        )

    class NoSpacing(Unlabeled):
        def target(self, i: int) -> dict[str, Any]:
            t = super().target(i)
            del t["spacing_mm"]
            return t

    with pytest.raises(ValueError, match="image img0: target has no spacing_mm"):
        pseudo_label([Fixed([], [], [])], NoSpacing(1), PseudoConfig())
