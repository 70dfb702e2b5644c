"""Mean teacher for semi-supervised detection on a site's unlabeled images.

The teacher is an EMA of the local student (:class:`common.detector.recipe.ModelEMA`:
``teacher = d * teacher + (1 - d) * student`` per optimizer step, buffers
copied), persisted in the site's state dir with :meth:`MeanTeacher.save`.

Three consistency modes (``AdaptConfig.consistency``):

* ``pseudo_boxes`` (Unbiased Teacher): the teacher, in eval mode, detects on a
  weakly augmented view (random flip); detections scoring at least the class
  threshold become pseudo boxes; the strong view is the weak view moved by a
  random affine (boxes moved by the same :class:`~common.detector.adapt.augment.Affine`)
  plus vendor-mimicking intensity changes; the student's own FCOS loss on the
  strong view with the pseudo targets (terms from ``unsup_losses``) is the
  unsupervised loss. An image without pseudo boxes still trains the
  classifier towards background (FCOS's focal loss handles the imbalance).
* ``dense`` (Dense Teacher): the strong view differs from the weak view only
  in intensity, so both map onto the same FCOS locations; the student's
  class logits learn the teacher's sigmoid scores at every location (quality
  focal loss), and its centre-ness the teacher's on the top
  ``dense_top_fraction`` of locations.
* ``paste`` (copy-paste self-training, Ghiasi et al. 2021): lesions cut
  from the site's labeled images (``lesions``) are pasted into the weak view
  of an unlabeled image; the teacher's findings there scoring at least the
  class threshold are pseudo boxes, those from ``paste_ignore_score`` up to
  it ignore regions; the strong view moves all of them; the student's whole
  FCOS loss trains on the pasted lesions (exact boxes) and the pseudo boxes,
  and the rest of the image, ignore regions apart, is background. It needs
  no confident teacher: a teacher that finds a third of the masses among
  many false positives (docs/adaptation.md) keeps those findings out of the
  background rather than teaching them as lesions.

Coordinates: model space (pixel edges, origin top-left); images
FloatTensor[1, H, W] in ``[0, 1]``. An unlabeled batch is used for its images
only: :func:`images_only` never touches the targets, and
:class:`UnlabeledImages` wraps a dataset so no label can even be produced.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from common.detector.adapt.augment import StrongAugment, WeakAugment
from common.detector.adapt.config import AdaptConfig
from common.detector.model import without_breast_mask
from common.detector.recipe import ModelEMA, guarded_step, targets_to_device
from common.detector.transforms import LesionPaste
from common.errors import shown
from common.fileio import atomic_write

log = logging.getLogger(__name__)

_FORMAT = "mammofed-mean-teacher/1"

Batch = tuple[Sequence[Tensor], Any]


class MeanTeacher(ModelEMA):
    """EMA teacher of a detector student (``module`` is in eval mode, frozen).

    Adds to :class:`common.detector.recipe.ModelEMA` pseudo-labelling, a shared-key
    sync for new global models and save/load to the site state dir.
    """

    @torch.no_grad()
    def detect(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        """Teacher detections (eval mode) on FloatTensor[1, H, W] images.

        Returns per image ``boxes`` FloatTensor[K, 4] (model space of that
        image), ``scores`` FloatTensor[K], ``labels`` Int64Tensor[K].
        """
        self.module.eval()
        with without_breast_mask(self.module):  # pseudo-labels: what it proposes
            return list(self.module(list(images)))

    @torch.no_grad()
    def sync_shared(self, student: nn.Module, shared_keys: Iterable[str]) -> int:
        """Copy the student's ``shared_keys`` tensors into the teacher.

        Called when a new global model was loaded into the student
        (``teacher_sync: copy_shared``); personal tensors keep their EMA.
        Returns how many tensors were copied; unknown keys raise ``KeyError``.
        """
        src = student.state_dict()
        dst = self.module.state_dict()
        n = 0
        for k in shared_keys:
            if k not in dst or k not in src:
                raise KeyError(f"sync_shared: key {k!r} not in both models")
            dst[k].copy_(src[k])
            n += 1
        return n

    def save(self, path: str | Path, *, step: int) -> Path:
        """Write teacher weights, update count and the ramp-up ``step``."""
        state = {
            "format": _FORMAT,
            "state_dict": self.state_dict(),
            "updates": self.updates,
            "decay": self.decay,
            "step": int(step),
        }
        atomic_write(path, lambda fh: torch.save(state, fh), fsync=False)
        return Path(path)

    @classmethod
    def load(
        cls, path: str | Path, student: nn.Module, decay: float
    ) -> tuple[MeanTeacher, int]:
        """Rebuild a teacher for ``student`` from ``path``; returns ``(teacher, step)``.

        ``decay`` comes from the current config (it may have changed).
        """
        p = Path(path)
        raw = torch.load(p, map_location="cpu", weights_only=True)
        if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
            raise ValueError(f"{p}: not a mean-teacher state ({_FORMAT})")
        teacher = cls(student, decay)
        teacher.load_state_dict(raw["state_dict"])
        teacher.updates = int(raw["updates"])
        return teacher, int(raw["step"])


def load_or_create_teacher(
    path: str | Path, student: nn.Module, cfg: AdaptConfig
) -> tuple[MeanTeacher, int]:
    """The site's teacher from ``path`` if it exists, else a copy of ``student``."""
    p = Path(path)
    if p.is_file():
        try:
            teacher, step = MeanTeacher.load(p, student, cfg.ema_decay)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            # another model's teacher (a later run with another arch), or a
            # damaged file: the teacher is an average of the student, rebuilt
            log.warning(
                "mean teacher at %s not used (%s): created from the student",
                p, shown(str(exc).splitlines()[0] if str(exc) else exc, 160),
            )  # fmt: skip
            return MeanTeacher(student, cfg.ema_decay), 0
        log.info("mean teacher loaded from %s (step %d)", p, step)
        return teacher, step
    log.info("mean teacher created from the student (no state at %s)", p)
    return MeanTeacher(student, cfg.ema_decay), 0


