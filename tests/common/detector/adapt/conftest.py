"""Small synthetic detection data and a tiny FCOS for adaptation tests."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

from common.detector.model import ModelConfig, build_detector


def blob_image(
    size: int, boxes: list[list[float]], seed: int, level: float = 0.9
) -> torch.Tensor:
    """A [1, size, size] 'breast' (left two thirds) with bright boxes."""
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(1, size, size)
    img[:, :, : 2 * size // 3] = 0.3 + 0.1 * torch.rand(
        1, size, 2 * size // 3, generator=g
    )
    for x1, y1, x2, y2 in boxes:
        img[:, int(y1) : int(y2), int(x1) : int(x2)] = level
    return img


class ToyDetection(Dataset[tuple[torch.Tensor, dict[str, Any]]]):
    """``n`` images of ``size`` px, one mass box each, ``patients`` women."""

    def __init__(self, n: int = 6, size: int = 64, patients: int = 3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            x = float(torch.randint(4, size // 2, (1,), generator=g))
            y = float(torch.randint(4, size - 24, (1,), generator=g))
            box = [x, y, x + 16.0, y + 16.0]
            target = {
                "boxes": torch.tensor([box]),
                "labels": torch.tensor([0]),
                "ignore": torch.zeros(0, 4),
                "key": f"img{i}",
                "spacing_mm": 0.4,
                "labeled": True,
                "patient_id": f"p{i % patients}",
            }
            self.items.append((blob_image(size, [box], seed + i), target))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        img, t = self.items[i]
        return img.clone(), dict(t)


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector(ModelConfig(arch="tiny", fpn_channels=16, head_convs=1))


@pytest.fixture
def toy() -> ToyDetection:
    return ToyDetection()


@pytest.fixture
def make_blob():
    return blob_image
