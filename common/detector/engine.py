"""Training and inference engine for the lesion detector (CPU and CUDA).

Batches are ``(images, targets)`` as produced by ``common.imaging.data.collate``:
``images`` a list of FloatTensor[1, H_i, W_i] in ``[0, 1]`` (model space),
``targets`` a list of dicts with ``boxes`` FloatTensor[N, 4] model-space
``[xmin, ymin, xmax, ymax]``, ``labels`` Int64Tensor[N], ``ignore``
FloatTensor[M, 4], ``key`` str and ``spacing_mm`` float. The training step,
epoch and EMA are the recipe's (:mod:`common.detector.recipe`); :func:`fit` adds
checkpoints and resume around them.

On CUDA the model runs channels_last and (``amp=True``) under bf16 autocast;
on CPU it runs in float32. Library code logs, never prints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from common.detector.checkpoint import load_checkpoint, save_checkpoint
from common.detector.froc import (
    ClassMetrics,
    FrocImage,
    FrocResult,
    froc_all,
    plot_froc,
)
from common.detector.model.config import ModelConfig
from common.detector.recipe import ExtraLossFn, ModelEMA, autocast, train_one_epoch
from common.fileio import json_safe
from common.imaging.data import collate
from common.keys import (
    CLASSES,
    CPM_CALCIFICATION,
    CPM_MASS,
    CPM_MEAN,
    FROC_FP_RATES,
    NUM_EXAMPLES,
)

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.pt"
EPOCH_LOG = "epochs.jsonl"

#: ``fit``'s per-epoch hook: ``(model or EMA module, epoch) -> metrics``, with
#: ``epoch`` the 0-based index of the epoch just trained (a resumed run goes on
#: counting where it stopped).
EpochHook = Callable[[nn.Module, int], dict[str, Any]]


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs.

    ``deterministic=True`` additionally asks torch for deterministic kernels
    (slower on CUDA; warns where none exists).
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def resolve_device(name: str = "auto", source: str = "settings") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; other names as given.

    Raises:
        ConfigError: not a torch device name, or CUDA asked for where there is
            none (``source`` names where the value came from: a flag, a file).
    """
    from common.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            source, "device", f"{name!r} is not a device (auto, cpu, cuda, cuda:N)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            source, "device", f"{name!r} requested but CUDA is not available"
        )
    return dev


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move ``model`` to ``device``; channels_last on CUDA."""
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)  # type: ignore[call-arg]
    return model


@torch.no_grad()
def predict_images(
    model: nn.Module,
    images: Sequence[Tensor],
    device: torch.device | str = "cpu",
    *,
    amp: bool = True,
) -> list[dict[str, np.ndarray]]:
    """Detections for a list of FloatTensor[1, H, W] images (model space).

    Returns per image ``boxes`` float32[K, 4] (model-space pixels of that
    image), ``scores`` float32[K], ``labels`` int64[K], sorted by score.
    """
    dev = torch.device(device)
    model.eval()
    with autocast(dev, amp):
        out = model([im.to(dev, non_blocking=True) for im in images])
    res = []
    for o in out:
        scores = o["scores"].float().cpu().numpy()
        order = np.argsort(-scores, kind="stable")
        res.append(
            {
                "boxes": o["boxes"].float().cpu().numpy()[order],
                "scores": scores[order],
                "labels": o["labels"].cpu().numpy().astype(np.int64)[order],
            }
        )
    return res


def _np(t: Any, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    if t is None:
        return np.zeros(shape, dtype=dtype)
    arr = t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)
    return arr.astype(dtype).reshape((-1, *shape[1:]))


@dataclass(frozen=True)
class EvalResult:
    """Metrics (flat floats, federation-ready) and per-class FROC results."""

    metrics: dict[str, float]
    per_class: dict[str, FrocResult]
    #: the scored images (ground truth + detections), for paired comparisons
    images: tuple[FrocImage, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form: flat metrics plus a summary per class."""
        return {
            "metrics": json_safe(self.metrics),
            "classes": {
                k: ClassMetrics.from_result(r).to_json()
                for k, r in self.per_class.items()
            },
        }