def rampup_weight(step: int, cfg: AdaptConfig) -> float:
    """Unsupervised weight at optimizer ``step``: ``w * exp(-5 (1 - t)^2)``."""
    if cfg.rampup_steps <= 0:
        return cfg.unsup_weight
    t = min(max(step, 0) / cfg.rampup_steps, 1.0)
    return cfg.unsup_weight * math.exp(-5.0 * (1.0 - t) ** 2)


def pseudo_labels(
    detections: Sequence[Mapping[str, Tensor]], thresholds: Sequence[float]
) -> list[dict[str, Tensor]]:
    """Keep detections whose score is ``>= thresholds[label]``.

    Returns per image ``boxes`` FloatTensor[K', 4] (same space as the input),
    ``labels`` Int64Tensor[K'] and ``scores`` FloatTensor[K'].
    """
    out = []
    for det in detections:
        labels = det["labels"].long()
        scores = det["scores"]
        thr = torch.as_tensor(thresholds, dtype=scores.dtype, device=scores.device)
        keep = scores >= thr[labels]
        out.append(
            {
                "boxes": det["boxes"][keep].detach().float().reshape(-1, 4),
                "labels": labels[keep].detach(),
                "scores": scores[keep].detach(),
            }
        )
    return out


def images_only(batch: Batch) -> list[Tensor]:
    """The images of an ``(images, targets)`` batch; the targets are not touched."""
    return list(batch[0])


class _NoLabels(Mapping[str, Any]):
    """A target that raises on any read: proof that nothing reads labels."""

    def __getitem__(self, key: str) -> Any:
        raise RuntimeError(f"unlabeled item: target[{key!r}] must not be read")

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("unlabeled item: target must not be read")

    def __len__(self) -> int:
        raise RuntimeError("unlabeled item: target must not be read")


