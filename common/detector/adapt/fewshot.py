"""Few-shot sites: head-only (TFA-style) fine-tuning with patient-grouped CV.

A site with few images, all labeled, fine-tunes on top of the federated shared
layers: the keys it is given (normally :func:`fewshot_frozen_keys`: the shared
backbone and FPN) are frozen - parameters get no gradient, normalization
layers whose tensors are all frozen stay in eval mode so their running
statistics do not move - and everything else (the detection head, personal
norm layers) trains with strong augmentation. The number of epochs is chosen
by early stopping inside a cross-validation whose folds group images by woman
(``patient_id``): each fold trains from the same start until its validation
loss has not improved for ``fewshot_patience`` epochs; the final model trains
on every image for the median best epoch count.

Head-only is chosen automatically when the site has fewer than
``AdaptConfig.fewshot_max_labeled`` labeled images; ``AdaptConfig.head_only``
(or the ``head_only`` argument) overrides. Images are FloatTensor[1, H, W]
in ``[0, 1]``, boxes model space; standardization, if any, belongs to the
view's own transform.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from common.detector.adapt.augment import StrongAugment
from common.detector.adapt.config import AdaptConfig
from common.detector.model import Personalization, head_keys, shared_and_personal
from common.detector.model.params import COUNTER_SUFFIX
from common.detector.recipe import (
    Recipe,
    Transformed,
    targets_to_device,
    train_one_epoch,
)
from common.imaging.data import collate, fold_splits, item_targets

log = logging.getLogger(__name__)

Transform = Callable[[Tensor, dict[str, Any]], tuple[Tensor, dict[str, Any]]]


def few_labels(
    n_labeled: int, n_unlabeled: int, cfg: AdaptConfig, *, ssl: bool
) -> bool:
    """Whether a federated site is a few-shot site by the automatic rule.

    Fewer than ``cfg.fewshot_max_labeled`` labeled training images and no
    unlabeled image it learns from (``ssl`` and ``n_unlabeled > 0``: a
    semi-supervised site trains every layer with its consistency loss). Such
    a site trains its head only in the federation
    (``client.detector_trainer``), and the recommended regime runs its
    fine-tuned model alone (``simulation.regimes``).
    """
    return n_labeled < cfg.fewshot_max_labeled and not (ssl and n_unlabeled > 0)


def choose_head_only(
    n_labeled: int, cfg: AdaptConfig, override: bool | None = None
) -> bool:
    """Head-only fine-tuning? ``override`` > ``cfg.head_only`` > automatic.

    Automatic: ``n_labeled < cfg.fewshot_max_labeled``.
    """
    if override is not None:
        return override
    if cfg.head_only is not None:
        return cfg.head_only
    return n_labeled < cfg.fewshot_max_labeled


def fewshot_frozen_keys(
    model: nn.Module, personalization: Personalization
) -> list[str]:
    """The federated shared layers a head-only site freezes.

    ``state_dict`` keys that :func:`common.detector.model.shared_and_personal` calls
    shared, minus the detection head's keys (:func:`common.detector.model.head_keys`).
    """
    shared, personal = shared_and_personal(model, personalization)
    head = set(head_keys(model))
    shared_set = set(shared)
    # A BatchNorm step counter is never sent, but it belongs to its layer: when
    # the layer's weights are shared (frozen here), its counter freezes too.
    counters = {
        k
        for k in personal
        if k.endswith(COUNTER_SUFFIX)
        and k[: -len(COUNTER_SUFFIX)] + "running_mean" in shared_set
    }
    return [
        k
        for k in model.state_dict()
        if k not in head and (k in shared_set or k in counters)
    ]


@contextmanager
def frozen(model: nn.Module, keys: Iterable[str]) -> Iterator[list[str]]:
    """Freeze the parameters named in ``keys`` for the ``with`` block.

    Yields the names of parameters left trainable. Keys that are buffers are
    accepted (their modules are kept in eval mode by :func:`train_mode_frozen`);
    keys unknown to ``model.state_dict()`` raise ``KeyError``. The previous
    ``requires_grad`` flags are restored on exit.
    """
    keyset = set(keys)
    unknown = sorted(keyset - set(model.state_dict()))
    if unknown:
        raise KeyError(f"frozen: keys not in the model: {unknown[:5]}")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        trainable = []
        for n, p in model.named_parameters():
            p.requires_grad_(n not in keyset and before[n])
            if p.requires_grad:
                trainable.append(n)
        yield trainable
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(before[n])


def frozen_norms(model: nn.Module, keys: set[str]) -> list[nn.Module]:
    """Norm modules whose own parameters and buffers are all in ``keys``."""
    out: list[nn.Module] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.modules.batchnorm._NormBase):
            continue
        prefix = f"{name}." if name else ""
        own = [prefix + k for k in mod.state_dict()]
        if own and all(k in keys for k in own):
            out.append(mod)
    return out


def train_mode_frozen(model: nn.Module, norms: Sequence[nn.Module]) -> None:
    """``model.train()`` with ``norms`` (:func:`frozen_norms`) kept in eval mode."""
    model.train()
    for m in norms:
        m.eval()


def grouped_folds(
    patient_ids: Sequence[str], k: int, seed: int = 0
) -> list[tuple[list[int], list[int]]]:
    """``k`` folds of item positions; no patient is on both sides of a fold.

    Patients are shuffled with ``seed`` and dealt round-robin. Returns
    ``[(train_positions, val_positions)] * k``.
    """
    patients = sorted(set(patient_ids))
    if not 2 <= k <= len(patients):
        raise ValueError(f"grouped_folds: k must be in [2, {len(patients)}], got {k}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(patients), generator=g).tolist()
    fold_of = {patients[j]: i % k for i, j in enumerate(order)}
    return fold_splits(range(len(patient_ids)), [fold_of[p] for p in patient_ids], k)


def _epoch(
    model: nn.Module,
    loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    norms: Sequence[nn.Module],
    dev: torch.device,
) -> float:
    return train_one_epoch(
        model, loader, optimizer, device=dev, amp=False, progress=False,
        train_mode=lambda m: train_mode_frozen(m, norms),
    ).mean_loss  # fmt: skip


@torch.no_grad()
def validation_loss(
    model: nn.Module, loader: Iterable[Any], device: torch.device | str = "cpu"
) -> float:
    """Mean FCOS loss on ``loader`` with no gradient and frozen norm statistics."""
    dev = torch.device(device)
    was_training = model.training
    norms = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
    ]
    train_mode_frozen(model, norms)
    total, n = 0.0, 0
    for imgs, ts in loader:
        losses = model([im.to(dev) for im in imgs], targets_to_device(ts, dev))
        total += float(sum(losses.values()))
        n += 1
    model.train(was_training)
    return total / n if n else float("nan")


def _optimizer(model: nn.Module, cfg: AdaptConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("few-shot: nothing left to train (every parameter frozen)")
    return Recipe(lr=cfg.fewshot_lr, weight_decay=cfg.fewshot_weight_decay).optimizer(
        params
    )


@dataclass(frozen=True)
class FewShotStats:
    """What :func:`finetune_head` did.

    Attributes:
        head_only: whether the shared layers were frozen.
        n_images, n_patients: labeled images and women used.
        fold_best_epochs: per CV fold, the epoch count with the lowest
            validation loss (empty when there were fewer than two women).
        fold_best_losses: those validation losses.
        epochs: epochs of the final fit on every image.
        final_train_loss: mean training loss of its last epoch.
        trainable_params, frozen_params: parameter tensors trained / frozen.
        seconds: wall time.
    """

    head_only: bool
    n_images: int
    n_patients: int
    fold_best_epochs: tuple[int, ...]
    fold_best_losses: tuple[float, ...]
    epochs: int
    final_train_loss: float
    trainable_params: int
    frozen_params: int
    seconds: float


def finetune_head(
    model: nn.Module,
    dataset_view: Dataset[Any],
    shared_keys: Sequence[str],
    cfg: AdaptConfig,
    *,
    device: torch.device | str = "cpu",
    head_only: bool | None = None,
    augment: Transform | None = None,
    epochs: int | None = None,
) -> FewShotStats:
    """Fine-tune ``model`` in place on a few-shot site's labeled images.

    Args:
        model: the detector with the federated weights loaded.
        dataset_view: labeled items ``(FloatTensor[1, H, W], target)`` with
            model-space ``boxes``, ``labels`` and ``patient_id``.
        shared_keys: ``state_dict`` keys frozen in head-only mode (normally
            :func:`fewshot_frozen_keys`); ignored for full fine-tuning.
        cfg: folds, epochs, patience, learning rate, batch size.
        device: where to train.
        head_only: overrides :func:`choose_head_only`.
        augment: training transform on top of the view's own; default
            :class:`~common.detector.adapt.augment.StrongAugment` seeded by
            ``cfg.seed``.
        epochs: a fixed number of epochs (no cross-validation), e.g. the
            federated personal head's ``head_epochs`` each round.

    Returns:
        :class:`FewShotStats`. Raises ``ValueError`` on an empty view.
    """
    t0 = time.perf_counter()
    dev = torch.device(device)
    n = len(dataset_view)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("finetune_head: the labeled view is empty")
    use_head_only = choose_head_only(n, cfg, head_only)
    keys = list(shared_keys) if use_head_only else []
    aug = augment if augment is not None else StrongAugment(seed=cfg.seed)
    pids = [str(t["patient_id"]) for t in item_targets(dataset_view)]
    n_patients = len(set(pids))
    g = torch.Generator().manual_seed(cfg.seed)

    def loader(idx: Sequence[int], train: bool) -> DataLoader[Any]:
        base = Subset(dataset_view, list(idx))
        ds = Transformed(base, aug if train else None)
        return DataLoader(
            ds,
            batch_size=cfg.fewshot_batch_size,
            shuffle=train,
            generator=g,
            collate_fn=collate,
        )

    best_epochs: list[int] = []
    best_losses: list[float] = []
    if epochs is None and n_patients >= 2:
        k = min(cfg.fewshot_folds, n_patients)
        for f, (tr, va) in enumerate(grouped_folds(pids, k, cfg.seed)):
            fold_model = copy.deepcopy(model).to(dev)
            with frozen(fold_model, keys):
                norms = frozen_norms(fold_model, set(keys))
                opt = _optimizer(fold_model, cfg)
                tr_loader, va_loader = loader(tr, True), loader(va, False)
                best, best_ep, since = float("inf"), 1, 0
                for ep in range(1, cfg.fewshot_max_epochs + 1):
                    _epoch(fold_model, tr_loader, opt, norms, dev)
                    v = validation_loss(fold_model, va_loader, dev)
                    if v < best:
                        best, best_ep, since = v, ep, 0
                    else:
                        since += 1
                        if since >= cfg.fewshot_patience:
                            break
            best_epochs.append(best_ep)
            best_losses.append(best)
            log.info("few-shot fold %d: best epoch %d (val %.4f)", f, best_ep, best)
            del fold_model
        epochs = max(1, int(round(statistics.median(best_epochs))))
    elif epochs is None:
        epochs = min(cfg.fewshot_patience, cfg.fewshot_max_epochs)
        log.warning(
            "few-shot: %d woman, no cross-validation; %d epochs", n_patients, epochs
        )
    model.to(dev)
    with frozen(model, keys) as trainable:
        norms = frozen_norms(model, set(keys))
        opt = _optimizer(model, cfg)
        all_loader = loader(range(n), True)
        last = float("nan")
        for _ in range(epochs):
            last = _epoch(model, all_loader, opt, norms, dev)
        n_train = len(trainable)
    n_params = sum(1 for _ in model.parameters())
    stats = FewShotStats(
        head_only=use_head_only,
        n_images=n,
        n_patients=n_patients,
        fold_best_epochs=tuple(best_epochs),
        fold_best_losses=tuple(best_losses),
        epochs=epochs,
        final_train_loss=last,
        trainable_params=n_train,
        frozen_params=n_params - n_train,
        seconds=time.perf_counter() - t0,
    )
    log.info(
        "few-shot fine-tuning (%s): %d images, %d women, %d epochs, loss %.4f",
        "head only" if use_head_only else "full",
        n,
        n_patients,
        epochs,
        last,
    )
    return stats
