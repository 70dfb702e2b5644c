"""A site's own model: trained on its labeled women alone, from the base model.

The recommended regime (``personalized-ssl+tuned+local-unless-fewshot``,
docs/federation.md) runs three models at a site and fuses their findings: the
federation's personalized model (``mammofed-client export``), that model
fine-tuned on the site's labels and a model the site trains **alone**, from the
coordinator's base model, with the federation's recipe (a few-shot site runs
the fine-tuned model alone). This module trains the last two at
the site (``--init`` the exported model or the base): :func:`train_local_model` (the
``mammofed-client train-local`` command). It is the study's ``local-only``
regime (:func:`train_central` on one cache, the same options, epochs, seed and
split), so what the study measured is what the hospital gets; with
``head_only`` (``train-local --head-only``) it is the ``local-head`` regime:
the base model with only its detection head tuned on the site's labels.

Only the site's labeled training women are used: the test women of the
site's split (``SiteDataset`` with the federation's seed, as the federated
trainer splits) stay held out for ``mammofed-client evaluate --view test``.
Nothing leaves the site.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from client.detector_trainer import (
    EXTRA_SPLIT,
    TEST_FRACTION,
    DetectorOptions,
    detector_options,
    training_split,
)
from common.config.loader import config_to_dict, write_resolved
from common.config.site import SiteConfig
from common.detector.adapt import fewshot as fs
from common.detector.adapt.config import AdaptConfig
from common.detector.adapt.pseudo import PseudoConfig, PseudoLabeled, pseudo_label
from common.detector.adapt.teacher import MeanTeacher, local_round
from common.detector.checkpoint import init_from_checkpoint, save_checkpoint
from common.detector.engine import resolve_device, seed_everything
from common.detector.model import Personalization, build_detector
from common.detector.recipe import Pooled, Recipe, Transformed, train_epochs
from common.errors import CheckpointMismatch, ConfigError, MammofedError
from common.fileio import sha256_file
from common.imaging.data import SiteDataset, collate
from common.wire.federation import FederationConfig

log = logging.getLogger(__name__)


def _site(cache: Path, seed: int, spacing_mm: float) -> SiteDataset:
    """A cache split as the federated trainer splits it (:data:`TEST_FRACTION`).

    ``spacing_mm``: the model's working spacing, checked against the cache's.
    """
    return SiteDataset(
        cache, test_fraction=TEST_FRACTION, seed=seed, model_spacing_mm=spacing_mm
    )


def check_central_options(opts: DetectorOptions, source: str) -> None:
    """Refuse the federated options this module's training does not carry out.

    ``standardize`` (the federated site's histogram-landmark intensity
    standardizer, :mod:`common.detector.adapt.standardize`) is fitted and kept
    per site by the federated trainer only; a central or site-alone model would
    train on unstandardized images while the run's settings say otherwise.

    Raises:
        ConfigError: ``trainer.options.standardize`` is set (named, with
            ``source``).
    """
    if opts.standardize:
        raise ConfigError(
            source,
            "trainer.options.standardize",
            "true, but central and site-alone training (train-local, the base, "
            "local-only, oracle and tuned regimes) do not standardize "
            "intensities; set it to false",
        )


def train_central(
    caches: list[Path],
    opts: DetectorOptions,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: torch.device,
    label: str,
    init: Path | None = None,
    head_only: bool = False,
    ssl: AdaptConfig | None = None,
    pseudo: Sequence[Dataset[Any]] = (),
) -> nn.Module:
    """Train one detector on the pooled labeled images of ``caches``.

    The federated site's recipe (:meth:`DetectorOptions.recipe`, steps per
    epoch by :meth:`DetectorOptions.epoch_steps`, capped at ``max_steps`` per
    cache): one epoch here on one cache is one federated round of that site
    with the same seed. ``init``: start from
    this checkpoint (checked against the options' model config).
    ``head_only``: train the detection head only; every other tensor, the
    norm layers' running statistics included, stays as ``init`` had it (the
    few-shot site's TFA-style tuning, :mod:`common.detector.adapt.fewshot`).
    ``ssl`` (with ``ssl_enabled``): each step also takes a batch of the
    caches' unlabeled training images and adds the mean teacher's
    consistency loss (:func:`common.detector.adapt.teacher.local_round`; the
    teacher starts as a copy of the model after ``init``); without unlabeled
    images it is plain supervised training (logged). ``pseudo``: more
    labeled images, pooled with the caches' (the site's unlabeled images
    with pseudo targets, :func:`common.detector.adapt.pseudo.pseudo_label`).

    Raises:
        MammofedError: no labeled image, or ``head_only`` with ``ssl``.
        ConfigError: options this training does not carry out
            (:func:`check_central_options`).
    """
    check_central_options(opts, label)
    use_ssl = ssl is not None and ssl.ssl_enabled
    if use_ssl and head_only:
        raise MammofedError(f"{label}: head-only training takes no semi-supervision")
    seed_everything(seed)
    model = build_detector(opts.model_config())
    if init is not None:
        init_from_checkpoint(model, opts.model_config(), init)
    model = model.to(device)
    spacing = opts.working_spacing_mm
    sites = [_site(c, seed, spacing) for c in caches]
    pooled = Pooled([*(site.view("labeled") for site in sites), *pseudo])
    n = len(pooled)
    if n == 0:
        raise MammofedError(f"{label}: no labeled images in {[str(c) for c in caches]}")
    recipe = opts.recipe(lr, batch_size)
    n_unlabeled = sum(len(site.indices("unlabeled")) for site in sites)
    steps = opts.epoch_steps(n, n_unlabeled, batch_size)  # the site's rule
    if opts.max_steps:
        steps = min(steps, opts.max_steps * len(caches))
    frozen_keys = fs.fewshot_frozen_keys(model, Personalization()) if head_only else []
    norms = fs.frozen_norms(model, set(frozen_keys))
    if head_only:
        log.info(
            "%s: training the head only (%d tensors frozen)", label, len(frozen_keys)
        )
    labeled = Transformed(
        pooled, recipe.transform(torch.Generator().manual_seed(seed), pooled)
    )
    if use_ssl:
        assert ssl is not None
        unlabeled: Dataset[Any] = ConcatDataset(
            [site.view("unlabeled") for site in sites]
        )
        if len(unlabeled) > 0:  # type: ignore[arg-type]
            _train_semi_supervised(
                model, labeled, unlabeled, recipe, ssl,
                epochs=epochs, steps=steps, seed=seed, device=device, label=label,
                lesions=pooled,
            )  # fmt: skip
            return model
        log.info("%s: no unlabeled images, supervised training only", label)
    with fs.frozen(model, frozen_keys):
        train_epochs(
            model,
            labeled,
            recipe,
            recipe.optimizer(p for p in model.parameters() if p.requires_grad),
            epochs=epochs,
            steps=steps,
            seed=seed,
            device=device,
            train_mode=lambda m: fs.train_mode_frozen(m, norms),
            label=label,
        )
    return model


def _train_semi_supervised(
    model: nn.Module,
    labeled: Dataset[Any],
    unlabeled: Dataset[Any],
    recipe: Recipe,
    cfg: AdaptConfig,
    *,
    epochs: int,
    steps: int,
    seed: int,
    device: torch.device,
    label: str,
    lesions: Dataset[Any] | None = None,
) -> None:
    """``epochs`` epochs of ``steps`` steps: labeled loss + teacher consistency.

    ``lesions``: the labeled images untransformed (``paste`` consistency).

    The labeled batches are the supervised recipe's (lesion-balanced sampler
    of epoch ``e`` seeded ``seed + e``); each step adds ``cfg.unlabeled_ratio``
    shuffled unlabeled batches; the consistency weight ramps up over
    ``cfg.rampup_steps`` steps counted across epochs.
    """
    optimizer = recipe.optimizer(model.parameters())
    teacher = MeanTeacher(model, cfg.ema_decay)
    unl_loader = DataLoader(
        unlabeled,
        batch_size=recipe.batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )
    log.info(
        "%s: semi-supervised, %d labeled and %d unlabeled images",
        label, len(labeled), len(unlabeled),  # type: ignore[arg-type]
    )  # fmt: skip
    step = 0
    for epoch in range(epochs):
        loader = recipe.loader(labeled, steps * recipe.batch_size, seed + epoch)
        stats = local_round(
            model,
            teacher,
            loader,
            unl_loader,
            optimizer,
            cfg,
            device,
            step,
            max_steps=steps,
            grad_clip=recipe.clip,
            lesions=lesions,
        )
        step = stats.step
        log.info(
            "[%s] epoch %d/%d: supervised %.4f, consistency %.4f x %.3f",
            label, epoch + 1, epochs, stats.sup_loss, stats.unsup_loss,
            stats.unsup_weight,
        )  # fmt: skip


def train_local_model(
    site: SiteConfig,
    fed: FederationConfig,
    *,
    init: Path,
    out: Path,
    epochs: int | None = None,
    head_only: bool = False,
    lr_factor: float = 1.0,
    device: str | None = None,
    source: str = "<federation config>",
    site_source: str = "<site config>",
    pseudo_label_with: Sequence[Path] = (),
    pseudo: PseudoConfig = PseudoConfig(),
) -> Path:
    """Train the site's own model from ``init`` and write it to ``out``.

    ``fed``: the federation's config (its recipe, learning rate, batch size,
    seed and split); ``epochs``: default ``num_rounds * local_epochs``, as the
    study's local-only regime; ``head_only``: tune the detection head only
    (the study's ``local-head`` regime); ``lr_factor``: the learning rate is
    the federation's times this (0.3 when ``init`` is the site's exported
    federated model: the study's ``personalized-ssl-tuned`` and
    ``personalized-dp-tuned`` regimes, fine-tuning after federation);
    ``device``: default the options' device; ``pseudo_label_with``:
    self-training: these models (the site's federated, tuned and own
    models, say) label the site's unlabeled training images, fused, with
    ``pseudo``'s thresholds (:mod:`common.detector.adapt.pseudo`), and the
    model trains on those beside the labeled ones (the study's
    ``personalized-ssl-tuned-pseudo`` with ``--init`` the exported federated
    model and ``lr_factor`` 0.3).
    The checkpoint's ``extra`` records the site, the epochs, the seed and the
    base model's SHA-256 (``local_model``) and the site split the training
    used (``split``, :func:`client.detector_trainer.training_split`, which
    ``evaluate`` scores by); ``<out>.resolved.yaml`` the settings used.

    Raises:
        ConfigError: the site config names no cache, epochs below 1, or
            options site-alone training does not carry out
            (:func:`check_central_options`).
        CheckpointMismatch: ``init`` does not fit the federation's model.
        MammofedError: the site's cache holds no labeled training image.
    """
    if site.cache_dir is None:
        raise ConfigError(
            site_source, "cache_dir", "required: the site's ingested images"
        )
    if epochs is None:
        epochs = fed.num_rounds * fed.trainer.local_epochs
    if epochs < 1:
        raise ConfigError("--epochs", "epochs", f"must be >= 1, got {epochs}")
    if not (math.isfinite(lr_factor) and 0 < lr_factor <= 10):
        raise ConfigError(
            "--lr-factor", "lr_factor", f"must be in (0, 10], got {lr_factor!r}"
        )
    lr = fed.trainer.learning_rate * lr_factor
    opts = detector_options(fed, source)
    check_central_options(opts, source)
    dev = resolve_device(device or opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    log.info(
        "site %s: training its own model from %s, %d epochs on %s",
        site.name, init, epochs, dev,
    )  # fmt: skip
    labeled_by: dict[str, Any] | None = None
    extra_images: list[Dataset[Any]] = []
    if pseudo_label_with:
        data = _pseudo_labeled(
            site.cache_dir, pseudo_label_with, pseudo, opts, fed.seed, dev
        )
        labeled_by = {
            "models": {str(p): sha256_file(p) for p in pseudo_label_with},
            "keep_threshold": pseudo.keep,
            "ignore_threshold": pseudo.ignore,
            **data.counts(),
        }
        log.info("site %s: pseudo-labeled %s", site.name, labeled_by)
        extra_images = [data] if len(data) else []
    model = train_central(
        [site.cache_dir],
        opts,
        epochs=epochs,
        lr=lr,
        batch_size=fed.trainer.batch_size,
        seed=fed.seed,
        device=dev,
        label=f"local/{site.name}",
        init=init,
        head_only=head_only,
        pseudo=extra_images,
    )
    settings: dict[str, Any] = {
        "site": site.name,
        "cache_dir": str(site.cache_dir),
        "init": str(init),
        "init_sha256": sha256_file(init),
        "epochs": epochs,
        "head_only": head_only,
        "seed": fed.seed,
        "learning_rate": lr,
        "lr_factor": lr_factor,
        "batch_size": fed.trainer.batch_size,
        "options": config_to_dict(opts),
        "pseudo_labels": labeled_by,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = {"local_model": settings, EXTRA_SPLIT: training_split(fed.seed)}
    save_checkpoint(out, model, opts.model_config(), extra=extra)
    write_resolved(settings, out.parent, f"{out.name}.resolved.yaml")
    log.info("site %s: its own model written to %s", site.name, out)
    return out


def _pseudo_labeled(
    cache: Path,
    models: Sequence[Path],
    cfg: PseudoConfig,
    opts: DetectorOptions,
    seed: int,
    device: torch.device,
) -> PseudoLabeled:
    """The site's unlabeled training images labeled by ``models``, fused.

    Raises:
        CheckpointMismatch: a model that does not work at the site's spacing
            or carries an intensity standardizer (not applied here).
    """
    from client.export import load_detectors

    loaded = load_detectors(list(models), device)
    for path, (_, ck, std) in zip(models, loaded, strict=True):
        mm = float(ck.model_config.working_spacing_mm)
        if abs(mm - opts.working_spacing_mm) > 1e-6:
            raise CheckpointMismatch(
                f"{path}: field 'working_spacing_mm' is {mm:g}, the "
                f"federation's model works at {opts.working_spacing_mm:g} mm"
            )
        if std is not None:
            raise CheckpointMismatch(
                f"{path}: field 'extra.standardizer' is set: site-alone training "
                "does not standardize, so this model cannot label its images"
            )
    images = _site(cache, seed, opts.working_spacing_mm).view("unlabeled")
    if len(images) == 0:
        log.info("%s: no unlabeled training images to pseudo-label", cache)
        return PseudoLabeled(images, [], [], [])
    data, _ = pseudo_label([m for m, _, _ in loaded], images, cfg, device)
    return data