class UnlabeledImages(Dataset[tuple[Tensor, Mapping[str, Any]]]):
    """Wrap a dataset so items are ``(image, target-that-raises-on-read)``.

    The underlying target is dropped before it leaves ``__getitem__``.
    """

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, Mapping[str, Any]]:
        return self.dataset[i][0], _NoLabels()


def head_outputs(model: nn.Module, images: Sequence[Tensor]) -> dict[str, Tensor]:
    """Raw FCOS head outputs for a list of FloatTensor[1, H, W] images.

    Returns ``cls_logits`` [B, L, C], ``bbox_regression`` [B, L, 4] and
    ``bbox_ctrness`` [B, L, 1] over all FPN locations ``L`` (same order for
    any two batches of the same image shapes).
    """
    imgs, _ = model.transform(list(images))  # type: ignore[operator]
    feats = list(model.backbone(imgs.tensors).values())  # type: ignore[operator]
    return dict(model.head(feats))  # type: ignore[operator]


def dense_consistency_loss(
    student_out: Mapping[str, Tensor],
    teacher_out: Mapping[str, Tensor],
    top_fraction: float,
) -> Tensor:
    """Dense Teacher loss between head outputs of the same locations.

    Classification: quality focal loss of student logits against teacher
    sigmoid scores on the top ``top_fraction`` locations (by the teacher's
    best class score, per image) and against 0 elsewhere, normalized by the
    sum of positive targets. Centre-ness: BCE against the teacher's
    centre-ness on the positives.
    """
    s_cls = student_out["cls_logits"].float()
    t_cls = torch.sigmoid(teacher_out["cls_logits"].float()).detach()
    b, n_loc, _ = s_cls.shape
    k = max(1, int(round(top_fraction * n_loc)))
    best = t_cls.max(dim=2).values  # [B, L]
    idx = best.topk(k, dim=1).indices
    pos = torch.zeros(b, n_loc, dtype=torch.bool, device=s_cls.device)
    pos.scatter_(1, idx, True)
    target = torch.where(pos[..., None], t_cls, torch.zeros_like(t_cls))
    p = torch.sigmoid(s_cls)
    bce = F.binary_cross_entropy_with_logits(s_cls, target, reduction="none")
    cls_loss = (bce * (p - target).abs().pow(2)).sum() / target[pos].sum().clamp(
        min=1.0
    )
    s_ctr = student_out["bbox_ctrness"].float()[pos]
    t_ctr = torch.sigmoid(teacher_out["bbox_ctrness"].float()).detach()[pos]
    ctr_loss = F.binary_cross_entropy_with_logits(s_ctr, t_ctr)
    return cls_loss + ctr_loss


@dataclass
class _Counter:
    sup: float = 0.0
    unsup: float = 0.0
    pseudo: float = 0.0
    steps: int = 0
    skipped: int = 0
    labeled: int = 0
    unlabeled: int = 0


@dataclass(frozen=True)
class RoundStats:
    """What one :func:`local_round` did (scalars; site-local, not sent as such).

    Attributes:
        steps, skipped_steps: optimizer steps taken / skipped (non-finite).
        step: the global step counter after the round (persist it).
        sup_loss, unsup_loss: mean supervised / unsupervised loss per step.
        unsup_weight: ramp-up weight at the last step.
        pseudo_per_image: mean pseudo boxes per unlabeled image.
        labeled_images, unlabeled_images: images seen.
        seconds: wall time.
    """

    steps: int
    skipped_steps: int
    step: int
    sup_loss: float
    unsup_loss: float
    unsup_weight: float
    pseudo_per_image: float
    labeled_images: int
    unlabeled_images: int
    seconds: float


def _cycle(loader: Iterable[Batch]) -> Iterator[Batch]:
    while True:
        empty = True
        for b in loader:
            empty = False
            yield b
        if empty:
            return


