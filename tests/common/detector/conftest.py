"""Synthetic images for the detector tests."""

from __future__ import annotations

import torch


def square_image(size: int = 128, box=(40, 48, 72, 80), value: float = 0.9):
    """FloatTensor[1, size, size]: dim noise plus one bright square (a 'mass')."""
    g = torch.Generator().manual_seed(0)
    img = 0.1 * torch.rand(1, size, size, generator=g)
    x0, y0, x1, y1 = box
    img[:, y0:y1, x0:x1] = value
    return img
