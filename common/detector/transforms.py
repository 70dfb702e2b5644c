"""Box-consistent transforms on ``(image FloatTensor[1, H, W], target dict)``.

Every transform returns a new ``(image, target)``; geometric ones move
``target["boxes"]`` and ``target["ignore"]`` (FloatTensor[N, 4], model space,
pixel-edge coordinates ``xmin, ymin, xmax, ymax``) with the pixels, and
resizing updates ``target["spacing_mm"]``. Randomness comes from
``torch.Generator`` when given (reproducible), else torch's global RNG.
Intensity transforms keep values in ``[0, 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

Target = dict[str, Any]
BOX_KEYS: tuple[str, ...] = ("boxes", "ignore")


def _rand(gen: torch.Generator | None) -> float:
    return float(torch.rand((), generator=gen))


def _uniform(lo: float, hi: float, gen: torch.Generator | None) -> float:
    return lo + (hi - lo) * _rand(gen)


def _check(image: torch.Tensor) -> None:
    if image.ndim != 3 or image.shape[0] != 1:
        raise ValueError(f"image must be [1, H, W], got shape {tuple(image.shape)}")


def _map_boxes(target: Target, fn: Any) -> Target:
    out = dict(target)
    for k in BOX_KEYS:
        b = target.get(k)
        if isinstance(b, torch.Tensor) and b.numel():
            out[k] = fn(b.clone())
    return out


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Any]) -> None:
        self.transforms = list(transforms)

    def __call__(
        self, image: torch.Tensor, target: Target
    ) -> tuple[torch.Tensor, Target]:
        """Run every transform on ``(image [1, H, W], target)``."""
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


class VerticalFlip:
    """Mirror top-bottom with probability ``p``; ``y -> H - y``."""

    def __init__(
        self, p: float = 0.5, generator: torch.Generator | None = None
    ) -> None:
        self.p, self.gen = p, generator

    def __call__(
        self, image: torch.Tensor, target: Target
    ) -> tuple[torch.Tensor, Target]:
        """Flip ``image [1, H, W]`` and its boxes (model space)."""
        _check(image)
        if _rand(self.gen) >= self.p:
            return image, target
        h = image.shape[-2]

        def fn(b: torch.Tensor) -> torch.Tensor:
            return torch.stack([b[:, 0], h - b[:, 3], b[:, 2], h - b[:, 1]], dim=1)

        return image.flip(-2), _map_boxes(target, fn)


def resize(
    image: torch.Tensor, target: Target, shape: tuple[int, int]
) -> tuple[torch.Tensor, Target]:
    """Resize ``image [1, H, W]`` to ``shape = (rows, cols)`` (bilinear).

    Boxes scale by ``cols / W`` along x and ``rows / H`` along y; ``spacing_mm``
    (when present) is divided by the mean scale.
    """
    _check(image)
    h, w = image.shape[-2:]
    nh, nw = int(shape[0]), int(shape[1])
    if nh < 1 or nw < 1:
        raise ValueError(f"resize shape must be positive, got {shape}")
    if (nh, nw) == (h, w):
        return image, target
    out = F.interpolate(
        image.unsqueeze(0), size=(nh, nw), mode="bilinear", align_corners=False
    ).squeeze(0)
    sx, sy = nw / w, nh / h
    scale = torch.tensor([sx, sy, sx, sy])
    t = _map_boxes(target, lambda b: b * scale.to(b.dtype))
    if "spacing_mm" in t:
        t["spacing_mm"] = float(t["spacing_mm"]) / math.sqrt(sx * sy)
    return out.clamp(0.0, 1.0), t


class RandomResize:
    """Scale by a factor drawn uniformly from ``scale_range`` (both axes)."""

    def __init__(
        self,
        scale_range: tuple[float, float] = (0.8, 1.2),
        generator: torch.Generator | None = None,
    ) -> None:
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(
                f"scale_range must satisfy 0 < lo <= hi, got {scale_range}"
            )
        self.range, self.gen = (lo, hi), generator

    def __call__(
        self, image: torch.Tensor, target: Target
    ) -> tuple[torch.Tensor, Target]:
        """Resize ``image [1, H, W]`` and its boxes by a random factor."""
        _check(image)
        s = _uniform(*self.range, self.gen)
        h, w = image.shape[-2:]
        return resize(image, target, (max(1, round(h * s)), max(1, round(w * s))))


class IntensityJitter:
    """Random gamma, contrast around the mean, and Gaussian noise; output in [0, 1].

    Args:
        gamma_range: ``x -> x ** gamma``, gamma drawn uniformly.
        contrast_range: ``x -> mean + c * (x - mean)``, c drawn uniformly.
        noise_std: maximum std of additive Gaussian noise (std drawn in
            ``[0, noise_std]``).
        generator: RNG for reproducibility.
    """

    def __init__(
        self,
        gamma_range: tuple[float, float] = (0.8, 1.25),
        contrast_range: tuple[float, float] = (0.85, 1.15),
        noise_std: float = 0.01,
        generator: torch.Generator | None = None,
    ) -> None:
        if gamma_range[0] <= 0 or gamma_range[0] > gamma_range[1]:
            raise ValueError(f"gamma_range must be 0 < lo <= hi, got {gamma_range}")
        if contrast_range[0] < 0 or contrast_range[0] > contrast_range[1]:
            raise ValueError(
                f"contrast_range must be 0 <= lo <= hi, got {contrast_range}"
            )
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.gamma, self.contrast, self.noise = gamma_range, contrast_range, noise_std
        self.gen = generator

    def __call__(
        self, image: torch.Tensor, target: Target
    ) -> tuple[torch.Tensor, Target]:
        """Jitter intensities of ``image [1, H, W]``; target unchanged."""
        _check(image)
        x = image.clamp(0.0, 1.0) ** _uniform(*self.gamma, self.gen)
        mean = x.mean()
        x = mean + _uniform(*self.contrast, self.gen) * (x - mean)
        if self.noise > 0:
            std = _uniform(0.0, self.noise, self.gen)
            x = x + std * torch.randn(x.shape, generator=self.gen, dtype=x.dtype)
        return x.clamp(0.0, 1.0), dict(target)
