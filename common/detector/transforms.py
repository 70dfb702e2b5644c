"""Box-consistent transforms on ``(image FloatTensor[C, H, W], target dict)``.

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
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # hardneg imports the engine, which imports the recipe and us
    from common.detector.hardneg import HardNegatives

Target = dict[str, Any]
BOX_KEYS: tuple[str, ...] = ("boxes", "ignore")


def vflip_boxes(boxes: torch.Tensor, height: int) -> torch.Tensor:
    """``boxes [K, 4]`` (x0, y0, x1, y1) mirrored up-down in an image ``height`` tall.

    The same map takes a box into the mirrored image and back out of it.
    """
    return torch.stack(
        [boxes[:, 0], height - boxes[:, 3], boxes[:, 2], height - boxes[:, 1]], dim=1
    )


def _rand(gen: torch.Generator | None) -> float:
    return float(torch.rand((), generator=gen))


def _uniform(lo: float, hi: float, gen: torch.Generator | None) -> float:
    return lo + (hi - lo) * _rand(gen)


def _check(image: torch.Tensor) -> None:
    """Refuse anything but ``[C, H, W]``, C 1 or 2.

    The image itself comes first, then any channel that moves with it
    (``ModelConfig.contralateral``: the other breast).
    """
    if image.ndim != 3 or not 1 <= image.shape[0] <= 2:
        raise ValueError(
            f"image must be [1, H, W] (or [2, H, W] with the other breast), "
            f"got shape {tuple(image.shape)}"
        )


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
        return image.flip(-2), _map_boxes(target, lambda b: vflip_boxes(b, h))


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


class LesionPatch:
    """One lesion cut from a training image, as a local-contrast signal.

    ``signal`` FloatTensor[1, h, w]: the crop around the lesion minus a plane
    fitted to the crop's margin ring (the tissue behind the lesion), times a
    window that is 1 inside the box and falls to 0 across the margin, so the
    patch adds the lesion's contrast and no edge. ``box`` is the lesion's
    ``[xmin, ymin, xmax, ymax]`` inside the patch, ``label`` its class.
    """

    def __init__(self, signal: torch.Tensor, box: torch.Tensor, label: int) -> None:
        self.signal, self.box, self.label = signal, box, int(label)


def _plane_background(crop: torch.Tensor, ring: torch.Tensor) -> torch.Tensor:
    """Least-squares plane ``a + b x + c y`` over the ``ring`` pixels of ``crop``."""
    h, w = crop.shape[-2:]
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=torch.float32),
        torch.arange(w, dtype=torch.float32),
        indexing="ij",
    )
    a = torch.stack([torch.ones_like(xx), xx, yy], dim=-1)  # [h, w, 3]
    sel = ring.reshape(h, w)
    sol = torch.linalg.lstsq(a[sel], crop.reshape(h, w)[sel].unsqueeze(-1)).solution
    return (a @ sol).reshape(1, h, w)


def cut_lesion(
    image: torch.Tensor, box: torch.Tensor, label: int, margin: float = 0.5
) -> LesionPatch | None:
    """The :class:`LesionPatch` of ``box`` in ``image [1, H, W]``, or ``None``.

    ``None`` when the box is degenerate or its crop leaves the image. The
    margin on each side is ``margin`` times the box's longer side, at least 3
    pixels.
    """
    _check(image)
    h, w = image.shape[-2:]
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 - x0 >= 1 and y1 - y0 >= 1):
        return None
    m = max(3, round(margin * max(x1 - x0, y1 - y0)))
    cx0, cy0 = math.floor(x0) - m, math.floor(y0) - m
    cx1, cy1 = math.ceil(x1) + m, math.ceil(y1) + m
    if cx0 < 0 or cy0 < 0 or cx1 > w or cy1 > h:
        return None
    crop = image[:1, cy0:cy1, cx0:cx1].float()  # the image, not the other breast
    ph, pw = crop.shape[-2:]
    inner = torch.zeros(ph, pw, dtype=torch.bool)
    bx0, by0 = math.floor(x0) - cx0, math.floor(y0) - cy0
    bx1, by1 = math.ceil(x1) - cx0, math.ceil(y1) - cy0
    inner[by0:by1, bx0:bx1] = True
    if int((~inner).sum()) < 3:
        return None
    signal = crop - _plane_background(crop, ~inner)
    # window: 1 inside the box, linear fall-off to 0 at the crop's edge
    ys = torch.arange(ph, dtype=torch.float32)
    xs = torch.arange(pw, dtype=torch.float32)
    dy = torch.clamp(torch.maximum(by0 - ys, ys - (by1 - 1)), min=0) / m
    dx = torch.clamp(torch.maximum(bx0 - xs, xs - (bx1 - 1)), min=0) / m
    win = (1 - dy.clamp(max=1)).unsqueeze(1) * (1 - dx.clamp(max=1)).unsqueeze(0)
    rel = torch.tensor([x0 - cx0, y0 - cy0, x1 - cx0, y1 - cy0], dtype=torch.float32)
    return LesionPatch(signal * win, rel, label)


class LesionPaste:
    """Copy-paste of training lesions onto training images (data efficiency).

    With probability ``p`` an image gets 1..``max_pastes`` lesions, drawn
    class first (each class equally likely, so the rare class is not
    starved) from a bank cut once from ``source`` (the training images
    themselves, untransformed: lesions of the training women only). A lesion
    is pasted (added as local contrast, flipped at random) where its box
    lies inside the breast (at least ``breast_fraction`` of the box's pixels
    above ``breast_level``) and overlaps no existing box or ignore region;
    its box and label are appended to the target. Images whose target has no
    ``labels`` key (no supervision) pass through unchanged.

    ``same_woman``: an image only gets lesions cut from its own woman's
    images (the target's and the source's ``patient_id``; any class), and an
    image of a woman without a lesion, or whose target names no woman, passes
    through. This is the form DP-SGD allows: with one woman per microbatch,
    her gradient then depends on her images only (docs/privacy.md).

    Args:
        source: a dataset of ``(image [1, H, W], target)`` with ``boxes`` and
            ``labels``; ``target(i)`` (no pixels) is used when it has one.
        p, max_pastes: how often and how many.
        margin: crop margin around a lesion (fraction of its longer side).
        tries: placement attempts per lesion.
        max_bank: at most this many lesions are kept (first ones).
    """

    def __init__(
        self,
        source: Any,
        p: float = 0.5,
        max_pastes: int = 2,
        *,
        margin: float = 0.5,
        tries: int = 10,
        breast_level: float = 0.05,
        breast_fraction: float = 0.95,
        max_bank: int = 512,
        generator: torch.Generator | None = None,
        same_woman: bool = False,
    ) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"paste p must be in [0, 1], got {p}")
        if max_pastes < 1:
            raise ValueError(f"max_pastes must be >= 1, got {max_pastes}")
        self.source, self.p, self.max_pastes = source, p, max_pastes
        self.margin, self.tries, self.max_bank = margin, tries, max_bank
        self.breast_level, self.breast_fraction = breast_level, breast_fraction
        self.gen = generator
        self.same_woman = same_woman
        self._bank: dict[int, list[LesionPatch]] | None = None
        #: ``{patient_id: [LesionPatch]}`` of the same bank (``same_woman``)
        self._by_woman: dict[str, list[LesionPatch]] = {}

    def bank(self) -> dict[int, list[LesionPatch]]:
        """``{label: [LesionPatch]}`` cut from ``source`` (built on first use)."""
        if self._bank is None:
            bank: dict[int, list[LesionPatch]] = {}
            n = 0
            for i in range(len(self.source)):
                t = (
                    self.source.target(i)
                    if hasattr(self.source, "target")
                    else self.source[i][1]
                )
                if len(t.get("boxes", ())) == 0:
                    continue
                image, t = self.source[i]
                woman = t.get("patient_id")
                for b, lab in zip(t["boxes"], t["labels"], strict=True):
                    patch = cut_lesion(image, b, int(lab), self.margin)
                    if patch is not None and n < self.max_bank:
                        bank.setdefault(patch.label, []).append(patch)
                        if woman is not None:
                            self._by_woman.setdefault(str(woman), []).append(patch)
                        n += 1
            self._bank = bank
        return self._bank

    def _pick(self, own: list[LesionPatch] | None = None) -> LesionPatch:
        if own is not None:
            patch = own[int(torch.randint(len(own), (), generator=self.gen))]
        else:
            bank = self.bank()
            labels = sorted(bank)
            lab = labels[int(torch.randint(len(labels), (), generator=self.gen))]
            items = bank[lab]
            patch = items[int(torch.randint(len(items), (), generator=self.gen))]
        sig, box = patch.signal, patch.box.clone()
        ph, pw = sig.shape[-2:]
        if _rand(self.gen) < 0.5:
            sig = sig.flip(-1)
            box = torch.stack([pw - box[2], box[1], pw - box[0], box[3]])
        if _rand(self.gen) < 0.5:
            sig = sig.flip(-2)
            box = torch.stack([box[0], ph - box[3], box[2], ph - box[1]])
        return LesionPatch(sig, box, patch.label)

    def _free(self, box: torch.Tensor, target: Target) -> bool:
        for k in BOX_KEYS:
            b = target.get(k)
            if isinstance(b, torch.Tensor) and b.numel():
                b = b.reshape(-1, 4)
                sep = (
                    (b[:, 0] >= box[2])
                    | (b[:, 2] <= box[0])
                    | (b[:, 1] >= box[3])
                    | (b[:, 3] <= box[1])
                )
                if not bool(sep.all()):
                    return False
        return True

    def __call__(
        self, image: torch.Tensor, target: Target
    ) -> tuple[torch.Tensor, Target]:
        """Paste lesions into ``image [1, H, W]``; their boxes join the target."""
        _check(image)
        if "labels" not in target or _rand(self.gen) >= self.p or not self.bank():
            return image, target
        own: list[LesionPatch] | None = None
        if self.same_woman:
            own = self._by_woman.get(str(target.get("patient_id")))
            if not own:
                return image, target
        h, w = image.shape[-2:]
        out, t = image.clone(), dict(target)
        boxes = torch.as_tensor(t.get("boxes", torch.zeros(0, 4))).reshape(-1, 4)
        labels = torch.as_tensor(t["labels"], dtype=torch.int64).reshape(-1)
        k = 1 + int(torch.randint(self.max_pastes, (), generator=self.gen))
        for _ in range(k):
            patch = self._pick(own)
            ph, pw = patch.signal.shape[-2:]
            if ph >= h or pw >= w:
                continue
            for _try in range(self.tries):
                oy = int(torch.randint(h - ph + 1, (), generator=self.gen))
                ox = int(torch.randint(w - pw + 1, (), generator=self.gen))
                nb = patch.box + torch.tensor([ox, oy, ox, oy], dtype=torch.float32)
                bx0, by0 = int(nb[0]), int(nb[1])
                bx1, by1 = math.ceil(float(nb[2])), math.ceil(float(nb[3]))
                region = out[0, by0:by1, bx0:bx1]
                if region.numel() == 0:
                    continue
                inside = float((region > self.breast_level).float().mean())
                if inside < self.breast_fraction:
                    continue
                if not self._free(nb, {"boxes": boxes, "ignore": t.get("ignore")}):
                    continue
                # into the image only: a second channel (the other breast)
                # shows no lesion there
                dst = out[:1, oy : oy + ph, ox : ox + pw]
                out[:1, oy : oy + ph, ox : ox + pw] = (dst + patch.signal).clamp(0, 1)
                boxes = torch.cat([boxes, nb.reshape(1, 4).to(boxes.dtype)])
                labels = torch.cat([labels, torch.tensor([patch.label])])
                break
        t["boxes"], t["labels"] = boxes, labels
        return out, t


class PatchCrop:
    """Train on ``size`` x ``size`` patches of a large image (native resolution).

    With probability ``lesion_p`` (and when the target has boxes) the patch
    contains a lesion drawn at random, placed anywhere inside it; otherwise
    the patch is drawn uniformly among positions whose centre pixel lies in
    the breast (above ``breast_level``; any position when none does). With a
    ``hard`` store (:class:`common.detector.hardneg.HardNegatives`), a
    non-lesion patch is instead centred on one of the image's mined false
    positives with probability ``hard_p`` (when it has any; shifted by up to
    a quarter of the patch, so the negative is not always at the centre).
    Images no larger than ``size`` pass through. A box keeps its visible part when
    at least ``min_visible`` of its area is inside the patch; otherwise it is
    dropped. The detector is fully convolutional, so it is trained on patches
    and run on the whole image.
    """

    def __init__(
        self,
        size: int,
        lesion_p: float = 0.5,
        *,
        min_visible: float = 0.5,
        breast_level: float = 0.05,
        tries: int = 20,
        generator: torch.Generator | None = None,
        hard: HardNegatives | None = None,
        hard_p: float = 0.0,
    ) -> None:
        if size < 32:
            raise ValueError(f"patch size must be >= 32 pixels, got {size}")
        if not 0.0 <= lesion_p <= 1.0:
            raise ValueError(f"patch lesion_p must be in [0, 1], got {lesion_p}")
        if not 0.0 <= hard_p <= 1.0:
            raise ValueError(f"patch hard_p must be in [0, 1], got {hard_p}")
        if tries < 1:
            raise ValueError(f"patch tries must be >= 1, got {tries}")
        self.size, self.lesion_p, self.min_visible = size, lesion_p, min_visible
        self.breast_level, self.tries, self.gen = breast_level, tries, generator
        self.hard, self.hard_p = hard, hard_p

    def _hard_origin(self, target: Target, h: int, w: int) -> tuple[int, int] | None:
        """An origin centred near a mined false positive, or ``None``."""
        if self.hard is None or self.hard_p <= 0:
            return None
        centres = self.hard.get(target.get("key"))
        if centres is None or not len(centres) or _rand(self.gen) >= self.hard_p:
            return None
        sh, sw = min(self.size, h), min(self.size, w)
        cx, cy = centres[int(torch.randint(len(centres), (), generator=self.gen))]
        jx = int(torch.randint(-(sw // 4), sw // 4 + 1, (), generator=self.gen))
        jy = int(torch.randint(-(sh // 4), sh // 4 + 1, (), generator=self.gen))
        ox = min(max(int(round(float(cx))) - sw // 2 + jx, 0), w - sw)
        oy = min(max(int(round(float(cy))) - sh // 2 + jy, 0), h - sh)
        return ox, oy

    def _origin(self, image: torch.Tensor, target: Target) -> tuple[int, int]:
        h, w = image.shape[-2:]
        sh, sw = min(self.size, h), min(self.size, w)
        boxes = target.get("boxes")
        if (
            isinstance(boxes, torch.Tensor)
            and boxes.numel()
            and _rand(self.gen) < self.lesion_p
        ):
            b = boxes.reshape(-1, 4)[
                int(torch.randint(len(boxes), (), generator=self.gen))
            ]
            # any origin that keeps the box (or as much as fits) inside
            lo_x = max(0, min(int(math.ceil(float(b[2]))) - sw, w - sw))
            hi_x = min(w - sw, max(int(float(b[0])), 0))
            lo_y = max(0, min(int(math.ceil(float(b[3]))) - sh, h - sh))
            hi_y = min(h - sh, max(int(float(b[1])), 0))
            ox = lo_x + int(
                torch.randint(max(1, hi_x - lo_x + 1), (), generator=self.gen)
            )
            oy = lo_y + int(
                torch.randint(max(1, hi_y - lo_y + 1), (), generator=self.gen)
            )
            return min(ox, w - sw), min(oy, h - sh)
        hard = self._hard_origin(target, h, w)
        if hard is not None:
            return hard
        for _ in range(self.tries):
            ox = int(torch.randint(w - sw + 1, (), generator=self.gen))
            oy = int(torch.randint(h - sh + 1, (), generator=self.gen))
            if float(image[0, oy + sh // 2, ox + sw // 2]) > self.breast_level:
                break
        return ox, oy

    def __call__(
        self, image: torch.Tensor, target: Target
    ) -> tuple[torch.Tensor, Target]:
        """Crop ``image [1, H, W]`` and its boxes to one patch."""
        _check(image)
        h, w = image.shape[-2:]
        if h <= self.size and w <= self.size:
            return image, target
        ox, oy = self._origin(image, target)
        sh, sw = min(self.size, h), min(self.size, w)
        out = image[:, oy : oy + sh, ox : ox + sw].clone()
        t = dict(target)
        shift = torch.tensor([ox, oy, ox, oy], dtype=torch.float32)
        lim = torch.tensor([sw, sh, sw, sh], dtype=torch.float32)
        for k in BOX_KEYS:
            b = target.get(k)
            if not isinstance(b, torch.Tensor) or not b.numel():
                continue
            b = b.reshape(-1, 4).float()
            moved = b - shift
            clipped = torch.minimum(moved.clamp(min=0), lim)
            area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
            vis = (clipped[:, 2] - clipped[:, 0]).clamp(min=0) * (
                clipped[:, 3] - clipped[:, 1]
            ).clamp(min=0)
            keep = vis >= self.min_visible * area.clamp(min=1e-6)
            t[k] = clipped[keep]
            if k == "boxes" and "labels" in target:
                t["labels"] = torch.as_tensor(target["labels"]).reshape(-1)[keep]
        return out, t


class GrowSmallBoxes:
    """Training targets: widen boxes narrower than ``min_mm`` to ``min_mm``.

    FCOS trains a box from the feature points inside it; a calcification
    cluster of 5 mm is 12 pixels at 0.4 mm, which holds one to four points of
    the stride-8 level against dozens for a mass, so the rare class would also
    get the fewest positives. Widening (about the same centre, clipped to the
    image) gives it as many as a small mass. The hit rule (centre distance)
    is unchanged, so detections stay scored the same way. Needs
    ``target["spacing_mm"]``; boxes stay as they are without it.
    """

    def __init__(self, min_mm: float) -> None:
        if min_mm <= 0:
            raise ValueError(f"min_mm must be > 0, got {min_mm}")
        self.min_mm = min_mm

    def __call__(
        self, image: torch.Tensor, target: Target
    ) -> tuple[torch.Tensor, Target]:
        """Widen the small ``boxes`` of ``target`` (model-space pixels)."""
        b = target.get("boxes")
        spacing = target.get("spacing_mm")
        if not isinstance(b, torch.Tensor) or not b.numel() or not spacing:
            return image, target
        h, w = image.shape[-2:]
        m = self.min_mm / float(spacing)
        b = b.reshape(-1, 4).float().clone()
        for lo, hi, size in ((0, 2, w), (1, 3, h)):
            c = (b[:, lo] + b[:, hi]) / 2
            half = torch.clamp((b[:, hi] - b[:, lo]) / 2, min=min(m, size) / 2)
            b[:, lo] = (c - half).clamp(min=0)
            b[:, hi] = (c + half).clamp(max=size)
        return image, {**target, "boxes": b}
