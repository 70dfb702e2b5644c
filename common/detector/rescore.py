"""Second stage: a patch classifier that re-scores the detector's candidates.

The classic two-stage CAD design (a sensitive candidate finder, then a
classifier that rejects its false positives; Kooi et al. 2017 used a CNN as
that second stage), on top of the one-stage FCOS:

1. **Mine** (:func:`mine_image`): run the detector on the TRAINING images
   (:func:`common.detector.engine.evaluate_detailed`, the evaluation's own
   path) and label each image's ``max_candidates_per_image`` top-scoring
   candidates with the hit rule of :mod:`common.detector.froc`: a candidate
   whose outcome is ``HIT`` is a positive, a ``FALSE_POSITIVE`` a (hard)
   negative; duplicates and candidates in ignore regions teach nothing and are
   left out. Each lesion box also gives ``jitter_per_lesion`` jittered copies
   (:func:`jitter_boxes`, still hits by the rule) as positives.
2. **Crop** (:func:`extract_context`): a square around each box, its side
   ``max(longer box side / fill, min_crop_mm)``, resampled so the crop is
   ``patch`` pixels (one channel, the model-space pixels in ``[0, 1]``).
3. **Classify**, with one of two feature sets (``features``):

   * ``detector`` (default): the detector's own backbone body, frozen, run
     on the patch (:class:`DetectorFeatures`: each output map averaged), and
     a small trained head (:class:`FeatureHead`): a second opinion on the
     candidate alone, learned from the detector's hard negatives. Cheap, and
     it needs the same detector at inference (its fingerprint is checked).
   * ``patch``: a small CNN of its own, trained from scratch
     (:class:`PatchNet`, four conv blocks on the patch standardized per
     patch): independent of the detector, but it learns from the few
     training lesions alone.

   The box's size in mm joins the features; one logit per class, and a
   candidate of class ``c`` reads logit ``c``, so ``P(lesion)`` is per class.
4. **Combine** (:func:`combine_scores`): the final score is
   ``detector_score ** (1 - weight) * p ** weight``; the default ``weight``
   0.5 is the geometric mean. It is fixed, not tuned: both scores keep a say,
   and a re-scorer that knows nothing (``p`` constant) leaves the ranking
   unchanged.

Boxes are model-space pixels ``[xmin, ymin, xmax, ymax]`` of the image they
come from, at ``spacing_mm`` mm per pixel (the detector's working spacing).

Training is deterministic in ``RescoreConfig.seed`` (its own generator, the
global RNG untouched) and bounded: ``epochs`` x ``samples_per_epoch`` patches,
drawn class- and label-balanced with replacement. Its file
(:func:`save_rescorer`, ``rescorer.pt`` beside the detector) is plain data,
read with ``torch.load(weights_only=True)`` like the detector's checkpoint
(:mod:`common.detector.checkpoint`), and refused with an error naming the file
when it is foreign, crafted, corrupt or holds non-finite weights.

Inference wraps, it does not branch: :class:`RescoredDetector` is a model
whose eval-mode output has the detector's contract, so
:func:`common.detector.engine.predict_images` and
:func:`~common.detector.engine.evaluate_detailed` score it unchanged;
:func:`rescore_detections` re-scores detections already computed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import pickle
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset
from torchvision.ops import roi_align

from common import __version__
from common.config import bounded, config_to_dict, from_mapping
from common.detector.engine import detect_dataset
from common.detector.froc import FALSE_POSITIVE, HIT, FrocImage, match_image_lesions
from common.detector.model import without_breast_mask
from common.errors import (
    CheckpointMismatch,
    ConfigError,
    MammofedError,
    UnsafeCheckpoint,
    one_line,
)
from common.fileio import atomic_write
from common.keys import CLASSES

__all__ = [
    "RESCORER_FILE",
    "PatchSet",
    "RescoreConfig",
    "RescoredDetector",
    "Rescorer",
    "collect_patches",
    "combine_scores",
    "fit_rescorer",
    "load_rescorer",
    "mine_image",
    "rescore_detections",
    "save_rescorer",
    "train_rescorer",
]

log = logging.getLogger(__name__)

FORMAT = "mammofed-rescorer/1"
#: The re-scorer's file, beside the detector's checkpoint.
RESCORER_FILE = "rescorer.pt"
#: Side of the stored context crop over the classified crop: room to jitter.
CONTEXT = 1.25
#: Lesion boxes are jittered by at most this share of their width/height in
#: each axis (a centre shift of at most 0.2 x the diagonal: still a hit).
JITTER_SHIFT = 0.2
#: ... and scaled by a factor in ``[1 / JITTER_SCALE, JITTER_SCALE]``.
JITTER_SCALE = 1.25


@dataclass(frozen=True)
class RescoreConfig:
    """The second stage (the ``rescore`` section of a training config).

    Attributes:
        enabled: train the re-scorer after the detector and score with it.
        patch: side in pixels of the classified patch.
        fill: share of the crop's side the box's longer side fills.
        min_crop_mm: smallest crop side in mm (small boxes keep context).
        max_candidates_per_image: top-scoring detector candidates mined per
            training image (every class together).
        jitter_per_lesion: jittered copies of each lesion box added as positives.
        epochs, samples_per_epoch: training length (balanced draws per epoch).
        batch_size, lr, weight_decay: AdamW, cosine decay to 0.
        features: ``detector`` (the detector's frozen backbone + a trained
            head) or ``patch`` (a CNN of its own; see the module docstring).
        width: channels of the first conv block of the ``patch`` CNN (then
            2x, 4x, 4x).
        weight: exponent of the re-scorer's probability in the final score
            (``det ** (1 - weight) * p ** weight``; 0.5: geometric mean).
        seed: seeds the network's initialisation, draws and augmentation.
        classes: the classes whose detections are re-scored; the others keep
            the detector's score (a second stage that helps one class and
            hurts another is applied to the first only).
    """

    enabled: bool = False
    features: Literal["detector", "patch"] = "detector"
    patch: int = field(default=64, metadata=bounded(16, 256))
    fill: float = field(default=0.5, metadata=bounded(0.1, 1.0))
    min_crop_mm: float = field(default=12.8, metadata=bounded(0.5, 500.0))
    max_candidates_per_image: int = field(default=20, metadata=bounded(1, 10000))
    jitter_per_lesion: int = field(default=4, metadata=bounded(0, 100))
    epochs: int = field(default=12, metadata=bounded(1, 10000))
    samples_per_epoch: int = field(default=1024, metadata=bounded(2, 10_000_000))
    batch_size: int = field(default=64, metadata=bounded(2, 4096))
    lr: float = field(default=2e-3, metadata=bounded(0.0, 10.0))
    weight_decay: float = field(default=1e-4, metadata=bounded(0.0, 10.0))
    width: int = field(default=16, metadata=bounded(4, 256))
    weight: float = field(default=0.5, metadata=bounded(0.0, 1.0))
    seed: int = 0
    classes: tuple[str, ...] = CLASSES

    def __post_init__(self) -> None:
        unknown = [c for c in self.classes if c not in CLASSES]
        if unknown or not self.classes:
            raise ValueError(
                f"classes: give one or more of {', '.join(CLASSES)}, "
                f"got {list(self.classes)!r}"
            )


# --- mining -----------------------------------------------------------------


def mine_image(image: FrocImage, max_candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """Label the top-scoring candidates of one image by the FROC hit rule.

    The ``max_candidates`` highest-scoring detections (every class together,
    ties in original order) are kept; each gets the outcome
    :func:`common.detector.froc.match_image_lesions` gives it among ALL the
    image's detections of its class, exactly as the evaluation does.

    Returns:
        ``(indices int64[M], targets float32[M])``: indices into the image's
        ``det_*`` arrays (in decreasing score) and 1.0 for a ``HIT``, 0.0 for a
        ``FALSE_POSITIVE``; duplicates and ignored detections are left out.
    """
    if max_candidates < 1:
        raise ValueError(f"max_candidates must be >= 1, got {max_candidates!r}")
    outcome = np.full(len(image.det_scores), -1, dtype=np.int64)
    for label in np.unique(image.det_labels):
        where = np.nonzero(image.det_labels == label)[0]
        _, outcomes, _ = match_image_lesions(image, int(label))
        outcome[where] = outcomes
    top = np.argsort(-image.det_scores, kind="stable")[:max_candidates]
    keep = top[np.isin(outcome[top], (HIT, FALSE_POSITIVE))]
    return keep.astype(np.int64), (outcome[keep] == HIT).astype(np.float32)


def jitter_boxes(boxes: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` jittered copies of each box (float[N, 4] -> float[N * n, 4]).

    The centre moves by at most ``JITTER_SHIFT`` of the box's width and height
    (at most 0.2 x its diagonal: within reach of the lesion by the hit rule),
    the size is scaled by a log-uniform factor in ``[1/JITTER_SCALE,
    JITTER_SCALE]`` per axis. Copies of box ``i`` are rows ``i * n .. i * n + n - 1``.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if n <= 0 or len(b) == 0:
        return np.zeros((0, 4))
    b = np.repeat(b, n, axis=0)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    cx = (b[:, 0] + b[:, 2]) / 2 + rng.uniform(-JITTER_SHIFT, JITTER_SHIFT, len(b)) * w
    cy = (b[:, 1] + b[:, 3]) / 2 + rng.uniform(-JITTER_SHIFT, JITTER_SHIFT, len(b)) * h
    lim = math.log(JITTER_SCALE)
    w = w * np.exp(rng.uniform(-lim, lim, len(b)))
    h = h * np.exp(rng.uniform(-lim, lim, len(b)))
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


# --- patches ----------------------------------------------------------------


def _context_px(patch: int) -> int:
    return int(round(patch * CONTEXT))


def log_size(boxes: Tensor, spacing_mm: float) -> Tensor:
    """``log(longer side in mm / 10)`` of each box (FloatTensor[K])."""
    side = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    return torch.log(side.float().clamp_min(1e-3) * spacing_mm / 10.0)


def extract_context(
    image: Tensor, boxes: Tensor, spacing_mm: float, cfg: RescoreConfig
) -> Tensor:
    """The context crop around each box: FloatTensor[K, 1, C, C].

    ``image`` is FloatTensor[1, H, W] (model space, ``[0, 1]``), ``boxes``
    FloatTensor[K, 4] in its pixels. The classified crop is a square centred
    on the box, side ``max(longer side / fill, min_crop_mm / spacing_mm)``;
    the stored crop is ``CONTEXT`` times wider and ``C = round(patch *
    CONTEXT)`` pixels (area-averaged by ``roi_align``; outside the image: 0).
    """
    if image.dim() != 3 or image.shape[0] != 1:
        raise ValueError(f"image must be [1, H, W], got {tuple(image.shape)}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [K, 4], got {tuple(boxes.shape)}")
    c = _context_px(cfg.patch)
    if len(boxes) == 0:
        return image.new_zeros((0, 1, c, c))
    b = boxes.to(image.device, torch.float32)
    side = torch.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) / cfg.fill
    side = side.clamp_min(cfg.min_crop_mm / spacing_mm) * CONTEXT
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    rois = torch.stack(
        [
            torch.zeros_like(cx),
            cx - side / 2,
            cy - side / 2,
            cx + side / 2,
            cy + side / 2,
        ],
        dim=1,
    )
    return roi_align(
        image[None].float(), rois, output_size=c, sampling_ratio=0, aligned=True
    )


def _view(ctx: Tensor, patch: int, scale: Tensor, shift: Tensor) -> Tensor:
    """Resample ``patch`` x ``patch`` views of context crops (affine, bilinear).

    ``scale`` FloatTensor[N] (1: the classified crop), ``shift`` [N, 2] in the
    context crop's normalized units.
    """
    n = len(ctx)
    a = scale / CONTEXT
    theta = torch.zeros(n, 2, 3, dtype=ctx.dtype, device=ctx.device)
    theta[:, 0, 0] = a
    theta[:, 1, 1] = a
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, [n, 1, patch, patch], align_corners=False)
    return F.grid_sample(ctx, grid, mode="bilinear", align_corners=False)


def centre_view(ctx: Tensor, patch: int) -> Tensor:
    """The classified crop of each context crop (FloatTensor[N, 1, P, P])."""
    n = len(ctx)
    one = torch.ones(n, dtype=ctx.dtype, device=ctx.device)
    return _view(ctx, patch, one, torch.zeros(n, 2, dtype=ctx.dtype, device=ctx.device))


def augment_view(ctx: Tensor, patch: int, gen: torch.Generator) -> Tensor:
    """Training views: scale 0.9..1.1, a shift inside the context, flips, gamma."""
    n = len(ctx)
    scale = 0.9 + 0.2 * torch.rand(n, generator=gen)
    room = (1.0 - scale / CONTEXT)[:, None]
    shift = (2 * torch.rand(n, 2, generator=gen) - 1) * room
    x = _view(ctx.float(), patch, scale, shift)
    flip_v = torch.rand(n, generator=gen) < 0.5
    flip_h = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip_v[:, None, None, None], x.flip(-2), x)
    x = torch.where(flip_h[:, None, None, None], x.flip(-1), x)
    gamma = torch.exp((2 * torch.rand(n, generator=gen) - 1) * math.log(1.25))
    return x.clamp(0.0, 1.0) ** gamma[:, None, None, None]


@dataclass(frozen=True)
class PatchSet:
    """Mined training samples (CPU tensors).

    Attributes:
        context: HalfTensor[N, 1, C, C] context crops (:func:`extract_context`).
        log_size: FloatTensor[N] (:func:`log_size`).
        labels: Int64Tensor[N] class of the candidate (or lesion).
        targets: FloatTensor[N] 1 lesion, 0 false positive.
        n_candidates_hit, n_candidates_fp, n_jittered: where they came from.
    """

    context: Tensor
    log_size: Tensor
    labels: Tensor
    targets: Tensor
    n_candidates_hit: int
    n_candidates_fp: int
    n_jittered: int

    def __len__(self) -> int:
        return len(self.targets)


def collect_patches(
    pixels: Iterable[Tensor], images: Sequence[FrocImage], cfg: RescoreConfig
) -> PatchSet:
    """Mine candidates and jittered lesions of ``images`` into a :class:`PatchSet`.

    ``pixels`` yields FloatTensor[1, H, W] of each of ``images`` in order (the
    pixels their boxes refer to); only one image is held at a time. Jitter is
    drawn from ``numpy.random.default_rng(cfg.seed)``.

    Raises:
        ValueError: ``pixels`` yields fewer or more images than ``images``.
    """
    rng = np.random.default_rng(cfg.seed)
    ctx: list[Tensor] = []
    sizes: list[Tensor] = []
    labels: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    n_hit = n_fp = n_jit = 0
    it = iter(pixels)
    for k, im in enumerate(images):
        px = next(it, None)
        if px is None:
            raise ValueError(f"collect_patches: no pixels for image {k} ({im.key!r})")
        idx, tgt = mine_image(im, cfg.max_candidates_per_image)
        jit = jitter_boxes(im.gt_boxes, cfg.jitter_per_lesion, rng)
        boxes = np.concatenate([im.det_boxes[idx], jit])
        if len(boxes) == 0:
            continue
        n_hit += int(tgt.sum())
        n_fp += int(len(tgt) - tgt.sum())
        n_jit += len(jit)
        bt = torch.as_tensor(boxes, dtype=torch.float32)
        ctx.append(extract_context(px, bt, im.spacing_mm, cfg).half().cpu())
        sizes.append(log_size(bt, im.spacing_mm))
        labels.append(
            np.concatenate(
                [im.det_labels[idx], np.repeat(im.gt_labels, cfg.jitter_per_lesion)]
            )
        )
        targets.append(np.concatenate([tgt, np.ones(len(jit), np.float32)]))
    if next(it, None) is not None:
        raise ValueError(f"collect_patches: more pixel images than {len(images)}")
    c = _context_px(cfg.patch)
    return PatchSet(
        context=torch.cat(ctx) if ctx else torch.zeros(0, 1, c, c).half(),
        log_size=torch.cat(sizes) if sizes else torch.zeros(0),
        labels=torch.as_tensor(
            np.concatenate(labels or [np.zeros(0)]), dtype=torch.long
        ),
        targets=torch.as_tensor(
            np.concatenate(targets or [np.zeros(0)]), dtype=torch.float32
        ),
        n_candidates_hit=n_hit,
        n_candidates_fp=n_fp,
        n_jittered=n_jit,
    )


# --- the classifier ---------------------------------------------------------


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class PatchNet(nn.Module):
    """The ``patch`` classifier: its own small CNN, trained from scratch.

    ``forward(patches FloatTensor[N, 1, P, P] in [0, 1], size FloatTensor[N])
    -> logits FloatTensor[N, num_classes]``. Each patch is standardized (zero
    mean, unit standard deviation, floor 0.01) inside the network; four conv
    blocks (``width``, 2x, 4x, 4x channels, 2x2 max-pool after the first
    three), global average pooling, then the size ``log(mm / 10)`` joins a
    two-layer head.
    """

    def __init__(self, width: int = 16, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        w = width
        self.num_classes = num_classes
        self.features = nn.Sequential(
            _block(1, w),
            nn.MaxPool2d(2),
            _block(w, 2 * w),
            nn.MaxPool2d(2),
            _block(2 * w, 4 * w),
            nn.MaxPool2d(2),
            _block(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = _mlp(4 * w + 1, 32, num_classes)

    def forward(self, patches: Tensor, size: Tensor) -> Tensor:
        """Logits FloatTensor[N, num_classes]."""
        x = patches.float()
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(0.01)
        f = self.features((x - mean) / std)
        return self.head(torch.cat([f, size.float()[:, None].to(f.dtype)], dim=1))


class DetectorFeatures:
    """Frozen features of a detector's backbone body on patches.

    ``features(patches FloatTensor[N, 1, P, P] in [0, 1]) -> FloatTensor[N,
    dim]``: the patches are normalized as the detector normalizes its input
    (``cfg.image_mean``, ``cfg.image_std``), run through
    ``detector.backbone.body`` in eval mode without gradients, and every
    output map is averaged over space. Not a module on purpose: the
    re-scorer never trains, saves, moves or switches the detector's weights.

    Raises:
        ValueError: the detector has no ``backbone.body`` or ``cfg`` (an FCOS
            built by :func:`common.detector.model.build_detector` has both).
    """

    def __init__(self, detector: nn.Module, patch: int) -> None:
        body = getattr(getattr(detector, "backbone", None), "body", None)
        cfg = getattr(detector, "cfg", None)
        if not isinstance(body, nn.Module) or cfg is None:
            raise ValueError(
                "re-scorer features 'detector' need a detector with backbone.body "
                f"and cfg (an FCOS), got {type(detector).__name__}; use "
                "features: patch"
            )
        self.body = body
        self.mean = float(cfg.image_mean)
        self.std = float(cfg.image_std)
        device = next(body.parameters()).device
        self.dim = int(self(torch.zeros(1, 1, patch, patch, device=device)).shape[1])

    def __call__(self, patches: Tensor) -> Tensor:
        """Pooled features FloatTensor[N, dim] (no gradient, body in eval mode)."""
        was = self.body.training
        self.body.eval()
        try:
            with torch.no_grad():
                dev = next(self.body.parameters()).device
                out = self.body((patches.to(dev).float() - self.mean) / self.std)
        finally:
            self.body.train(was)
        maps = list(out.values()) if isinstance(out, dict) else [out]
        return torch.cat([m.float().mean(dim=(2, 3)) for m in maps], dim=1)


class FeatureHead(nn.Module):
    """The ``detector`` classifier: a head on :class:`DetectorFeatures`.

    ``forward(features FloatTensor[N, in_dim], size FloatTensor[N]) ->
    logits FloatTensor[N, num_classes]``; two linear layers.
    """

    def __init__(self, in_dim: int, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.num_classes = num_classes
        self.head = _mlp(in_dim + 1, 64, num_classes)

    def forward(self, features: Tensor, size: Tensor) -> Tensor:
        """Logits FloatTensor[N, num_classes]."""
        f = features.float()
        return self.head(torch.cat([f, size.float()[:, None].to(f.dtype)], dim=1))


def _mlp(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(cin, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, cout)
    )


def _build(
    cfg: RescoreConfig, detector: nn.Module | None
) -> tuple[nn.Module, DetectorFeatures | None]:
    """The trainable classifier of ``cfg.features`` and its feature extractor."""
    if cfg.features == "patch":
        return PatchNet(cfg.width), None
    if detector is None:
        raise ValueError("re-scorer features 'detector' need the detector")
    extractor = DetectorFeatures(detector, cfg.patch)
    return FeatureHead(extractor.dim), extractor


class Rescorer(nn.Module):
    """A trained classifier with the settings that made its patches.

    Attributes:
        cfg: its :class:`RescoreConfig`; ``net`` the trained part
            (:class:`PatchNet` or :class:`FeatureHead`); ``extractor`` the
            detector's frozen features (``features: detector``) or ``None``.
        spacing_mm: mm per pixel of the model space it reads (the detector's
            working spacing); ``detector_sha256``: fingerprint of the detector
            whose candidates trained it (:func:`detector_fingerprint`);
        stats: what training reported (counts, loss, seconds).
    """

    def __init__(
        self,
        cfg: RescoreConfig,
        spacing_mm: float,
        net: nn.Module,
        extractor: DetectorFeatures | None = None,
        *,
        detector_sha256: str = "",
        stats: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        if not (math.isfinite(spacing_mm) and spacing_mm > 0):
            raise ValueError(f"spacing_mm must be > 0, got {spacing_mm!r}")
        if (cfg.features == "detector") != (extractor is not None):
            raise ValueError(
                f"features {cfg.features!r}: the detector's feature extractor "
                "must be given exactly for 'detector'"
            )
        self.cfg = cfg
        self.spacing_mm = float(spacing_mm)
        self.net = net
        self.extractor = extractor
        self.detector_sha256 = detector_sha256
        self.stats = dict(stats or {})

    def logits(self, patches: Tensor, size: Tensor) -> Tensor:
        """Logits FloatTensor[N, C] of patches (FloatTensor[N, 1, P, P])."""
        dev = next(self.net.parameters()).device
        x = patches.to(dev)
        inp = self.extractor(x).to(dev) if self.extractor is not None else x
        return self.net(inp, size.to(dev))

    def forward(self, image: Tensor, boxes: Tensor, labels: Tensor) -> Tensor:
        """``P(lesion of its class)`` of each box: FloatTensor[K] in ``[0, 1]``.

        ``image`` FloatTensor[1, H, W] (model space), ``boxes`` FloatTensor[K, 4]
        in its pixels, ``labels`` Int64Tensor[K] class indices.
        """
        n_cls = len(CLASSES)
        if len(labels) != len(boxes):
            raise ValueError(f"{len(labels)} labels for {len(boxes)} boxes")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= n_cls):
            raise ValueError(f"labels must be in [0, {n_cls}), got {labels.tolist()}")
        if len(boxes) == 0:
            return image.new_zeros(0, dtype=torch.float32)
        ctx = extract_context(image, boxes, self.spacing_mm, self.cfg)
        z = self.logits(
            centre_view(ctx, self.cfg.patch), log_size(boxes, self.spacing_mm)
        )
        p = torch.sigmoid(z.float())
        return p.gather(1, labels.to(p.device).long()[:, None]).squeeze(1)


def combine_scores(det_scores: Tensor, probs: Tensor, weight: float) -> Tensor:
    """``det_scores ** (1 - weight) * probs ** weight`` (0.5: geometric mean)."""
    return (
        det_scores.float().clamp_min(0) ** (1 - weight)
        * probs.float().clamp_min(0) ** weight
    )


def detector_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the detector's ``state_dict`` (names, dtypes, values)."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        a = t.detach().cpu()
        h.update(f"{key}:{a.dtype}:{tuple(a.shape)};".encode())
        h.update((a.float() if a.is_floating_point() else a).numpy().tobytes())
    return h.hexdigest()


# --- training ---------------------------------------------------------------


def _balanced_weights(labels: Tensor, targets: Tensor) -> Tensor:
    """Per-sample draw weights: every non-empty (class, target) group equal."""
    w = torch.zeros(len(labels), dtype=torch.float64)
    groups = [
        (labels == c) & (targets == t) for c in labels.unique() for t in (0.0, 1.0)
    ]
    groups = [g for g in groups if g.any()]
    for g in groups:
        w[g] = 1.0 / (len(groups) * int(g.sum()))
    return w


def train_rescorer(
    patches: PatchSet,
    cfg: RescoreConfig,
    spacing_mm: float,
    device: torch.device | str = "cpu",
    *,
    detector: nn.Module | None = None,
) -> Rescorer:
    """Train a :class:`Rescorer` on mined ``patches`` (bounded, deterministic).

    ``detector``: the detector whose candidates were mined (its fingerprint is
    recorded; ``features: detector`` reads its frozen backbone).

    ``cfg.epochs`` x ``cfg.samples_per_epoch`` draws with replacement, every
    (class, lesion / false positive) group equally likely; augmentation by
    :func:`augment_view`; AdamW with a cosine decay to 0; binary cross-entropy
    on the logit of each sample's class. One log line per epoch.

    Raises:
        MammofedError: no positive or no negative sample to learn from.
        ValueError: ``features: detector`` without a (suitable) detector.
    """
    n_pos = int(patches.targets.sum())
    n_neg = len(patches) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise MammofedError(
            f"re-scorer: nothing to learn from: {n_pos} lesion and {n_neg} false-"
            "positive samples mined (both must be > 0; are there lesions in the "
            "training images and detections outside them?)"
        )
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net, extractor = _build(cfg, detector)
    net.to(dev)
    rescorer = Rescorer(
        cfg,
        spacing_mm,
        net,
        extractor,
        detector_sha256=detector_fingerprint(detector) if detector is not None else "",
    )
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * max(1, cfg.samples_per_epoch // cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    weights = _balanced_weights(patches.labels, patches.targets)
    t0 = time.perf_counter()
    loss_mean = acc = math.nan
    net.train()
    for epoch in range(cfg.epochs):
        draw = torch.multinomial(
            weights, cfg.samples_per_epoch, replacement=True, generator=gen
        )
        losses, correct, seen = [], 0, 0
        for b in range(0, len(draw) - 1, cfg.batch_size):
            sel = draw[b : b + cfg.batch_size]
            if len(sel) < 2:  # BatchNorm needs two samples
                break
            x = augment_view(patches.context[sel], cfg.patch, gen)
            y = patches.targets[sel].to(dev)
            logits = rescorer.logits(x, patches.log_size[sel])
            z = logits.gather(1, patches.labels[sel].to(dev)[:, None]).squeeze(1)
            loss = F.binary_cross_entropy_with_logits(z, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            correct += int(((z > 0).float() == y).sum())
            seen += len(sel)
        loss_mean = float(np.mean(losses)) if losses else math.nan
        acc = correct / max(seen, 1)
        log.info(
            "re-scorer epoch %d/%d: loss %.4f, accuracy %.3f (%.1f s)",
            epoch + 1, cfg.epochs, loss_mean, acc, time.perf_counter() - t0,
        )  # fmt: skip
    stats = {
        "n_candidates_hit": float(patches.n_candidates_hit),
        "n_candidates_fp": float(patches.n_candidates_fp),
        "n_jittered": float(patches.n_jittered),
        "final_loss": loss_mean,
        "final_accuracy": acc,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    rescorer.stats = stats
    return rescorer.eval()


def fit_rescorer(
    detector: nn.Module,
    dataset: Dataset[Any],
    cfg: RescoreConfig,
    spacing_mm: float,
    device: torch.device | str = "cpu",
    *,
    path: str | Path | None = None,
    amp: bool = True,
    batch_size: int = 2,
) -> Rescorer:
    """Mine ``detector``'s candidates on the TRAINING ``dataset``, train, save.

    ``dataset`` yields ``(FloatTensor[1, H, W], target)`` with ground truth
    (``common.imaging.data`` items, untransformed). Candidates come from
    :func:`common.detector.engine.detect_dataset` (the evaluation's path).
    With ``path``, a re-scorer already there with the same ``cfg``, spacing and
    detector fingerprint is reused (a resumed run); else one is trained and
    written there.

    Raises:
        MammofedError: nothing to learn from (:func:`train_rescorer`).
        CheckpointMismatch: ``path`` holds a file that is no re-scorer.
    """
    if path is not None and Path(path).is_file():
        try:
            old = load_rescorer(path, detector)
        except UnsafeCheckpoint:
            raise
        except CheckpointMismatch as exc:
            log.info("re-scorer: not reusing %s: %s", path, one_line(exc))
        else:
            sha = detector_fingerprint(detector)
            if (old.cfg, old.spacing_mm, old.detector_sha256) == (
                cfg,
                spacing_mm,
                sha,
            ):
                log.info("re-scorer: reusing %s (same settings and detector)", path)
                return old
            log.info("re-scorer: %s was trained otherwise; training anew", path)
    t0 = time.perf_counter()
    with without_breast_mask(detector):  # candidates whatever the inference mask
        images = detect_dataset(
            detector, dataset, device, batch_size=batch_size, amp=amp
        )
    patches = collect_patches((dataset[i][0] for i in range(len(images))), images, cfg)
    log.info(
        "re-scorer: mined %d images in %.1f s: %d candidates that hit, %d false "
        "positives, %d jittered lesion boxes",
        len(images), time.perf_counter() - t0, patches.n_candidates_hit,
        patches.n_candidates_fp, patches.n_jittered,
    )  # fmt: skip
    rescorer = train_rescorer(patches, cfg, spacing_mm, device, detector=detector)
    if path is not None:
        save_rescorer(path, rescorer)
    return rescorer


# --- inference --------------------------------------------------------------


def _rescore(
    rescorer: Rescorer, image: Tensor, boxes: Tensor, scores: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Combined scores of one image's detections, re-sorted (high to low)."""
    p = rescorer(image, boxes, labels).to(scores.device)
    new = combine_scores(scores, p, rescorer.cfg.weight)
    chosen = [i for i, c in enumerate(CLASSES) if c in rescorer.cfg.classes]
    if len(chosen) < len(CLASSES):  # the other classes keep the detector's score
        mask = torch.isin(
            labels.to(scores.device), torch.tensor(chosen, device=scores.device)
        )
        new = torch.where(mask, new, scores.float())
    order = torch.argsort(-new, stable=True)
    return boxes[order], new[order], labels[order]


class RescoredDetector(nn.Module):
    """A detector whose eval-mode scores are re-scored by a :class:`Rescorer`.

    ``model(images)`` in eval mode returns the detector's contract (per image
    ``boxes`` FloatTensor[K, 4] model space, ``scores``, ``labels``), the
    scores combined by :func:`combine_scores` and sorted high to low; the
    boxes and labels are the detector's. Inference only: training mode raises.

    Raises:
        ValueError: a re-scorer on the features of another detector object.
    """

    def __init__(self, detector: nn.Module, rescorer: Rescorer) -> None:
        super().__init__()
        ex = rescorer.extractor
        body = getattr(getattr(detector, "backbone", None), "body", None)
        if ex is not None and ex.body is not body:
            raise ValueError(
                "RescoredDetector: the re-scorer reads another detector's "
                "features (load it with load_rescorer(path, detector))"
            )
        self.detector = detector
        self.rescorer = rescorer.to(next(detector.parameters()).device)

    def forward(self, images: list[Tensor], targets: Any = None) -> Any:
        """Detections of ``images`` (FloatTensor[1, H, W] each), re-scored."""
        if self.training or targets is not None:
            raise RuntimeError("RescoredDetector is inference-only (call .eval())")
        with torch.no_grad():
            out = self.detector(images)
            return [self._one(im, o) for im, o in zip(images, out, strict=True)]

    def _one(self, image: Tensor, o: dict[str, Tensor]) -> dict[str, Tensor]:
        b, s, lab = _rescore(self.rescorer, image, o["boxes"], o["scores"], o["labels"])
        return {"boxes": b, "scores": s, "labels": lab}


@torch.no_grad()
def rescore_detections(
    rescorer: Rescorer,
    images: Sequence[Tensor],
    detections: Sequence[dict[str, np.ndarray]],
) -> list[dict[str, np.ndarray]]:
    """Re-score detections already computed (``predict_images`` output).

    ``images`` FloatTensor[1, H, W] each (the model-space pixels the boxes
    refer to), ``detections`` per image ``boxes`` float[K, 4], ``scores``
    float[K], ``labels`` int[K]. Returns the same keys, scores combined by
    :func:`combine_scores`, sorted high to low.
    """
    if len(images) != len(detections):
        raise ValueError(f"{len(images)} images but {len(detections)} detection sets")
    rescorer.eval()
    out: list[dict[str, np.ndarray]] = []
    for im, d in zip(images, detections, strict=True):
        b, s, lab = _rescore(
            rescorer,
            im,
            torch.as_tensor(np.asarray(d["boxes"], np.float32).reshape(-1, 4)),
            torch.as_tensor(np.asarray(d["scores"], np.float32).reshape(-1)),
            torch.as_tensor(np.asarray(d["labels"], np.int64).reshape(-1)),
        )
        out.append(
            {
                "boxes": b.numpy().astype(np.float32),
                "scores": s.numpy().astype(np.float32),
                "labels": lab.numpy().astype(np.int64),
            }
        )
    return out


# --- the file ---------------------------------------------------------------


def save_rescorer(path: str | Path, rescorer: Rescorer) -> Path:
    """Write ``rescorer`` atomically as plain data (tensors, str, numbers)."""
    out = Path(path)
    payload = {
        "format": FORMAT,
        "version": __version__,
        "classes": list(CLASSES),
        "config": config_to_dict(rescorer.cfg),
        "spacing_mm": rescorer.spacing_mm,
        "detector_sha256": rescorer.detector_sha256,
        "stats": {k: float(v) for k, v in rescorer.stats.items()},
        "state_dict": {
            k: v.detach().cpu().clone() for k, v in rescorer.net.state_dict().items()
        },
    }
    atomic_write(out, lambda fh: torch.save(payload, fh), fsync=False)
    log.info("saved re-scorer %s", out)
    return out


def load_rescorer(path: str | Path, detector: nn.Module | None = None) -> Rescorer:
    """Read a :func:`save_rescorer` file (LOCAL, ``weights_only`` loading).

    ``detector``: the detector it re-scores; required for ``features:
    detector`` (it must be the very detector it was trained on: same
    fingerprint), optional for ``patch``. Returns the re-scorer in eval mode,
    its trained part on CPU.

    Raises:
        UnsafeCheckpoint: the file holds objects other than tensors and plain
            containers (nothing in it was run).
        CheckpointMismatch: missing, unreadable, not a re-scorer, other classes,
            a bad config value, weights that do not fit or are not finite,
            another detector; the message names the file and the field.
        ValueError: ``features: detector`` and no detector given.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointMismatch(f"{p}: re-scorer file does not exist")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpoint(
            f"{p}: refused: the file holds objects other than tensors and plain "
            f"containers (a crafted or foreign pickle): {one_line(exc)}"
        ) from exc
    except Exception as exc:  # corrupt or foreign file
        raise CheckpointMismatch(
            f"{p}: not a readable re-scorer file: {one_line(exc)}"
        ) from exc
    got = payload.get("format") if isinstance(payload, dict) else type(payload)
    if got != FORMAT:
        raise CheckpointMismatch(f"{p}: field 'format' is {got!r}, expected {FORMAT!r}")

    def need(name: str) -> Any:
        if name not in payload:
            raise CheckpointMismatch(f"{p}: field {name!r} missing")
        return payload[name]

    classes = need("classes")
    if not isinstance(classes, list) or classes != list(CLASSES):
        raise CheckpointMismatch(
            f"{p}: field 'classes' is {classes!r}, expected {list(CLASSES)!r}"
        )
    try:
        cfg = from_mapping(
            need("config"), RescoreConfig, source=str(p), prefix="config"
        )
    except ConfigError as exc:
        raise CheckpointMismatch(str(exc)) from exc
    spacing = need("spacing_mm")
    if not (
        isinstance(spacing, int | float)
        and not isinstance(spacing, bool)
        and math.isfinite(spacing)
        and spacing > 0
    ):
        raise CheckpointMismatch(f"{p}: field 'spacing_mm' is {spacing!r}, not > 0")
    state = need("state_dict")
    if not isinstance(state, dict) or not all(
        isinstance(v, Tensor) for v in state.values()
    ):
        raise CheckpointMismatch(f"{p}: field 'state_dict' is not a mapping of tensors")
    for key, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointMismatch(
                f"{p}: field 'state_dict' holds non-finite values in {key!r}"
            )
    sha = str(payload.get("detector_sha256", ""))
    given = detector_fingerprint(detector) if detector is not None else None
    if cfg.features == "detector":
        if detector is None:
            raise ValueError(f"{p}: a re-scorer on the detector's features needs it")
        if given != sha:
            raise CheckpointMismatch(
                f"{p}: field 'detector_sha256' is {sha[:12]!r}..., but the given "
                f"detector is {str(given)[:12]!r}...: trained on another "
                "detector's features"
            )
    elif given is not None and given != sha:
        log.warning("%s: trained on another detector's candidates", p)
    try:
        net, extractor = _build(cfg, detector)
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a shape that does not fit
        raise CheckpointMismatch(
            f"{p}: field 'state_dict' does not fit the re-scorer "
            f"({cfg.features!r} features): {one_line(exc)}"
        ) from exc
    if missing or unexpected:
        raise CheckpointMismatch(
            f"{p}: field 'state_dict' does not fit the re-scorer: missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    stats = payload.get("stats") or {}
    return Rescorer(
        cfg,
        float(spacing),
        net,
        extractor,
        detector_sha256=sha,
        stats=dict(stats) if isinstance(stats, dict) else {},
    ).eval()
