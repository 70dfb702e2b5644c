"""The one training recipe of the detector: every trainer builds from it.

Like torchvision's ``references/detection`` (engine + presets), but a library
module: central training (``simulation.train``, ``simulation.run``), the
federated client (``client.detector_trainer``), few-shot head tuning
(``common.detector.adapt.fewshot``), the semi-supervised teacher
(``common.detector.adapt.teacher``) and the benchmarks take their parts from here, all
set by one typed :class:`Recipe`:

* data: :func:`train_transform` (box-aware augmentation preset, no left-right
  flip: ingest puts every breast on the left), :class:`Transformed`,
  :class:`Pooled` and :meth:`Recipe.loader` (lesion-balanced sampler of
  :mod:`common.detector.sampling` + ``common.imaging.data.collate``);
* optimisation: :meth:`Recipe.optimizer` (AdamW), :meth:`Recipe.scheduler`
  (constant, or linear warm-up then cosine to 0), :class:`ModelEMA`;
* the step: :func:`guarded_step` (finite loss, backward, clip, finite
  gradient norm, step) and the epoch loop :func:`train_one_epoch`.

Batches are ``(images, targets)`` as produced by ``common.imaging.data.collate``:
``images`` a list of FloatTensor[1, H_i, W_i] in ``[0, 1]`` (model space),
``targets`` a list of dicts with ``boxes`` FloatTensor[N, 4] model-space
``[xmin, ymin, xmax, ymax]`` and ``labels`` Int64Tensor[N].
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from common.config.loader import bounded
from common.detector.sampling import balanced_sampler, lesion_flags
from common.detector.transforms import (
    Compose,
    GrowSmallBoxes,
    IntensityJitter,
    LesionPaste,
    PatchCrop,
    RandomResize,
    VerticalFlip,
)
from common.imaging.data import collate
from common.progress import Eta

if TYPE_CHECKING:  # hardneg imports the engine, which imports this module
    from common.detector.hardneg import HardNegatives

log = logging.getLogger(__name__)

#: ``extra_loss_fn(model, images, targets) -> scalar Tensor`` added to the loss
#: (FedProx proximal term, consistency losses...).
ExtraLossFn = Callable[[nn.Module, list[Tensor], list[dict[str, Any]]], Tensor]
Batch = tuple[Sequence[Tensor], Sequence[dict[str, Any]]]


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentations (box-aware, from :mod:`common.detector.transforms`).

    ``vflip``: up-down flip (p=0.5); ``scale``: random resize by a factor in
    ``[scale_min, scale_max]``; ``intensity``: gamma/contrast/noise jitter. There is no
    left-right flip: images keep the breast on the left. ``paste``: with
    probability ``paste_p`` an image gets 1..``paste_max`` lesions cut from the
    training images themselves (:class:`common.detector.transforms.LesionPaste`,
    classes drawn equally often); needs the training set as ``source`` of
    :func:`train_transform`. ``patch``: train on ``patch`` x ``patch`` crops
    (:class:`common.detector.transforms.PatchCrop`; 0: whole images), a lesion
    inside with probability ``patch_lesion_p``, else a random breast patch.
    ``paste_same_woman``: an image only gets its own woman's lesions (the form
    DP-SGD allows; on by itself under ``trainer.options.dp``).
    ``min_box_mm``: training boxes narrower than this are widened to it
    (:class:`common.detector.transforms.GrowSmallBoxes`; 0: off).
    ``hard_negative_p``: share of the non-lesion patches centred on one of the
    image's false positives, mined every ``hard_negative_every`` epochs (at
    most ``hard_negative_per_image`` an image; :mod:`common.detector.hardneg`;
    0: off; needs ``patch``). Central training only (``mammofed-sim train``,
    ``crossval``): the federated sites train on whole images.
    """

    vflip: bool = True
    scale: bool = True
    scale_min: float = field(default=0.85, metadata=bounded(0.1, 10.0))
    scale_max: float = field(default=1.15, metadata=bounded(0.1, 10.0))
    intensity: bool = True
    paste: bool = False
    paste_p: float = field(default=0.5, metadata=bounded(0.0, 1.0))
    paste_max: int = field(default=2, metadata=bounded(1, 16))
    paste_same_woman: bool = False
    patch: int = field(default=0, metadata=bounded(0, 100_000))
    patch_lesion_p: float = field(default=0.5, metadata=bounded(0.0, 1.0))
    min_box_mm: float = field(default=0.0, metadata=bounded(0.0, 1000.0))
    hard_negative_p: float = field(default=0.0, metadata=bounded(0.0, 1.0))
    hard_negative_every: int = field(default=10, metadata=bounded(1, 100_000))
    hard_negative_per_image: int = field(default=4, metadata=bounded(1, 1000))

    def __post_init__(self) -> None:
        if self.scale_min > self.scale_max:
            raise ValueError(
                f"augment.scale_min ({self.scale_min}) must be <= "
                f"augment.scale_max ({self.scale_max})"
            )
        if 0 < self.patch < 32:
            raise ValueError(
                f"augment.patch: 0 or at least 32 pixels, got {self.patch}"
            )
        if self.hard_negative_p > 0 and self.patch == 0:
            raise ValueError(
                f"augment.hard_negative_p ({self.hard_negative_p}) needs "
                "augment.patch > 0: hard negatives are patches centred on the "
                "model's false positives, and a whole image holds every negative"
            )