def flat_metrics(per_class: dict[str, FrocResult], n_images: int) -> dict[str, float]:
    """Flat metric dict with the same keys whatever the data (NaN if undefined).

    Keys: ``cpm-mass``, ``cpm-calcification``, ``cpm-mean`` (mean of the
    defined class CPMs), ``ap-<class>``, ``sens-<class>-at-<f>`` for each FROC
    rate, ``cpm-<class>-ci-lo``/``-hi`` and ``num-examples``.
    """
    cpm_key = {CLASSES[0]: CPM_MASS, CLASSES[1]: CPM_CALCIFICATION}
    m: dict[str, float] = {}
    defined = []
    for name in CLASSES:
        r = per_class[name]
        m[cpm_key[name]] = float(r.cpm)
        if not math.isnan(r.cpm):
            defined.append(r.cpm)
        m[f"ap-{name}"] = float(r.ap)
        for f in FROC_FP_RATES:
            m[f"sens-{name}-at-{f:g}"] = float(r.sens_at[f])
        lo, hi = r.cpm_ci if r.cpm_ci is not None else (math.nan, math.nan)
        m[f"cpm-{name}-ci-lo"] = float(lo)
        m[f"cpm-{name}-ci-hi"] = float(hi)
    m[CPM_MEAN] = float(np.mean(defined)) if defined else math.nan
    m[NUM_EXAMPLES] = float(n_images)
    return m


def detect_dataset(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device | str = "cpu",
    *,
    batch_size: int = 2,
    num_workers: int = 0,
    amp: bool = True,
) -> list[FrocImage]:
    """``model``'s detections on every item of ``dataset``, as :class:`FrocImage`.

    Each item's ``spacing_mm`` converts model-space pixels to mm; ``ignore``
    boxes are kept for the hit rule. Score them with :func:`score_images`
    (after fusing several models' images, say).
    """
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("evaluate: the dataset view is empty")
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
    )
    images: list[FrocImage] = []
    for imgs, targets in loader:
        dets = predict_images(model, imgs, device, amp=amp)
        for d, t in zip(dets, targets, strict=True):
            key = str(t.get("key", len(images)))
            if "spacing_mm" not in t:
                raise ValueError(f"evaluate: image {key}: target has no spacing_mm")
            images.append(
                FrocImage(
                    key=key,
                    spacing_mm=float(t["spacing_mm"]),
                    gt_boxes=_np(t.get("boxes"), (0, 4), np.float64),
                    gt_labels=_np(t.get("labels"), (0,), np.int64),
                    ignore_boxes=_np(t.get("ignore"), (0, 4), np.float64),
                    det_boxes=d["boxes"],
                    det_scores=d["scores"],
                    det_labels=d["labels"],
                    case=str(t.get("patient_id", "")),
                )
            )
    return images


def with_speck_clusters_images(
    images: Sequence[FrocImage],
    specks_of: Callable[[str], np.ndarray | None],
    where: str,
    **settings: Any,
) -> list[FrocImage]:
    """``images`` with their calcification findings replaced by speck clusters.

    For a model with ``ModelConfig.speck_clusters``
    (:func:`common.imaging.specks.with_speck_clusters`); ``specks_of(key)``
    gives an image's specks (``SiteCache.load_specks``), ``None`` when the
    cache has none. ``settings``: the finder's ``k``, ``radius_mm`` and
    ``ref_rank`` when not the module's (the benchmark's nested selection).

    Raises:
        MammofedError: an image without specks (its cache was ingested
            without ``specks: true``), naming ``where`` and the image.
    """
    from dataclasses import replace

    from common.errors import MammofedError
    from common.imaging.specks import with_speck_clusters

    out = []
    for im in images:
        specks = specks_of(im.key)
        if specks is None:
            raise MammofedError(
                f"{where}: image {im.key} has no specks, which a model with "
                "'model.speck_clusters: true' needs: ingest the site again with "
                "'specks: true' in its site config"
            )
        det = with_speck_clusters(
            {"boxes": im.det_boxes, "scores": im.det_scores, "labels": im.det_labels},
            specks,
            im.spacing_mm,
            **settings,
        )
        out.append(
            replace(
                im,
                det_boxes=det["boxes"],
                det_scores=det["scores"],
                det_labels=det["labels"],
            )
        )
    return out


def evaluate_detailed(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device | str = "cpu",
    *,
    batch_size: int = 2,
    num_workers: int = 0,
    n_boot: int = 1000,
    seed: int = 0,
    plot_dir: str | Path | None = None,
    title: str = "FROC",
    amp: bool = True,
) -> EvalResult:
    """FROC per class of ``model`` on ``dataset`` (distances in mm per image).

    :func:`detect_dataset` then :func:`score_images`. With ``plot_dir`` one
    ``froc-<class>.png`` per class is written there.
    """
    images = detect_dataset(
        model, dataset, device, batch_size=batch_size, num_workers=num_workers, amp=amp
    )
    return score_images(
        images, n_boot=n_boot, seed=seed, plot_dir=plot_dir, title=title
    )