class ConsistencyLoss:
    """Unsupervised loss of a student on unlabeled images, given a teacher.

    ``loss(student, images) -> (scalar Tensor, pseudo boxes per image)``;
    ``images`` is a list of FloatTensor[1, H, W] in ``[0, 1]`` (CPU or on the
    student's device). Only images are ever seen.
    """

    def __init__(
        self,
        teacher: MeanTeacher,
        cfg: AdaptConfig,
        lesions: Dataset[Any] | None = None,
    ) -> None:
        self.teacher = teacher
        self.cfg = cfg
        self.weak = WeakAugment(seed=cfg.seed)
        self.strong = StrongAugment(
            seed=cfg.seed + 1, geometric=cfg.consistency != "dense"
        )
        self.thresholds = cfg.thresholds_by_label()
        self.paste: LesionPaste | None = None
        if cfg.consistency == "paste":
            if lesions is None:
                raise ValueError(
                    "consistency 'paste' needs the site's labeled images "
                    "(lesions=...) to cut lesions from"
                )
            self.paste = LesionPaste(
                lesions,
                p=1.0,
                max_pastes=cfg.paste_max,
                generator=torch.Generator().manual_seed(cfg.seed + 2),
            )

    def __call__(
        self, student: nn.Module, images: Sequence[Tensor]
    ) -> tuple[Tensor, float]:
        """Loss on one unlabeled batch (student in train mode)."""
        device = next(student.parameters()).device
        weak_imgs, strong_geo = [], []
        for im in images:
            hw = (int(im.shape[-2]), int(im.shape[-1]))
            weak_imgs.append(self.weak.draw_geometry(hw).apply_image(im.cpu()))
            strong_geo.append(self.strong.draw_geometry(hw))
        if self.cfg.consistency == "dense":
            strong_imgs = [self.strong.intensity(w) for w in weak_imgs]
            with torch.no_grad():
                t_out = head_outputs(
                    self.teacher.module, [w.to(device) for w in weak_imgs]
                )
            s_out = head_outputs(student, [s.to(device) for s in strong_imgs])
            loss = dense_consistency_loss(s_out, t_out, self.cfg.dense_top_fraction)
            return loss, 0.0
        dets = self.teacher.detect([w.to(device) for w in weak_imgs])
        dets = [{k: v.cpu() for k, v in d.items()} for d in dets]
        thr = torch.as_tensor(self.thresholds)
        low = self.thresholds
        if self.paste is not None:  # from the ignore score up: ignore regions
            low = tuple(min(self.cfg.paste_ignore_score, t) for t in low)
        strong_imgs, targets = [], []
        n_boxes = 0
        for w, geo, f in zip(
            weak_imgs, strong_geo, pseudo_labels(dets, low), strict=True
        ):
            sure = f["scores"] >= thr[f["labels"]]
            target: dict[str, Any] = {
                "boxes": f["boxes"][sure],
                "labels": f["labels"][sure],
            }
            if self.paste is not None:
                target["ignore"] = f["boxes"][~sure]
                w, target = self.paste(w, target)
            img, target = geo.apply(w, target)
            # pseudo boxes: those the strong view keeps; paste: those found
            n_boxes += (
                int(sure.sum()) if self.paste is not None else len(target["boxes"])
            )
            strong_imgs.append(self.strong.intensity(img).to(device))
            targets.append(target)
        losses = student(strong_imgs, targets_to_device(targets, device))
        # pseudo boxes are imprecise (unsup_losses); pasted lesions are exact
        terms = self.cfg.unsup_losses if self.paste is None else tuple(losses)
        loss = sum((losses[k] for k in terms), torch.zeros((), device=device))
        return loss, n_boxes / max(1, len(images))