#: The federated sites' augmentation (and the study's central regimes').
SITE_AUGMENT = AugmentConfig(scale_min=0.9, scale_max=1.1)


@dataclass(frozen=True)
class Recipe:
    """Every setting of one training run (validated once, where it is built).

    Attributes:
        lr, weight_decay: AdamW.
        batch_size: images per step.
        lesion_prob: probability that a drawn image has a lesion box.
        grad_clip: global gradient norm bound (0: none).
        schedule: ``constant`` learning rate, or ``warmup_cosine``: linear
            warm-up over ``warmup_steps`` optimizer steps, then a cosine to 0.
        ema_decay: keep a :class:`ModelEMA` (with warm-up ramp) of the weights.
        amp: bf16 autocast on CUDA (ignored on CPU).
        augment: the :func:`train_transform` preset.
    """

    lr: float = field(default=1e-3, metadata=bounded(0.0, 10.0))
    weight_decay: float = field(default=1e-4, metadata=bounded(0.0, 10.0))
    batch_size: int = field(default=4, metadata=bounded(1, 4096))
    lesion_prob: float = field(default=0.6, metadata=bounded(0.0, 1.0))
    grad_clip: float = field(default=10.0, metadata=bounded(0.0, None))
    schedule: Literal["constant", "warmup_cosine"] = "constant"
    warmup_steps: int = field(default=0, metadata=bounded(0, None))
    ema_decay: float | None = field(default=None, metadata=bounded(0.0, 1.0))
    amp: bool = True
    augment: AugmentConfig = SITE_AUGMENT

    def transform(
        self,
        generator: torch.Generator | None,
        source: Dataset[Any] | None = None,
        hard: HardNegatives | None = None,
    ) -> Compose:
        """The training augmentation (see :func:`train_transform`)."""
        return train_transform(self.augment, generator, source, hard)

    def loader(
        self, dataset: Dataset[Any], num_samples: int, seed: int, num_workers: int = 0
    ) -> DataLoader[Any]:
        """Lesion-balanced loader: ``num_samples`` seeded draws with replacement.

        Lesion flags from :func:`common.detector.sampling.lesion_flags` (no pixels
        decoded when ``dataset`` offers ``target(i)``); batches as
        ``common.imaging.data.collate`` makes them.
        """
        flags = lesion_flags(dataset)
        n = max(1, num_samples)
        sampler = balanced_sampler(flags, self.lesion_prob, num_samples=n, seed=seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=num_workers,
            collate_fn=collate,
        )

    def optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """AdamW over ``params`` (pass only the trainable ones)."""
        return torch.optim.AdamW(
            list(params), lr=self.lr, weight_decay=self.weight_decay
        )

    def scheduler(
        self, optimizer: torch.optim.Optimizer, total_steps: int
    ) -> torch.optim.lr_scheduler.LRScheduler | None:
        """Per-step schedule over ``total_steps`` (``None`` when constant)."""
        if self.schedule == "constant":
            return None
        warm = self.warmup_steps

        def f(step: int) -> float:
            if warm > 0 and step < warm:
                return (step + 1) / warm
            t = (step - warm) / max(1, total_steps - warm)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, f)

    def ema(self, model: nn.Module) -> ModelEMA | None:
        """A warm-up :class:`ModelEMA` of ``model`` when ``ema_decay`` is set."""
        if self.ema_decay is None:
            return None
        return ModelEMA(model, self.ema_decay, warmup=True)

    @property
    def clip(self) -> float | None:
        """``grad_clip`` as :func:`guarded_step` takes it (``None``: no clipping)."""
        return self.grad_clip if self.grad_clip > 0 else None