def score_images(
    images: Sequence[FrocImage],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    plot_dir: str | Path | None = None,
    title: str = "FROC",
) -> EvalResult:
    """The :class:`EvalResult` of already scored images (a model's, or fused).

    With ``plot_dir`` one ``froc-<class>.png`` per class is written there.
    """
    per_class = froc_all(images, n_boot=n_boot, seed=seed)
    if plot_dir is not None:
        for name, r in per_class.items():
            plot_froc(
                [r], Path(plot_dir) / f"froc-{name}.png", title=f"{title}: {name}"
            )
    return EvalResult(flat_metrics(per_class, len(images)), per_class, tuple(images))


def evaluate(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> dict[str, float]:
    """Flat FROC metrics of ``model`` on ``dataset`` (see :func:`flat_metrics`)."""
    return evaluate_detailed(model, dataset, device, **kwargs).metrics


def fit(
    model: nn.Module,
    cfg: ModelConfig,
    optimizer: torch.optim.Optimizer,
    train_loader: Iterable[tuple[Sequence[Tensor], Sequence[dict[str, Any]]]],
    *,
    epochs: int,
    out_dir: str | Path,
    device: torch.device | str = "cpu",
    amp: bool = True,
    grad_clip: float | None = 10.0,
    ema: ModelEMA | None = None,
    scheduler: Any | None = None,
    extra_loss_fn: ExtraLossFn | None = None,
    eval_fn: EpochHook | None = None,
    mine_fn: EpochHook | None = None,
    resume: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train for ``epochs`` epochs with a checkpoint after each one.

    Writes ``out_dir/last.pt`` (model, optimizer, EMA, scheduler, epoch) and one
    JSON line per epoch to ``out_dir/epochs.jsonl``. With ``resume`` and an
    existing ``last.pt`` whose config matches ``cfg``, training continues after
    the recorded epoch. ``eval_fn(model_or_ema_module, epoch)`` (optional;
    ``epoch`` counts from 0 across resumes) adds metrics to the epoch record.
    ``mine_fn`` (same signature; a :class:`common.detector.hardneg.HardNegativeMiner`)
    runs after ``eval_fn``, its non-empty record kept as ``mining``; a resumed
    run also calls it once before its first epoch, with the last epoch done.
    Returns the epoch records of this call.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    ckpt_path = out / LAST_CHECKPOINT
    start = 0
    if resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path, cfg)
        model.load_state_dict(ck.state_dict)
        if ck.optimizer is not None:
            optimizer.load_state_dict(ck.optimizer)
        if ema is not None and ck.ema is not None:
            ema.load_state_dict(ck.ema)
            # the EMA's warm-up continues where it stopped
            ema.updates = int(ck.extra.get("ema_updates", ema.updates))
        if scheduler is not None and "scheduler" in ck.extra:
            scheduler.load_state_dict(ck.extra["scheduler"])
        start = ck.epoch + 1
        log.info("resuming from %s after epoch %d", ckpt_path, ck.epoch)
        if mine_fn is not None and start < epochs:
            mine_fn(ema.module if ema is not None else model, ck.epoch)
    records: list[dict[str, Any]] = []
    for epoch in range(start, epochs):
        stats = train_one_epoch(
            model,
            train_loader,
            optimizer,
            device=dev,
            amp=amp,
            grad_clip=grad_clip,
            ema=ema,
            extra_loss_fn=extra_loss_fn,
            scheduler=scheduler,
            progress=progress,
            epoch=epoch,
        )
        rec: dict[str, Any] = {"epoch": epoch, **asdict(stats)}
        rec["lr"] = float(optimizer.param_groups[0]["lr"])
        target = ema.module if ema is not None else model
        if eval_fn is not None:
            rec["eval"] = eval_fn(target, epoch)
        if mine_fn is not None and (mined := mine_fn(target, epoch)):
            rec["mining"] = mined
        extra: dict[str, Any] = (
            {"scheduler": scheduler.state_dict()} if scheduler is not None else {}
        )
        if ema is not None:
            extra["ema_updates"] = ema.updates
        save_checkpoint(
            ckpt_path,
            model,
            cfg,
            optimizer=optimizer,
            ema=ema.module if ema else None,
            epoch=epoch,
            extra=extra,
        )
        with open(out / EPOCH_LOG, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(json_safe(rec)) + "\n")
        records.append(rec)
    return records