def local_round(
    model: nn.Module,
    teacher: MeanTeacher,
    labeled_loader: Iterable[Batch] | None,
    unlabeled_loader: Iterable[Batch] | None,
    optimizer: torch.optim.Optimizer,
    cfg: AdaptConfig,
    device: torch.device | str = "cpu",
    step: int = 0,
    *,
    max_steps: int | None = None,
    grad_clip: float | None = 10.0,
    consistency: ConsistencyLoss | None = None,
    lesions: Dataset[Any] | None = None,
) -> RoundStats:
    """One local round of semi-supervised training of ``model`` (the student).

    Each step takes one labeled batch (FCOS loss with its ground truth) and
    ``cfg.unlabeled_ratio`` unlabeled batches (consistency loss, images only),
    minimizes ``sup + rampup_weight(step) * unsup``, then updates the teacher
    (EMA). One pass over ``labeled_loader`` makes a round; without labeled
    data, one pass over ``unlabeled_loader``. ``max_steps`` caps the round.
    ``lesions``: the site's labeled images, untransformed (``paste`` mode cuts
    its lesions from them).
    Non-finite losses or gradients skip the step (logged, counted).

    The gradient reaches every trainable parameter, so under personalization
    the consistency loss trains the site's personal tensors and its
    contribution to the shared ones alike. Returns :class:`RoundStats`; pass
    ``stats.step`` as ``step`` next round and persist it with the teacher.
    """
    dev = torch.device(device)
    t0 = time.perf_counter()
    model.train()
    use_ssl = cfg.ssl_enabled and cfg.unlabeled_ratio > 0 and unlabeled_loader
    cons = consistency or (ConsistencyLoss(teacher, cfg, lesions) if use_ssl else None)
    unl_iter = _cycle(unlabeled_loader) if use_ssl and unlabeled_loader else None
    if labeled_loader is not None:
        lab_iter: Iterator[Batch | None] = iter(labeled_loader)
    elif unl_iter is not None and hasattr(unlabeled_loader, "__len__"):
        n = math.ceil(len(unlabeled_loader) / cfg.unlabeled_ratio)  # type: ignore[arg-type]
        lab_iter = iter([None] * n)
    else:
        raise ValueError("local_round: no labeled loader and no sized unlabeled one")
    if max_steps is not None:
        lab_iter = itertools.islice(lab_iter, max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    c = _Counter()
    w = rampup_weight(step, cfg)
    for lab in lab_iter:
        optimizer.zero_grad(set_to_none=True)
        sup = torch.zeros((), device=dev)
        if lab is not None:
            ims = [im.to(dev) for im in lab[0]]
            losses = model(ims, targets_to_device(lab[1], dev))
            sup = sum(losses.values(), sup)
            c.labeled += len(ims)
        unsup = torch.zeros((), device=dev)
        w = rampup_weight(step, cfg)
        if unl_iter is not None and cons is not None:
            for _ in range(cfg.unlabeled_ratio):
                batch = next(unl_iter, None)
                if batch is None:
                    break
                imgs = images_only(batch)
                u, n_pseudo = cons(model, imgs)
                unsup = unsup + u / cfg.unlabeled_ratio
                c.pseudo += n_pseudo * len(imgs)
                c.unlabeled += len(imgs)
        loss = (sup + w * unsup).float()
        clip = grad_clip if grad_clip is not None and grad_clip > 0 else None
        if not guarded_step(loss, optimizer, params, clip, f"adapt step {step}:"):
            c.skipped += 1
            continue
        teacher.update(model)
        step += 1
        c.steps += 1
        c.sup += float(sup.detach())
        c.unsup += float(unsup.detach())
    stats = RoundStats(
        steps=c.steps,
        skipped_steps=c.skipped,
        step=step,
        sup_loss=c.sup / c.steps if c.steps else float("nan"),
        unsup_loss=c.unsup / c.steps if c.steps else float("nan"),
        unsup_weight=w,
        pseudo_per_image=c.pseudo / c.unlabeled if c.unlabeled else 0.0,
        labeled_images=c.labeled,
        unlabeled_images=c.unlabeled,
        seconds=time.perf_counter() - t0,
    )
    log.info(
        "adapt round: %d steps (%d skipped), sup %.4f, unsup %.4f x %.3f, "
        "%.2f pseudo boxes/image",
        stats.steps,
        stats.skipped_steps,
        stats.sup_loss,
        stats.unsup_loss,
        stats.unsup_weight,
        stats.pseudo_per_image,
    )
    return stats