def train_transform(
    aug: AugmentConfig,
    generator: torch.Generator | None,
    source: Dataset[Any] | None = None,
    hard: HardNegatives | None = None,
) -> Compose:
    """Box-aware training transform of ``aug`` (paste, patch, flip, resize, jitter).

    Randomness from ``generator`` (reproducible), else torch's global RNG.
    ``source``: the untransformed training images, where ``aug.paste`` cuts
    its lesions (without it, no pasting). ``hard``: the store a
    :class:`common.detector.hardneg.HardNegativeMiner` fills, where the patch
    crop finds the images' false positives (``aug.hard_negative_p``).
    """
    parts: list[Any] = []
    if aug.paste and source is not None:
        parts.append(
            LesionPaste(
                source,
                aug.paste_p,
                aug.paste_max,
                generator=generator,
                same_woman=aug.paste_same_woman,
            )
        )
    if aug.patch > 0:
        # after the paste (so a pasted lesion can be the patch's lesion) and
        # before the resize (the patch is `patch` pixels at the working spacing)
        parts.append(
            PatchCrop(
                aug.patch,
                aug.patch_lesion_p,
                generator=generator,
                hard=hard,
                hard_p=aug.hard_negative_p,
            )
        )
    if aug.vflip:
        parts.append(VerticalFlip(0.5, generator))
    if aug.scale:
        parts.append(RandomResize((aug.scale_min, aug.scale_max), generator))
    if aug.intensity:
        parts.append(IntensityJitter(generator=generator))
    if aug.min_box_mm > 0:
        parts.append(GrowSmallBoxes(aug.min_box_mm))
    return Compose(parts)


class Transformed(Dataset[tuple[Tensor, dict[str, Any]]]):
    """A dataset with a box-aware ``(image, target)`` transform on top.

    ``transform`` gets a shallow copy of the target; ``None`` passes items
    through. :meth:`target` (no pixels) is passed through from the base.
    """

    def __init__(self, base: Dataset[Any], transform: Any) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Any]]:
        image, target = self.base[i]
        if self.transform is None:
            return image, target  # type: ignore[no-any-return]
        return self.transform(image, dict(target))  # type: ignore[no-any-return]

    def target(self, i: int) -> Any:
        """Target without decoding pixels, when the base offers it."""
        return self.base.target(i)  # type: ignore[attr-defined]


class Pooled(Dataset[Any]):
    """Several views as one dataset, with ``target(i)`` that decodes no pixels."""

    def __init__(self, views: Sequence[Dataset[Any]]) -> None:
        self.cat: ConcatDataset[Any] = ConcatDataset(views)
        self.views = list(views)

    def __len__(self) -> int:
        return len(self.cat)

    def __getitem__(self, i: int) -> Any:
        return self.cat[i]

    def lesion_flags(self) -> list[bool]:
        """Per item: has a lesion box (``common.detector.sampling.lesion_flags``)."""
        return [f for v in self.views for f in lesion_flags(v)]

    def target(self, i: int) -> Any:
        """The target of item ``i`` without decoding pixels."""
        for v in self.views:
            if i < len(v):  # type: ignore[arg-type]
                return v.target(i)  # type: ignore[attr-defined]
            i -= len(v)  # type: ignore[arg-type]
        raise IndexError(i)


