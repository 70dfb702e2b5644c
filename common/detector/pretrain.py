"""Self-supervised pretraining of the detector's backbone on a site's own images.

The issue's optional lever "self-supervised pretraining of the backbone on
every unlabeled mammogram a site has": no download is allowed and nobody
ships a mammography backbone for this one-channel body, so the body learns
from the site's images themselves before the supervised recipe starts.

The objective is masked image modelling in the form SimMIM (Xie et al., CVPR
2022) showed works for convolutional bodies too: random breast patches
(``patch`` px at the working spacing) have ``mask_ratio`` of their
``mask_block`` x ``mask_block`` blocks set to 0, the body encodes the masked
patch, and a 1x1 convolution on its deepest features (stride 32) followed by
a pixel shuffle predicts the pixels; the loss is the L1 error on the masked
pixels only. Labels are never read: the boxes of labeled images are ignored,
so labeled and unlabeled images of a site take part alike. Only the body
(``model.backbone.body``: the speck channel, conv1 and layer1..4) keeps what
it learned; the decoder is thrown away, and the FPN and heads start as built.

Each epoch logs the loss next to a baseline that needs no learning: every
masked pixel predicted as the mean of the patch's visible pixels. A body that
learned nothing scores about the baseline.

``out_dir/pretrain.pt`` keeps the pretrained body with the configuration and
the images it saw (count and a digest of their keys), so a resumed run loads
it instead of pretraining again (a file from other images or settings, or
an unreadable one, is redone with a warning naming it);
``out_dir/pretrain.jsonl`` has one line per epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from common.config.loader import bounded
from common.detector.recipe import guarded_step
from common.errors import one_line
from common.imaging.preprocess import breast_mask
from common.progress import Eta

log = logging.getLogger(__name__)

PRETRAIN_FILE = "pretrain.pt"
PRETRAIN_LOG = "pretrain.jsonl"
#: the body's deepest stride (``layer4``): one decoder cell predicts this many
#: pixels on a side.
BODY_STRIDE = 32


@dataclass(frozen=True)
class PretrainConfig:
    """Masked image modelling of the body before supervised training.

    ``epochs``: passes over the images (0: off, the default); each pass draws
    ``patches_per_image`` random ``patch`` x ``patch`` crops centred in the
    breast of every image; ``mask_block``: side of the masked squares (a
    multiple of 32 that divides ``patch``); ``mask_ratio``: share of blocks
    masked; AdamW at ``lr`` with ``weight_decay``, cosine to 0 after a
    one-epoch warm-up, gradient norm clipped at 5.
    """

    epochs: int = field(default=0, metadata=bounded(0, 10000))
    patch: int = field(default=128, metadata=bounded(BODY_STRIDE, 4096))
    mask_block: int = field(default=32, metadata=bounded(BODY_STRIDE, 4096))
    mask_ratio: float = field(default=0.6, metadata=bounded(0.05, 0.95))
    patches_per_image: int = field(default=8, metadata=bounded(1, 10000))
    batch_size: int = field(default=32, metadata=bounded(1, 4096))
    lr: float = field(default=2e-3, metadata=bounded(0.0, 10.0))
    weight_decay: float = field(default=0.05, metadata=bounded(0.0, 10.0))

    def __post_init__(self) -> None:
        if self.mask_block % BODY_STRIDE:
            raise ValueError(
                f"pretrain.mask_block: must be a multiple of {BODY_STRIDE} (the "
                f"body's stride), got {self.mask_block}"
            )
        if self.patch % self.mask_block:
            raise ValueError(
                f"pretrain.patch: must be a multiple of pretrain.mask_block "
                f"({self.mask_block}), got {self.patch}"
            )

    @property
    def enabled(self) -> bool:
        """Whether the body is pretrained at all."""
        return self.epochs > 0


class _PixelDecoder(nn.Module):
    """1x1 conv + pixel shuffle: deepest features -> one-channel pixels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, BODY_STRIDE * BODY_STRIDE, 1)
        self.shuffle = nn.PixelShuffle(BODY_STRIDE)

    def forward(self, x: Tensor) -> Tensor:
        return self.shuffle(self.proj(x))


def _deepest(body: nn.Module, x: Tensor) -> Tensor:
    out = body(x)
    if isinstance(out, dict):
        return list(out.values())[-1]
    if not isinstance(out, Tensor):
        raise TypeError(f"backbone body returned {type(out)}, not a Tensor or dict")
    return out


