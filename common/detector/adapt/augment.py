"""Box-consistent weak/strong augmentations, including vendor-mimicking intensity.

Coordinate space: model space, pixel-edge coordinates, origin top-left, x
right, y down; boxes ``[xmin, ymin, xmax, ymax]`` (FloatTensor[N, 4]). Images
are FloatTensor[1, H, W] in ``[0, 1]``, breast on the left, dense bright.

Every geometric change is an :class:`Affine` (a 3x3 matrix mapping input
pixel-edge coordinates to output ones, output shape fixed), so the same
transform moves an image, its boxes, its ignore regions and - for the mean
teacher - pseudo boxes predicted on another view. Horizontal flips are off by
default because the contract puts the breast on the left; vertical flips
(CC and MLO are plausible upside down) are on.

Intensity transforms mimic what distinguishes vendors' presentation
processing (see docs/phantom.md): gamma and sigmoid LUTs,
window/contrast changes, unsharp masking (multi-scale contrast enhancement),
detector blur (indirect conversion MTF) and quantum plus electronic noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from common.detector.transforms import BOX_KEYS, Target


@dataclass(frozen=True)
class Affine:
    """A geometric transform of model-space pixel-edge coordinates.

    Attributes:
        matrix: FloatTensor[3, 3] (float64), ``[x', y', 1] = M @ [x, y, 1]``
            from input to output coordinates.
        out_hw: ``(H, W)`` of the output image.
    """

    matrix: Tensor
    out_hw: tuple[int, int]

    @staticmethod
    def identity(hw: tuple[int, int]) -> Affine:
        """The identity on an ``(H, W)`` image."""
        return Affine(torch.eye(3, dtype=torch.float64), hw)

    def then(self, other: Affine) -> Affine:
        """Compose: apply ``self`` first, then ``other``."""
        return Affine(other.matrix @ self.matrix, other.out_hw)

    def apply_points(self, xy: Tensor) -> Tensor:
        """Map FloatTensor[N, 2] input points to output points (same dtype)."""
        ones = torch.ones(xy.shape[0], 1, dtype=torch.float64)
        pts = torch.cat([xy.to(torch.float64), ones], dim=1)
        out = pts @ self.matrix.T
        return out[:, :2].to(xy.dtype)

    def apply_boxes(
        self, boxes: Tensor, min_visible: float = 0.3
    ) -> tuple[Tensor, Tensor]:
        """Map FloatTensor[N, 4] boxes; returns ``(boxes', keep)``.

        Each box becomes the axis-aligned box enclosing its four moved corners,
        clipped to the output image. ``keep`` (BoolTensor[N]) drops boxes whose
        clipped area is below ``min_visible`` of their unclipped area or that
        are thinner than one pixel; ``boxes'`` holds the kept boxes only.
        """
        if boxes.numel() == 0:
            return boxes.reshape(0, 4).clone(), torch.zeros(0, dtype=torch.bool)
        corners = boxes[:, [0, 1, 2, 1, 0, 3, 2, 3]].reshape(-1, 4, 2)  # [N, 4, (x, y)]
        moved = self.apply_points(corners.reshape(-1, 2)).reshape(-1, 4, 2)
        lo = moved.min(dim=1).values
        hi = moved.max(dim=1).values
        raw = torch.cat([lo, hi], dim=1)
        h, w = self.out_hw
        clipped = raw.clone()
        clipped[:, 0::2] = clipped[:, 0::2].clamp(0, w)
        clipped[:, 1::2] = clipped[:, 1::2].clamp(0, h)
        area_raw = (raw[:, 2] - raw[:, 0]) * (raw[:, 3] - raw[:, 1])
        cw = clipped[:, 2] - clipped[:, 0]
        ch = clipped[:, 3] - clipped[:, 1]
        keep = (cw >= 1) & (ch >= 1) & (cw * ch >= min_visible * area_raw)
        return clipped[keep].to(boxes.dtype), keep

    def apply_image(self, image: Tensor, mode: str = "bilinear") -> Tensor:
        """Warp FloatTensor[C, H, W]; pixels from outside the input read 0."""
        if image.dim() != 3:
            raise ValueError(
                f"apply_image: expected [C, H, W], got {tuple(image.shape)}"
            )
        h_in, w_in = image.shape[-2:]
        h, w = self.out_hw
        inv = torch.linalg.inv(self.matrix)
        ys = torch.arange(h, dtype=torch.float64) + 0.5
        xs = torch.arange(w, dtype=torch.float64) + 0.5
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        pts = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1)  # [h, w, 3]
        src = pts @ inv.T
        grid = torch.stack(
            [2 * src[..., 0] / w_in - 1, 2 * src[..., 1] / h_in - 1], dim=-1
        ).to(image.dtype)
        out = F.grid_sample(
            image[None],
            grid[None],
            mode=mode,
            padding_mode="zeros",
            align_corners=False,
        )
        return out[0]

    def apply(self, image: Tensor, target: Mapping[str, Any]) -> tuple[Tensor, Target]:
        """Warp an image and every box key of its target (labels stay aligned).

        ``labels`` is filtered with the kept ``boxes``; other keys are copied.
        """
        out = dict(target)
        for key in BOX_KEYS:
            if key in target:
                moved, keep = self.apply_boxes(target[key])
                out[key] = moved
                if key == "boxes" and "labels" in target:
                    out["labels"] = target["labels"][keep]
                if key == "boxes" and "scores" in target:
                    out["scores"] = target["scores"][keep]
        return self.apply_image(image), out


def vflip(hw: tuple[int, int]) -> Affine:
    """Mirror top-bottom: ``y' = H - y``."""
    h, _ = hw
    m = torch.tensor([[1, 0, 0], [0, -1, h], [0, 0, 1]], dtype=torch.float64)
    return Affine(m, hw)


def hflip(hw: tuple[int, int]) -> Affine:
    """Mirror left-right: ``x' = W - x`` (moves the breast to the right)."""
    _, w = hw
    m = torch.tensor([[-1, 0, w], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    return Affine(m, hw)


def similarity(
    hw: tuple[int, int],
    *,
    scale: float = 1.0,
    rotate_deg: float = 0.0,
    translate: tuple[float, float] = (0.0, 0.0),
) -> Affine:
    """Scale and rotate about the image centre, then shift by ``translate`` px."""
    h, w = hw
    cx, cy = w / 2.0, h / 2.0
    a = math.radians(rotate_deg)
    c, s = scale * math.cos(a), scale * math.sin(a)
    tx, ty = translate
    m = torch.tensor(
        [
            [c, -s, cx - c * cx + s * cy + tx],
            [s, c, cy - s * cx - c * cy + ty],
            [0, 0, 1],
        ],
        dtype=torch.float64,
    )
    return Affine(m, hw)


# --- intensity ------------------------------------------------------------


def gamma(image: Tensor, g: float) -> Tensor:
    """``x ** g`` (g < 1 brightens, g > 1 darkens); values stay in [0, 1]."""
    return image.clamp(0, 1).pow(g)


def contrast(image: Tensor, factor: float, center: float = 0.5) -> Tensor:
    """Linear window change about ``center``, clipped to [0, 1]."""
    return ((image - center) * factor + center).clamp(0, 1)


def sigmoid_lut(image: Tensor, center: float, width: float) -> Tensor:
    """DICOM-style SIGMOID VOI LUT, rescaled so 0 -> 0 and 1 -> 1."""

    def f(x: Tensor) -> Tensor:
        return torch.sigmoid(4.0 * (x - center) / width)

    lo = f(torch.zeros((), dtype=image.dtype))
    hi = f(torch.ones((), dtype=image.dtype))
    return ((f(image) - lo) / (hi - lo)).clamp(0, 1)


def _gaussian_kernel(sigma: float, dtype: torch.dtype) -> Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def blur(image: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur (pixels) of FloatTensor[C, H, W]; edges replicate."""
    if sigma <= 0:
        return image
    k = _gaussian_kernel(sigma, image.dtype)
    r = k.numel() // 2
    x = image[:, None]  # [C, 1, H, W]
    x = F.pad(x, (r, r, 0, 0), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x[:, 0]


def unsharp(image: Tensor, sigma: float, amount: float) -> Tensor:
    """Unsharp masking ``x + amount * (x - blur(x))``, clipped to [0, 1]."""
    return (image + amount * (image - blur(image, sigma))).clamp(0, 1)


def noise(
    image: Tensor, quantum: float, electronic: float, generator: torch.Generator
) -> Tensor:
    """Signal-dependent (``quantum * sqrt(x)``) plus constant Gaussian noise."""
    sd = quantum * image.clamp(min=0).sqrt() + electronic
    eps = torch.randn(image.shape, generator=generator, dtype=image.dtype)
    return (image + sd * eps).clamp(0, 1)


# --- policies -------------------------------------------------------------


@dataclass(frozen=True)
class StrongParams:
    """Ranges of the strong augmentation (drawn uniformly per image).

    Attributes:
        p_vflip, p_hflip: flip probabilities.
        scale: ``(lo, hi)`` isotropic scale.
        rotate_deg: largest absolute rotation in degrees.
        translate_frac: largest shift as a fraction of each side.
        gamma: ``(lo, hi)`` of the gamma exponent (drawn log-uniformly).
        contrast: ``(lo, hi)`` contrast factor.
        p_sigmoid: probability of a sigmoid LUT (centre 0.4–0.6, width 0.6–1.2).
        p_unsharp: probability of unsharp masking (sigma 1–4 px, amount 0.3–1).
        p_blur: probability of a detector blur (sigma 0.3–1.2 px).
        noise_quantum, noise_electronic: largest noise amplitudes.
    """

    p_vflip: float = 0.5
    p_hflip: float = 0.0
    scale: tuple[float, float] = (0.9, 1.1)
    rotate_deg: float = 5.0
    translate_frac: float = 0.05
    gamma: tuple[float, float] = (0.6, 1.6)
    contrast: tuple[float, float] = (0.7, 1.4)
    p_sigmoid: float = 0.3
    p_unsharp: float = 0.3
    p_blur: float = 0.3
    noise_quantum: float = 0.03
    noise_electronic: float = 0.01


def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _p(g: torch.Generator, p: float) -> bool:
    return p > 0 and float(torch.rand((), generator=g)) < p


def random_flip(
    hw: tuple[int, int], g: torch.Generator, p_vflip: float = 0.5, p_hflip: float = 0.0
) -> Affine:
    """A random flip (or the identity) of an ``(H, W)`` image."""
    t = Affine.identity(hw)
    if _p(g, p_vflip):
        t = t.then(vflip(hw))
    if _p(g, p_hflip):
        t = t.then(hflip(hw))
    return t


def random_geometry(
    hw: tuple[int, int], g: torch.Generator, params: StrongParams
) -> Affine:
    """Flip, then a small similarity transform, drawn from ``params``."""
    h, w = hw
    t = random_flip(hw, g, params.p_vflip, params.p_hflip)
    sim = similarity(
        hw,
        scale=_u(g, *params.scale),
        rotate_deg=_u(g, -params.rotate_deg, params.rotate_deg),
        translate=(
            _u(g, -params.translate_frac, params.translate_frac) * w,
            _u(g, -params.translate_frac, params.translate_frac) * h,
        ),
    )
    return t.then(sim)


def random_intensity(image: Tensor, g: torch.Generator, params: StrongParams) -> Tensor:
    """Vendor-mimicking intensity chain: LUT, contrast, sharpening, blur, noise.

    Pixels that are exactly 0 (background, or outside a warped image) stay 0.
    """
    x = image
    background = image <= 0
    lo, hi = params.gamma
    x = gamma(x, math.exp(_u(g, math.log(lo), math.log(hi))))
    if _p(g, params.p_sigmoid):
        x = sigmoid_lut(x, _u(g, 0.4, 0.6), _u(g, 0.6, 1.2))
    fg = x[~background]
    center = float(fg.mean()) if fg.numel() else 0.5
    x = contrast(x, _u(g, *params.contrast), center=center)
    if _p(g, params.p_unsharp):
        x = unsharp(x, _u(g, 1.0, 4.0), _u(g, 0.3, 1.0))
    if _p(g, params.p_blur):
        x = blur(x, _u(g, 0.3, 1.2))
    q = _u(g, 0.0, params.noise_quantum)
    e = _u(g, 0.0, params.noise_electronic)
    if q > 0 or e > 0:
        x = noise(x, q, e, g)
    return x.masked_fill(background, 0.0)


class StrongAugment:
    """Strong, box-consistent augmentation: ``(image, target) -> (image, target)``.

    Usable as a dataset-view transform for labeled training and few-shot
    fine-tuning. Image FloatTensor[1, H, W] in [0, 1]; ``boxes``/``ignore``
    model-space and moved with the image; ``labels`` filtered with ``boxes``.
    ``geometric=False`` keeps the geometry (intensity only).
    """

    def __init__(
        self,
        params: StrongParams | None = None,
        *,
        seed: int = 0,
        geometric: bool = True,
    ) -> None:
        self.params = params or StrongParams()
        self.geometric = geometric
        self.generator = torch.Generator().manual_seed(seed)

    def draw_geometry(self, hw: tuple[int, int]) -> Affine:
        """The next random geometry for an ``(H, W)`` image."""
        if not self.geometric:
            return Affine.identity(hw)
        return random_geometry(hw, self.generator, self.params)

    def intensity(self, image: Tensor) -> Tensor:
        """The next random intensity chain applied to ``image``."""
        return random_intensity(image, self.generator, self.params)

    def __call__(
        self, image: Tensor, target: Mapping[str, Any]
    ) -> tuple[Tensor, Target]:
        """Augment one image and its target."""
        geo = self.draw_geometry((int(image.shape[-2]), int(image.shape[-1])))
        img, out = geo.apply(image, target)
        return self.intensity(img), out


class WeakAugment:
    """Weak augmentation (random flips only): ``(image, target) -> (image, target)``."""

    def __init__(self, *, seed: int = 0, p_vflip: float = 0.5, p_hflip: float = 0.0):
        self.p_vflip = p_vflip
        self.p_hflip = p_hflip
        self.generator = torch.Generator().manual_seed(seed)

    def draw_geometry(self, hw: tuple[int, int]) -> Affine:
        """The next random flip for an ``(H, W)`` image."""
        return random_flip(hw, self.generator, self.p_vflip, self.p_hflip)

    def __call__(
        self, image: Tensor, target: Mapping[str, Any]
    ) -> tuple[Tensor, Target]:
        """Flip one image and its target."""
        geo = self.draw_geometry((int(image.shape[-2]), int(image.shape[-1])))
        return geo.apply(image, target)