class ModelEMA:
    """Exponential moving average of a model (a teacher for semi-supervision).

    After :meth:`update`: for every floating-point parameter
    ``ema = d * ema + (1 - d) * student``; every buffer (BatchNorm running
    statistics, counters) is copied from the student. ``module`` is a frozen
    deep copy in eval mode.

    ``d`` is ``decay``, or with ``warmup`` ``min(decay, (1 + n) / (10 + n))``
    after ``n`` updates (the ramp of timm's and YOLO's EMAs): a model trained
    from a random start must not keep ``decay ** steps`` of that start (0.999
    over 575 steps keeps 56% of it). Teachers that start from trained weights
    use the plain ``decay``.
    """

    def __init__(
        self, model: nn.Module, decay: float = 0.999, *, warmup: bool = False
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ModelEMA decay must be in [0, 1], got {decay!r}")
        self.decay = float(decay)
        self.warmup = warmup
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the student's parameters in and copy its buffers."""
        d = self.current_decay()
        student_params = dict(model.named_parameters())
        for name, p in self.module.named_parameters():
            s = student_params[name].detach()
            if p.dtype.is_floating_point:
                p.mul_(d).add_(s.to(p.dtype), alpha=1.0 - d)
            else:
                p.copy_(s)
        student_bufs = dict(model.named_buffers())
        for name, b in self.module.named_buffers():
            b.copy_(student_bufs[name])
        self.updates += 1

    def current_decay(self) -> float:
        """The decay the next :meth:`update` applies."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    def state_dict(self) -> dict[str, Tensor]:
        """The EMA model's ``state_dict``."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore the EMA weights (strict)."""
        self.module.load_state_dict(state)


def _proper_boxes(t: Mapping[str, Any], key: str, what: str) -> tuple[Tensor, Tensor]:
    """``t[key]`` as FloatTensor[N, 4] and the mask of its non-degenerate rows.

    Degenerate rows (``xmax <= xmin`` or ``ymax <= ymin``) are logged,
    naming the image's key and ``what`` they are.
    """
    boxes = torch.as_tensor(t[key], dtype=torch.float32).reshape(-1, 4)
    ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if not bool(ok.all()):
        log.warning(
            "image %s: dropping degenerate %s %s",
            t.get("key", "?"),
            what,
            boxes[~ok].tolist(),
        )
    return boxes, ok


def targets_to_device(
    targets: Sequence[dict[str, Any]], device: torch.device | str
) -> list[dict[str, Tensor]]:
    """``boxes``/``labels`` (and ``ignore`` regions) on ``device``.

    Degenerate boxes are dropped with a log; so are degenerate ignore regions.
    """
    out = []
    for t in targets:
        boxes, ok = _proper_boxes(t, "boxes", "target boxes")
        labels = torch.as_tensor(t["labels"], dtype=torch.int64).reshape(-1)
        item = {"boxes": boxes[ok].to(device), "labels": labels[ok].to(device)}
        if t.get("ignore") is not None and len(t["ignore"]):
            ignore, ok = _proper_boxes(t, "ignore", "ignore regions")
            item["ignore"] = ignore[ok].to(device)
        out.append(item)
    return out


def guarded_step(
    loss: Tensor,
    optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor],
    grad_clip: float | None,
    label: str = "",
) -> bool:
    """Backward and step unless the loss or the gradient norm is not finite.

    Call ``optimizer.zero_grad(set_to_none=True)`` before the forward pass.
    ``loss`` is a float scalar. ``grad_clip`` clips the global gradient norm
    of ``params`` (``None``: no clipping, the norm is still checked). Returns
    ``True`` when the optimizer stepped; a skipped step leaves the weights
    unchanged, clears the gradients and logs ``label``.
    """
    if not bool(torch.isfinite(loss)):
        log.warning("%s non-finite loss %s; step skipped", label, float(loss.detach()))
        optimizer.zero_grad(set_to_none=True)
        return False
    loss.backward()
    if grad_clip is not None:
        gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        gnorm = torch.nn.utils.get_total_norm(
            [p.grad for p in params if p.grad is not None]
        )
    if not bool(torch.isfinite(gnorm)):
        log.warning("%s non-finite gradient norm; step skipped", label)
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    return True