def body_of(model: nn.Module) -> nn.Module:
    """The convolutional body of a detector (``model.backbone.body``)."""
    backbone = getattr(model, "backbone", None)
    body = getattr(backbone, "body", None)
    if not isinstance(body, nn.Module):
        raise TypeError(f"{type(model).__name__} has no backbone.body to pretrain")
    return body


def _images_digest(keys: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]


class _Patches:
    """Every image once in memory, with the pixels its patch centres come from."""

    def __init__(self, images: Dataset[Any], patch: int) -> None:
        self.patch = patch
        self.images: list[Tensor] = []
        self.centres: list[np.ndarray] = []
        n = len(images)  # type: ignore[arg-type]
        for i in range(n):
            img = images[i][0]
            if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != 1:
                raise ValueError(
                    f"pretraining image {i}: expected FloatTensor[1, H, W], got "
                    f"{getattr(img, 'shape', type(img))}"
                )
            img = img.float()
            half = patch // 2
            padded = F.pad(img, (half, half, half, half))  # centres near an edge
            mask, factor = breast_mask(img[0].numpy())
            ys, xs = np.nonzero(mask)
            if len(ys) == 0:  # no breast found: any pixel
                ys, xs = np.mgrid[0 : img.shape[1], 0 : img.shape[2]].reshape(2, -1)
            else:
                ys = np.minimum((ys * factor).astype(np.int64), img.shape[1] - 1)
                xs = np.minimum((xs * factor).astype(np.int64), img.shape[2] - 1)
            self.images.append(padded)
            self.centres.append(np.stack([ys, xs], axis=1))

    def draw(self, order: Sequence[int], gen: torch.Generator) -> Tensor:
        """One patch of each image in ``order``: FloatTensor[B, 1, patch, patch]."""
        out = []
        p = self.patch
        for i in order:
            c = self.centres[i]
            j = int(torch.randint(len(c), (1,), generator=gen))
            y, x = int(c[j, 0]), int(c[j, 1])  # padded image: top-left = centre
            out.append(self.images[i][:, y : y + p, x : x + p])
        return torch.stack(out)


def _masks(n: int, cfg: PretrainConfig, gen: torch.Generator) -> Tensor:
    """FloatTensor[n, 1, patch, patch]: 1 where masked, ``mask_ratio`` of the blocks."""
    g = cfg.patch // cfg.mask_block
    k = max(1, round(cfg.mask_ratio * g * g))
    scores = torch.rand(n, g * g, generator=gen)
    idx = scores.argsort(dim=1)[:, :k]
    blocks = torch.zeros(n, g * g)
    blocks.scatter_(1, idx, 1.0)
    blocks = blocks.view(n, 1, g, g)
    return blocks.repeat_interleave(cfg.mask_block, 2).repeat_interleave(
        cfg.mask_block, 3
    )


def _baseline_l1(x: Tensor, m: Tensor) -> Tensor:
    """L1 on masked pixels when each is predicted as the patch's visible mean."""
    vis = 1.0 - m
    mean = (x * vis).sum(dim=(1, 2, 3), keepdim=True) / vis.sum(
        dim=(1, 2, 3), keepdim=True
    ).clamp_min(1.0)
    return ((x - mean).abs() * m).sum() / m.sum().clamp_min(1.0)


