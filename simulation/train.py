"""Central (non-federated) training of the detector on one or more site caches.

Used for the ``base`` (site A alone), ``local-only`` and ``centralized oracle``
regimes (:mod:`simulation.regimes`). :func:`run_training` writes into ``out_dir``:

* ``resolved_config.yaml``: the :class:`TrainConfig` as used;
* ``last.pt`` (resume state, each epoch) and ``final.pt`` (the final model, or
  its EMA when ``ema_decay`` is set) as self-describing checkpoints;
  ``final.pt`` records its split (``extra.split``: ``split_seed``,
  ``test_fraction``) and its training women's images (``extra.trained_keys``),
  so ``mammofed-client evaluate`` scores only the women it never trained on;
* ``epochs.jsonl``: one line per epoch (loss, steps, skipped, images/s, lr,
  optional test metrics when ``eval_every > 0``; logged only, never used to
  select a model);
* ``metrics.json``: final FROC metrics on each site's test view, and
  ``<site>/froc-<class>.png``;
* with ``rescore.enabled``: ``rescorer.pt``, the second stage trained on the
  detector's candidates on the same training images
  (:mod:`common.detector.rescore`); ``metrics.json`` then scores the
  re-scored detector and ``metrics-detector.json`` the detector alone (no
  bootstrap interval).

Sites are named by their cache folder's name.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from client.detector_trainer import EXTRA_SPLIT, EXTRA_TRAINED_KEYS, training_split
from common.config import bounded, load_config, path_field, write_resolved
from common.detector.checkpoint import init_from_checkpoint, save_checkpoint
from common.detector.engine import (
    EpochHook,
    evaluate_detailed,
    fit,
    prepare_model,
    resolve_device,
    seed_everything,
)
from common.detector.hardneg import HardNegativeMiner, HardNegatives
from common.detector.model import ModelConfig, build_detector
from common.detector.pretrain import PretrainConfig, pretrain_body
from common.detector.recipe import AugmentConfig, Pooled, Recipe
from common.detector.rescore import (
    RESCORER_FILE,
    RescoreConfig,
    RescoredDetector,
    fit_rescorer,
)
from common.detector.sampling import lesion_flags
from common.detector.transforms import Compose
from common.errors import ConfigError
from common.fileio import json_safe
from common.imaging.data import SiteDataset, SiteView
from common.keys import RESOLVED_CONFIG_YAML

log = logging.getLogger(__name__)

FINAL_CHECKPOINT = "final.pt"
METRICS_JSON = "metrics.json"
DETECTOR_METRICS_JSON = "metrics-detector.json"


@dataclass(frozen=True)
class TrainConfig:
    """Central training run (YAML via ``common.config.load_config``).

    Attributes:
        caches: site cache folders (``mammofed-client ingest`` output); their
            ``labeled`` views are pooled for training, each ``test`` view is
            evaluated at the end.
        out_dir: where checkpoints, logs and metrics go.
        model: the detector (:class:`common.detector.model.ModelConfig`).
        epochs, batch_size, lr, weight_decay: AdamW training; the learning rate
            warms up linearly for ``warmup_steps`` then follows a cosine to 0.
        lesion_prob: probability that a drawn training image has a lesion
            (:mod:`common.detector.sampling`); ``samples_per_epoch`` draws per epoch
            (default: the pooled labeled-view size).
        augment: :class:`common.detector.recipe.AugmentConfig`.
        seed: seeds torch/numpy/python and the sampler; ``split_seed`` and
            ``test_fraction`` define each site's patient split.
        device: ``auto``, ``cpu`` or ``cuda[:N]``; ``amp``: bf16 on CUDA only.
        grad_clip: global gradient norm bound (0: none).
        ema_decay: keep an EMA of the weights (``final.pt`` holds the EMA).
        eval_every: evaluate the test views every N epochs (0: only at the end).
        n_boot: bootstrap resamples for the CPM interval.
        num_workers: DataLoader workers.
        init_checkpoint: a LOCAL mammofed model checkpoint (``final.pt``, or
            ``mammofed-client export`` of a federation round) whose weights
            start the detector instead of a random initialisation (a site
            joining from a pretrained model); its structural model fields
            (:data:`common.detector.checkpoint.STRUCTURAL_FIELDS`) must equal
            ``model``'s.
            A ``last.pt`` in ``out_dir`` still takes precedence (resume).
        labeled_patients: train on at most this many box-labeled women of each
            cache (a new site with few labels); :func:`few_label_subset` picks
            them with ``split_seed``. ``None``: every labeled woman.
        rescore: the second stage (:class:`common.detector.rescore.RescoreConfig`):
            when enabled, trained after the detector on its candidates on the
            same training images, and applied before scoring.
    """

    caches: tuple[Path, ...]
    out_dir: Path = field(metadata=path_field(False))
    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = field(default=10, metadata=bounded(1, 100000))
    batch_size: int = field(default=4, metadata=bounded(1, 4096))
    lr: float = field(default=1e-3, metadata=bounded(0.0, 10.0))
    weight_decay: float = field(default=1e-4, metadata=bounded(0.0, 10.0))
    optimizer: Literal["adamw"] = "adamw"
    warmup_steps: int = field(default=50, metadata=bounded(0, None))
    lesion_prob: float = field(default=0.5, metadata=bounded(0.0, 1.0))
    samples_per_epoch: int | None = field(default=None, metadata=bounded(1, None))
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    split_seed: int = 0
    test_fraction: float = field(default=0.2, metadata=bounded(0.0, 0.99))
    device: str = "auto"
    amp: bool = True
    grad_clip: float = field(default=10.0, metadata=bounded(0.0, None))
    ema_decay: float | None = field(default=None, metadata=bounded(0.0, 1.0))
    eval_every: int = field(default=0, metadata=bounded(0, None))
    n_boot: int = field(default=1000, metadata=bounded(0, 100000))
    num_workers: int = field(default=0, metadata=bounded(0, 64))
    init_checkpoint: Path | None = field(default=None, metadata=path_field(True))
    labeled_patients: int | None = field(default=None, metadata=bounded(1, None))
    rescore: RescoreConfig = field(default_factory=RescoreConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def __post_init__(self) -> None:
        if not self.caches:
            raise ValueError("caches: at least one site cache folder is required")
        for i, c in enumerate(self.caches):
            if not Path(c).is_dir():
                raise ValueError(f"caches[{i}]: not a folder: {str(c)!r}")
        names = [Path(c).name for c in self.caches]
        if len(set(names)) != len(names):
            raise ValueError(f"caches: folder names must be unique, got {names}")
        if self.model.contralateral:
            # both take the image alone: the second stage's patches and the
            # pretraining's masked patches have no other breast beside them
            for key, on in (
                ("rescore.enabled", self.rescore.enabled),
                ("pretrain.epochs", self.pretrain.enabled),
            ):
                if on:
                    raise ValueError(
                        f"{key}: cannot be combined with model.contralateral: "
                        "true (it sees the image without the other breast)"
                    )

    def recipe(self) -> Recipe:
        """The training recipe these settings describe (warm-up + cosine)."""
        return Recipe(
            lr=self.lr,
            weight_decay=self.weight_decay,
            batch_size=self.batch_size,
            lesion_prob=self.lesion_prob,
            grad_clip=self.grad_clip,
            schedule="warmup_cosine",
            warmup_steps=self.warmup_steps,
            ema_decay=self.ema_decay,
            amp=self.amp,
            augment=self.augment,
        )

    def train_transform(
        self, source: Dataset[Any] | None = None, hard: HardNegatives | None = None
    ) -> Compose:
        """The recipe's augmentation, from a ``seed``-ed generator without workers.

        With workers, the global RNG (seeded per worker by the DataLoader)
        drives it: a shared generator would repeat one stream in every worker.
        ``source``: the untransformed training images (lesion copy-paste);
        ``hard``: where the patch crop finds mined false positives.
        """
        seeded = self.num_workers == 0
        gen = torch.Generator().manual_seed(self.seed) if seeded else None
        return self.recipe().transform(gen, source, hard)

    def sites(self) -> dict[str, SiteDataset]:
        """Every cache by folder name, split by ``test_fraction``/``split_seed``."""
        return {
            Path(c).name: SiteDataset(
                c,
                test_fraction=self.test_fraction,
                seed=self.split_seed,
                model_spacing_mm=self.model.working_spacing_mm,
                contralateral=self.model.contralateral,
            )
            for c in self.caches
        }


def load_train_config(path: str | Path) -> TrainConfig:
    """Load and validate a :class:`TrainConfig` YAML file."""
    return load_config(path, TrainConfig)


def few_label_subset(
    site: SiteDataset, indices: Sequence[int], n_patients: int, seed: int
) -> list[int]:
    """The images of ``indices`` that belong to at most ``n_patients`` women.

    Women are grouped by ``patient_id`` and drawn without replacement with
    ``numpy.random.default_rng(seed)``, women with a lesion and women without
    in proportion to their share of ``indices`` (at least one of each kind
    when both exist and ``n_patients >= 2``), so a few-label subset keeps
    lesions to learn from. All images of a chosen woman are kept; the order of
    ``indices`` is preserved. Fewer women than ``n_patients``: all of them.
    """
    by_patient: dict[str, list[int]] = {}
    for i in indices:
        by_patient.setdefault(site.records[i].patient_id, []).append(i)
    if len(by_patient) <= n_patients:
        return list(indices)
    pos = sorted(
        p for p, ix in by_patient.items() if any(site.records[i].has_lesion for i in ix)
    )
    neg = sorted(set(by_patient) - set(pos))
    n_pos = round(n_patients * len(pos) / len(by_patient))
    if n_patients >= 2 and pos and neg:
        n_pos = min(max(n_pos, 1), n_patients - 1)
    n_pos = min(n_pos, len(pos))
    n_neg = min(n_patients - n_pos, len(neg))
    rng = np.random.default_rng(seed)
    chosen = set(rng.permutation(pos)[:n_pos].tolist())
    chosen |= set(rng.permutation(neg)[:n_neg].tolist())
    return [i for i in indices if site.records[i].patient_id in chosen]


@dataclass(frozen=True)
class TrainingData:
    """What one central training run reads (:func:`training_data`).

    ``source``: the untransformed training images (lesions to paste, hard
    negatives and the re-scorer's candidates come from them); ``views``: the
    same images under the recipe's augmentation, one view a cache; ``miner``:
    the hard-negative miner (``None`` unless ``augment.hard_negative_p > 0``);
    ``unlabeled``: each cache's train-split images without box labels,
    untransformed (with ``source``, what ``pretrain`` learns from).
    """

    source: Pooled
    views: list[SiteView]
    miner: HardNegativeMiner | None
    unlabeled: list[SiteView] = field(default_factory=list)

    def pretrain_images(self) -> tuple[Pooled, list[str]]:
        """Every training image, labeled or not, untransformed, and their keys."""
        views: list[SiteView] = [*self.source.views, *self.unlabeled]  # type: ignore[list-item]
        keys = [r.key for v in views for r in v.records]
        return Pooled(views), keys


def training_data(
    cfg: TrainConfig,
    sites: dict[str, SiteDataset],
    train_idx: dict[str, list[int]],
    device: torch.device,
) -> TrainingData:
    """The images ``train_idx`` of ``sites`` as ``cfg``'s recipe trains on them."""
    source = Pooled([sites[n].subset(i) for n, i in train_idx.items()])
    aug = cfg.augment
    store = HardNegatives() if aug.hard_negative_p > 0 else None
    transform = cfg.train_transform(source, store)
    views = [sites[n].subset(i, transform) for n, i in train_idx.items()]
    miner = None
    if store is not None:
        miner = HardNegativeMiner(
            source,
            store,
            every=aug.hard_negative_every,
            per_image=aug.hard_negative_per_image,
            device=device,
            amp=cfg.amp,
            batch_size=cfg.batch_size,
            epochs=cfg.epochs,
        )
    unlabeled = [sites[n].view("unlabeled") for n in train_idx]
    return TrainingData(source, views, miner, [u for u in unlabeled if len(u)])


@dataclass(frozen=True)
class Trained:
    """What :func:`train_model` returns.

    ``model``: the final model, the EMA module when ``ema_decay`` is set (what
    ``final.pt`` holds and what is scored); ``student``: the weights the
    optimizer trained, the same object as ``model`` without an EMA, so a run
    with an EMA can score both on the same images (``crossval``'s
    ``ema_gain``).
    """

    model: torch.nn.Module
    student: torch.nn.Module


def train_model(
    cfg: TrainConfig,
    train_views: Sequence[Dataset[Any]],
    out_dir: str | Path,
    device: torch.device,
    *,
    eval_fn: EpochHook | None = None,
    miner: HardNegativeMiner | None = None,
    pretrain_on: TrainingData | None = None,
) -> Trained:
    """Train a fresh detector on the pooled ``train_views`` with ``cfg``'s recipe.

    The recipe of :func:`run_training`: lesion-balanced sampler, AdamW with
    warmup + cosine, optional EMA, gradient clipping, ``cfg.epochs`` epochs via
    :func:`common.detector.engine.fit` (``out_dir/last.pt`` and ``epochs.jsonl``;
    resumes from a compatible ``last.pt``). The model is built from the global
    torch RNG, so call :func:`common.detector.engine.seed_everything` first for
    a reproducible run. ``eval_fn`` is called after each epoch (see ``fit``),
    then ``miner`` (hard negatives for the patch crop; :func:`training_data`).
    The detector starts from ``cfg.init_checkpoint`` when set; with
    ``cfg.pretrain.epochs > 0`` its body is then pretrained, labels unused, on
    every image of ``pretrain_on`` (:meth:`TrainingData.pretrain_images`;
    :mod:`common.detector.pretrain`) before the supervised epochs.

    Returns the final model (the EMA module when ``cfg.ema_decay`` is set) and
    the trained weights themselves (:class:`Trained`).

    Raises:
        ValueError: the views hold no image.
        CheckpointMismatch: ``cfg.init_checkpoint`` does not fit ``cfg.model``.
        ValueError: ``cfg.pretrain`` is on and ``pretrain_on`` is not given.
    """
    pooled = Pooled(train_views)
    if len(pooled) == 0:
        raise ValueError(
            f"no labeled training images in caches {[str(c) for c in cfg.caches]}"
        )
    recipe = cfg.recipe()
    n_samples = cfg.samples_per_epoch or len(pooled)
    loader = recipe.loader(pooled, n_samples, cfg.seed, cfg.num_workers)
    net = build_detector(cfg.model)
    if cfg.init_checkpoint is not None:
        init_from_checkpoint(net, cfg.model, cfg.init_checkpoint)
    model = prepare_model(net, device)
    if cfg.pretrain.enabled:
        if pretrain_on is None:
            raise ValueError("pretrain.epochs > 0 needs pretrain_on (the images)")
        images, keys = pretrain_on.pretrain_images()
        pretrain_body(
            model, images, cfg.pretrain, device=device, seed=cfg.seed,
            image_keys=keys, out_dir=out_dir,
        )  # fmt: skip
    opt = recipe.optimizer(model.parameters())
    steps_per_epoch = max(1, math.ceil(n_samples / cfg.batch_size))
    ema = recipe.ema(model)
    fit(
        model,
        cfg.model,
        opt,
        loader,
        epochs=cfg.epochs,
        out_dir=out_dir,
        device=device,
        amp=cfg.amp,
        grad_clip=recipe.clip,
        ema=ema,
        scheduler=recipe.scheduler(opt, cfg.epochs * steps_per_epoch),
        eval_fn=eval_fn,
        mine_fn=miner,
    )
    return Trained(ema.module if ema is not None else model, model)


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Train on the pooled labeled views, evaluate every test view, write outputs.

    Returns ``{site: EvalResult.to_json()}`` (also written to ``metrics.json``).
    Resumes from ``out_dir/last.pt`` when present and compatible.
    """
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(
            "train config", "out_dir", f"{str(out)!r} is a file, not a folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_resolved(cfg, out)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device, "train config")
    sites = cfg.sites()
    test_views = {name: s.view("test") for name, s in sites.items()}
    train_idx: dict[str, list[int]] = {}
    for name, s in sites.items():
        idx = s.indices("labeled")
        if cfg.labeled_patients is not None:
            idx = few_label_subset(s, idx, cfg.labeled_patients, cfg.split_seed)
        train_idx[name] = idx
    data = training_data(cfg, sites, train_idx, device)
    for name, v in zip(train_idx, data.views, strict=True):
        log.info(
            "site %s: %d labeled training images (%d with lesions), %d test images",
            name, len(v), sum(lesion_flags(v)), len(test_views[name]),
        )  # fmt: skip

    def eval_fn(m: torch.nn.Module, epoch: int) -> dict[str, Any]:
        # by the epoch's own number, so a resumed run keeps the same cadence
        if (epoch + 1) % cfg.eval_every:
            return {}
        return {
            name: evaluate_detailed(m, v, device, n_boot=0, amp=cfg.amp).metrics
            for name, v in test_views.items()
            if len(v)
        }

    final_model = train_model(
        cfg,
        data.views,
        out,
        device,
        eval_fn=eval_fn if cfg.eval_every > 0 else None,
        miner=data.miner,
        pretrain_on=data,
    ).model
    save_checkpoint(
        out / FINAL_CHECKPOINT,
        final_model,
        cfg.model,
        epoch=cfg.epochs - 1,
        extra={
            "train_config": str(out / RESOLVED_CONFIG_YAML),
            "ema": cfg.ema_decay is not None,
            # the women it trained on, so that `evaluate` scores only the
            # others (and refuses a cache it trained on whole)
            EXTRA_SPLIT: training_split(cfg.split_seed, cfg.test_fraction),
            # every image of its training women (cache keys: the file's
            # sha256 and the spacing), so `evaluate` can tell a cache of other
            # women from its own
            EXTRA_TRAINED_KEYS: sorted(
                s.records[i].key for s in sites.values() for i in s.indices("train")
            ),
        },
    )
    scorer = final_model
    if cfg.rescore.enabled:
        rescorer = fit_rescorer(
            final_model, data.source, cfg.rescore, cfg.model.working_spacing_mm, device,
            path=out / RESCORER_FILE, amp=cfg.amp,
        )  # fmt: skip
        scorer = RescoredDetector(final_model, rescorer)
        detector_only = {
            name: evaluate_detailed(final_model, v, device, n_boot=0, amp=cfg.amp)
            for name, v in test_views.items()
            if len(v)
        }
        (out / DETECTOR_METRICS_JSON).write_text(
            json.dumps(
                json_safe({n: r.to_json() for n, r in detector_only.items()}), indent=2
            )
        )
    results: dict[str, Any] = {}
    for name, v in test_views.items():
        if len(v) == 0:
            log.warning("site %s: empty test view; no metrics", name)
            results[name] = None
            continue
        res = evaluate_detailed(
            scorer,
            v,
            device,
            n_boot=cfg.n_boot,
            seed=cfg.seed,
            plot_dir=out / name,
            title=f"{name} test",
            amp=cfg.amp,
        )
        results[name] = res.to_json()
        m = res.metrics
        log.info(
            "site %s test: CPM mass %.3f calcification %.3f (%d images)",
            name, m["cpm-mass"], m["cpm-calcification"], len(v),
        )  # fmt: skip
    (out / METRICS_JSON).write_text(json.dumps(json_safe(results), indent=2))
    return results