@dataclass(frozen=True)
class TrainStats:
    """Result of one epoch.

    Attributes:
        mean_loss: mean total loss over the steps taken (NaN if none).
        steps: optimizer steps taken; skipped_steps: batches skipped because the
            loss or the gradient norm was not finite.
        images: images seen (skipped batches included); seconds: wall time.
    """

    mean_loss: float
    steps: int
    skipped_steps: int
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        """Throughput of the epoch."""
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def autocast(device: torch.device, amp: bool) -> Any:
    """bf16 autocast on CUDA when ``amp``; a disabled context otherwise."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device | str = "cpu",
    amp: bool = True,
    grad_clip: float | None = 10.0,
    ema: ModelEMA | None = None,
    extra_loss_fn: ExtraLossFn | None = None,
    scheduler: Any | None = None,
    train_mode: Callable[[nn.Module], None] | None = None,
    progress: bool = True,
    log_every: int = 10,
    epoch: int = 0,
) -> TrainStats:
    """Train ``model`` for one pass over ``loader`` with :func:`guarded_step`.

    A batch whose total loss (or gradient norm) is not finite is skipped: no
    optimizer step, no EMA update, weights unchanged; it is counted in
    ``skipped_steps``. ``grad_clip`` ``None`` or ``<= 0``: no clipping.
    ``amp`` enables bf16 autocast on CUDA only. ``scheduler.step()`` (if
    given) runs after each optimizer step. ``train_mode(model)`` (default
    ``model.train()``) sets the modes, e.g. frozen norm layers in eval.
    """
    dev = torch.device(device)
    (train_mode or nn.Module.train)(model)
    n_batches = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    clip = grad_clip if grad_clip is not None and grad_clip > 0 else None
    total, steps, skipped, images = 0.0, 0, 0, 0
    t0 = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    for i, (imgs, targets) in enumerate(loader):
        ims = [im.to(dev, non_blocking=True) for im in imgs]
        tg = targets_to_device(targets, dev)
        images += len(ims)
        optimizer.zero_grad(set_to_none=True)
        with autocast(dev, amp):
            losses = model(ims, tg)
            loss = sum(losses.values(), torch.zeros((), device=dev))
            if extra_loss_fn is not None:
                loss = loss + extra_loss_fn(model, ims, list(targets))
        loss = loss.float()
        if not guarded_step(loss, optimizer, params, clip, f"epoch {epoch} step {i}:"):
            skipped += 1
            continue
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update(model)
        total += float(loss.detach())
        steps += 1
        if progress and log_every > 0 and (i + 1) % log_every == 0:
            dt = time.perf_counter() - t0
            log.info(
                "epoch %d step %d/%s loss %.4f (mean %.4f) %.2f img/s",
                epoch,
                i + 1,
                n_batches if n_batches is not None else "?",
                float(loss.detach()),
                total / steps,
                images / dt if dt > 0 else float("nan"),
            )
    stats = TrainStats(
        mean_loss=total / steps if steps else float("nan"),
        steps=steps,
        skipped_steps=skipped,
        images=images,
        seconds=time.perf_counter() - t0,
    )
    if progress:
        log.info(
            "epoch %d done: loss %.4f, %d steps, %d skipped, %.2f img/s",
            epoch,
            stats.mean_loss,
            steps,
            skipped,
            stats.images_per_s,
        )
    return stats


def train_epochs(
    model: nn.Module,
    dataset: Dataset[Any],
    recipe: Recipe,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    steps: int,
    seed: int,
    device: torch.device,
    extra_loss_fn: ExtraLossFn | None = None,
    train_mode: Callable[[nn.Module], None] | None = None,
    label: str = "",
) -> list[TrainStats]:
    """``epochs`` epochs of ``steps`` lesion-balanced batches each.

    The sampler of epoch ``e`` is seeded with ``seed + e``; a federated round
    and a central epoch with the same data, seed and recipe are the same
    computation. Returns one :class:`TrainStats` per epoch.

    The learning rate is constant and no EMA is kept: a federated round is
    one call, so a schedule or an average would start again every round
    (:func:`common.detector.engine.fit` runs them for central training).

    Raises:
        ValueError: ``recipe`` asks for a schedule or an EMA (named).
    """
    if recipe.schedule != "constant" or recipe.ema_decay is not None:
        raise ValueError(
            f"train_epochs{f' ({label})' if label else ''}: recipe.schedule="
            f"{recipe.schedule!r}, recipe.ema_decay={recipe.ema_decay!r}: this "
            "path trains at a constant learning rate without an EMA (a federated "
            "round restarts each call); use engine.fit for a scheduled run"
        )
    out = []
    eta = Eta(max(1, epochs))
    for epoch in range(epochs):
        loader = recipe.loader(dataset, steps * recipe.batch_size, seed + epoch)
        stats = train_one_epoch(
            model,
            loader,
            optimizer,
            device=device,
            amp=recipe.amp,
            grad_clip=recipe.clip,
            extra_loss_fn=extra_loss_fn,
            train_mode=train_mode,
            progress=False,
            epoch=epoch,
        )
        if label:
            log.info(
                "[%s] epoch %d/%d: loss %.4f (%.1f img/s; %s)",
                label,
                epoch + 1,
                epochs,
                stats.mean_loss,
                stats.images_per_s,
                eta.step(),
            )
        out.append(stats)
    return out