def pretrain_body(
    model: nn.Module,
    images: Dataset[Any],
    cfg: PretrainConfig,
    *,
    device: torch.device,
    seed: int,
    image_keys: Sequence[str] = (),
    out_dir: str | Path | None = None,
) -> list[dict[str, float]]:
    """Pretrain ``model``'s body in place on ``images`` (labels unused).

    Args:
        model: a detector with ``backbone.body`` (on ``device``).
        images: a dataset of ``(FloatTensor[1, H, W] in [0, 1], target)``;
            the targets are not read.
        cfg: the objective and its optimisation (``cfg.epochs > 0``).
        device: where to train.
        seed: patch and mask draws (their own :class:`torch.Generator`); the
            throw-away decoder's initial weights come from the global RNG, so
            a run seeded by :func:`common.detector.engine.seed_everything`
            repeats.
        image_keys: the images' keys, recorded (as a digest) in
            ``out_dir/pretrain.pt`` so a resumed run reuses the body only when
            the images are the same.
        out_dir: where ``pretrain.pt`` and ``pretrain.jsonl`` go (none: kept
            nowhere).

    Returns:
        One dict per epoch: ``loss`` (masked L1), ``baseline`` (the visible
        mean's masked L1 on the same patches), ``seconds``.

    Raises:
        ValueError: ``images`` is empty or ``cfg.epochs`` is 0.
    """
    if not cfg.enabled:
        raise ValueError("pretrain.epochs is 0: nothing to pretrain")
    n = len(images)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("no images to pretrain the backbone on")
    body = body_of(model)
    record = {
        "config": asdict(cfg),
        "seed": seed,
        "n_images": n,
        "images_digest": _images_digest(image_keys),
    }
    path = Path(out_dir) / PRETRAIN_FILE if out_dir is not None else None
    if path is not None and path.is_file():
        try:
            saved: Any = torch.load(path, map_location="cpu", weights_only=True)
        except (
            pickle.UnpicklingError,
            OSError,
            EOFError,
            RuntimeError,
            ValueError,
        ) as exc:
            log.warning("pretrain: %s is unreadable (%s); redone", path, one_line(exc))
            saved = None
        if isinstance(saved, dict) and saved.get("record") == record:
            body.load_state_dict(saved["body"])
            log.info("pretrain: body loaded from %s (same images and settings)", path)
            hist = saved.get("history", [])
            return list(hist) if isinstance(hist, list) else []
        elif saved is not None:
            log.warning(
                "pretrain: %s was made from other images or settings; redone", path
            )

    gen = torch.Generator().manual_seed(seed)
    patches = _Patches(images, cfg.patch)
    was_training = body.training
    body.train()
    with torch.no_grad():
        probe = _deepest(body, torch.zeros(1, 1, cfg.patch, cfg.patch, device=device))
    if probe.shape[-1] * BODY_STRIDE != cfg.patch:
        raise ValueError(
            f"pretrain: the body's deepest stride is {cfg.patch / probe.shape[-1]:g}, "
            f"expected {BODY_STRIDE}"
        )
    decoder = _PixelDecoder(probe.shape[1]).to(device)
    params = [p for p in body.parameters() if p.requires_grad]
    params += list(decoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = math.ceil(n * cfg.patches_per_image / cfg.batch_size)
    total = per_epoch * cfg.epochs
    warm = min(per_epoch, total // 2)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    eta = Eta(cfg.epochs)
    history: list[dict[str, float]] = []
    log_file = Path(out_dir) / PRETRAIN_LOG if out_dir is not None else None
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text("")
    log.info(
        "pretrain: masked image modelling of the body on %d images, %d epochs of "
        "%d steps (%d-px patches, %.0f%% of %d-px blocks masked)",
        n, cfg.epochs, per_epoch, cfg.patch, 100 * cfg.mask_ratio, cfg.mask_block,
    )  # fmt: skip
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        draws = torch.randperm(n, generator=gen).repeat(cfg.patches_per_image)
        order: list[int] = draws[torch.randperm(len(draws), generator=gen)].tolist()
        loss_sum = base_sum = 0.0
        steps = 0
        for b in range(0, len(order), cfg.batch_size):
            x = patches.draw(order[b : b + cfg.batch_size], gen).to(device)
            m = _masks(len(x), cfg, gen).to(device)
            opt.zero_grad(set_to_none=True)
            pred = decoder(_deepest(body, x * (1.0 - m)))
            loss = ((pred - x).abs() * m).sum() / m.sum().clamp_min(1.0)
            stepped = guarded_step(
                loss, opt, params, 5.0, f"pretrain epoch {epoch + 1}:"
            )
            sched.step()
            if not stepped:
                continue
            loss_sum += float(loss.detach())
            base_sum += float(_baseline_l1(x, m))
            steps += 1
        row = {
            "epoch": float(epoch + 1),
            "loss": loss_sum / max(1, steps),
            "baseline": base_sum / max(1, steps),
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        if log_file is not None:
            with log_file.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        log.info(
            "pretrain epoch %d/%d: masked L1 %.4f (visible-mean baseline %.4f), %s",
            epoch + 1, cfg.epochs, row["loss"], row["baseline"], eta.step(),
        )  # fmt: skip
    body.train(was_training)
    if path is not None:
        state = {k: v.detach().cpu() for k, v in body.state_dict().items()}
        tmp = path.with_suffix(".tmp")
        torch.save({"record": record, "body": state, "history": history}, tmp)
        tmp.replace(path)
    return history
