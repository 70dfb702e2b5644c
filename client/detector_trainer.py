"""The lesion detector as a federated :class:`client.trainer.LocalTrainer`.

One instance serves one site. It builds the detector from the run's
``trainer.options`` (scalars only, validated here), reads the site's cache
(``common.imaging.data.SiteDataset``) and keeps everything personal on the site's disk
through :class:`client.state.SiteState`:

* FedBN (``personalization.local_norm``): every normalization layer's weights
  and running statistics (``common.detector.model.shared_and_personal``);
* FedPer (``personalization.personal_head``): a personal copy of the head,
  fine-tuned head-only (TFA-style, shared layers frozen) on the site's labeled
  images after each round; the global head is still trained and sent, so a new
  site always has a base model;
* the mean teacher of semi-supervised training (``ssl: true``) and its step;
* the site's histogram-landmark standardizer (``standardize: true``);
* the DP accountant of patient-level DP-SGD (``dp: true``, ``common.detector.dp``).

What leaves the site is exactly :meth:`DetectorTrainer.shared_spec` plus the
metric names of :meth:`DetectorTrainer.metric_names`.

``trainer.options`` (all optional) are the fields of :class:`DetectorOptions`.

With ``dp: true`` the shared weights are trained by :class:`PrivateRound`
(per-woman DP-SGD, ``common.detector.dp``) in place of the normal epoch loop, the train
metrics gain ``dp-epsilon``, and a site whose next round would exceed
``dp_epsilon`` replies the received shared arrays unchanged. ``train-loss``
and ``skipped-steps`` depend on the drawn women outside the DP-SGD guarantee,
so under DP they are sent as 0 unless ``dp_share_train_stats`` is set; the
true values stay in the site's own round history
(:attr:`DetectorTrainer.withheld`). The FedPer head
fine-tuning stays non-private: it never leaves the site. See docs/privacy.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from client.selection import (
    Selection,
    SelectionStore,
    Selector,
    SelectSettings,
    applicable,
    candidate_index,
    parse_candidates,
    reestimate_norm_stats,
    validation_women,
)
from client.site_model import PERSONAL_HEAD_PREFIX, SiteModel
from client.state import SiteState
from client.trainer import Arrays, Metrics, register_trainer
from common.config.loader import bounded, from_mapping
from common.detector.adapt import fewshot as fs
from common.detector.adapt.config import AdaptConfig, apply_overrides
from common.detector.adapt.standardize import HistogramStandardizer
from common.detector.adapt.teacher import load_or_create_teacher, local_round
from common.detector.dp import (
    DPRoundResult,
    DPSettings,
    PatientDPSGD,
    PrivacyError,
    default_delta,
    patient_groups,
)
from common.detector.engine import evaluate_detailed, resolve_device, seed_everything
from common.detector.model import (
    ModelConfig,
    Personalization,
    build_detector,
)
from common.detector.model.initial import DetectorModelOptions, detector_model_config
from common.detector.recipe import (
    SITE_AUGMENT,
    Recipe,
    Transformed,
    train_epochs,
    train_transform,
)
from common.errors import ConfigError, MammofedError
from common.imaging.data import DEFAULT_TEST_FRACTION, SiteDataset, collate
from common.keys import (
    CLASSES,
    CPM_CALCIFICATION,
    CPM_MASS,
    CPM_MEAN,
    DETECTOR_TRAINER,
    DP_EPSILON,
    NUM_EXAMPLES,
    SKIPPED_STEPS,
    TRAIN_LOSS,
)
from common.wire.federation import SELECTED_MODEL, FederationConfig, FitInstructions

log = logging.getLogger(__name__)


TRAIN_METRICS: tuple[str, ...] = (NUM_EXAMPLES, TRAIN_LOSS, SKIPPED_STEPS)
#: Train metrics added when ``trainer.options.dp`` is on (same on every site).
DP_TRAIN_METRICS: tuple[str, ...] = (DP_EPSILON,)
EVAL_METRICS: tuple[str, ...] = (NUM_EXAMPLES, CPM_MASS, CPM_CALCIFICATION, CPM_MEAN)


#: the model options' defaults (one source: ``common.detector.model.initial``)
_MODEL = DetectorModelOptions()

#: The test share the federated trainer and ``train-local`` split a site by,
#: seeded by the federation's seed (one value: the data module's default).
TEST_FRACTION = DEFAULT_TEST_FRACTION
#: ``extra`` key of a checkpoint trained on site caches: the split its training
#: used (:func:`training_split`); ``mammofed-client evaluate`` scores the test
#: women of that split.
EXTRA_SPLIT = "split"
#: ``extra`` key of a centrally trained model's training images (cache keys;
#: ``simulation.train``): ``evaluate`` scores a cache that shares none of them
#: whole, whatever the recorded split.
EXTRA_TRAINED_KEYS = "trained_keys"


def training_split(seed: int, test_fraction: float = TEST_FRACTION) -> dict[str, Any]:
    """``extra["split"]`` of a model trained with ``SiteDataset(cache, seed=...)``.

    ``{"seed": seed, "test_fraction": test_fraction}``: with the cache's own
    ``split.json`` (which decides for the women it lists) this names every
    woman the training could see, and so the test women it never saw.
    """
    return {"seed": int(seed), "test_fraction": float(test_fraction)}


@dataclass(frozen=True)
class DetectorOptions:
    """Typed ``trainer.options`` of the detector trainer; defaults as declared.

    The model fields (``arch`` ... ``working_spacing_mm``) are validated by
    :class:`ModelConfig` through :meth:`model_config`, with the defaults of
    ``common.detector.model.initial.DetectorModelOptions``. ``max_steps`` 0 is
    a whole epoch; ``fewshot`` lets a site below ``adapt.fewshot_max_labeled``
    labeled images train the head only (false: every site trains every layer,
    as plain FedAvg does); ``threads`` 0 is torch's default; ``cache_root``
    holds the ``<site>/`` caches when the node config names no data dir;
    ``dp_delta`` 0 is ``1 / n_women ** 1.1``. ``ssl_rampup_steps``: the
    site's optimizer steps over which the consistency loss's weight rises to
    its full value (``AdaptConfig.rampup_steps``; a site with few labeled
    images takes few steps a round, docs/adaptation.md). ``ssl_unsup_weight``:
    that full value (``AdaptConfig.unsup_weight``; 0 keeps the unlabeled
    images' passes through the student, and so their share of a FedBN site's
    norm statistics, without the consistency loss's gradient or a share of
    the site's averaging weight, docs/adaptation.md). ``ssl_unlabeled_ratio``:
    unlabeled batches per labeled batch in a step (``AdaptConfig.unlabeled_ratio``;
    the unlabeled images a round runs count toward the site's ``num-examples``,
    its averaging weight, unless ``ssl_unsup_weight`` is 0).
    ``ssl_threshold``:
    the teacher score a pseudo box needs, every class; it acts only where a
    site's ``adapt.consistency`` is ``pseudo_boxes`` or ``paste`` (the
    default, ``dense``, thresholds nothing). ``ssl_consistency``: the
    semi-supervised loss (``AdaptConfig.consistency``, a site's
    ``adapt.consistency`` overrides it): ``dense`` (default), ``pseudo_boxes``
    or ``paste`` (the site's labeled lesions pasted into its unlabeled images,
    the teacher's unsure findings there ignored, docs/adaptation.md).

    ``round_steps``: how many optimizer steps a local epoch takes. ``labeled``
    (the default): a pass's worth of the site's labeled training images,
    ``ceil(n_labeled / batch_size)``; a partly labeled site then runs only a
    fraction of its unlabeled images a round (C of the study: 3 steps, 12 of
    its 68 unlabeled images). ``all``: a pass's worth of all its training
    images, labeled or not, ``ceil((n_labeled + n_unlabeled) / batch_size)``,
    the steps a fully labeled site of its size takes; the labeled batches are
    drawn with replacement as always (lesion-balanced), and with ``ssl`` each
    step also takes ``ssl_unlabeled_ratio`` unlabeled batches, so a round runs
    the unlabeled images about once. Without ``ssl`` the extra steps re-draw
    the labeled images (the control that tells more steps from the unlabeled
    images). ``max_steps`` caps either; DP-SGD draws its own women and refuses
    ``all``.

    ``select`` turns on the site's choice of its own model
    (:mod:`client.selection`): ``select_validation_fraction`` of the labeled
    training women (per lesion stratum, at least one of two or more) are held
    out of local training and score the candidates; a candidate replaces the
    base model only when its CPM beats the base's by more than
    ``select_margin``; ``select_candidates`` (comma-separated names, empty:
    every candidate the run can build) limits them; ``select_head_epochs``
    is the head tuning of the ``*-tuned`` candidates (0: none).

    ``reestimate_norm`` (FedBN only, never under DP): after each round's local
    training the site re-estimates its BatchNorm running statistics on all its
    training images (labeled and unlabeled, never the test women) with the
    round's final weights, before its head is tuned and its state stored. With
    a few local steps per round the momentum-averaged statistics lag behind
    the weights the server keeps replacing (docs/federation.md, "Fresh norm
    statistics"); the statistics stay on the site like every FedBN layer.
    """

    arch: str = _MODEL.arch
    norm: Literal["batch", "group"] = "batch"
    fpn_channels: int = _MODEL.fpn_channels
    head_convs: int = _MODEL.head_convs
    working_spacing_mm: float = _MODEL.working_spacing_mm
    speck_channel: bool = _MODEL.speck_channel
    tta_flip: bool = _MODEL.tta_flip
    breast_mask: bool = _MODEL.breast_mask
    speck_clusters: bool = _MODEL.speck_clusters
    lesion_prob: float = field(default=0.6, metadata=bounded(0.0, 1.0))
    paste: bool = False
    min_box_mm: float = field(default=0.0, metadata=bounded(0.0, 1000.0))
    max_steps: int = field(default=0, metadata=bounded(0, None))
    round_steps: Literal["labeled", "all"] = "labeled"
    head_epochs: int = field(default=1, metadata=bounded(0, 1000))
    ssl: bool = False
    fewshot: bool = True
    ssl_threshold: float = field(default=0.5, metadata=bounded(0.0, 1.0))
    ssl_consistency: Literal["dense", "pseudo_boxes", "paste"] = "dense"
    ssl_rampup_steps: int = field(default=200, metadata=bounded(0, 1_000_000))
    ssl_unsup_weight: float = field(default=1.0, metadata=bounded(0.0, 100.0))
    ssl_unlabeled_ratio: int = field(default=1, metadata=bounded(1, 64))
    ema_decay: float = field(default=0.99, metadata=bounded(0.0, 1.0))
    standardize: bool = False
    threads: int = field(default=0, metadata=bounded(0, 256))
    device: str = "auto"
    cache_root: str = ""
    eval_view: Literal["test", "all", "labeled"] = "test"
    n_boot: int = field(default=0, metadata=bounded(0, 100_000))
    dp: bool = False
    dp_epsilon: float = field(default=8.0, metadata=bounded(1e-3, 1e4))
    dp_delta: float = field(default=0.0, metadata=bounded(0.0, 0.5))
    dp_max_grad_norm: float = field(default=1.0, metadata=bounded(1e-6, 1e6))
    dp_patients_per_step: int = field(default=8, metadata=bounded(1, 1_000_000))
    dp_share_train_stats: bool = False
    reestimate_norm: bool = False
    select: bool = False
    select_validation_fraction: float = field(default=0.25, metadata=bounded(0.01, 0.9))
    select_margin: float = field(default=0.0, metadata=bounded(0.0, 1.0))
    select_candidates: str = ""
    select_head_epochs: int = field(default=5, metadata=bounded(0, 1000))

    def __post_init__(self) -> None:
        try:
            parse_candidates(self.select_candidates)
        except ValueError as exc:
            raise ValueError(f"select_candidates: {exc}") from None

    def dp_settings(self) -> DPSettings:
        """The DP-SGD settings these options imply (used when ``dp`` is on)."""
        return DPSettings(
            target_epsilon=self.dp_epsilon,
            max_grad_norm=self.dp_max_grad_norm,
            patients_per_step=self.dp_patients_per_step,
            delta=self.dp_delta,
        )

    def epoch_steps(self, n_labeled: int, n_unlabeled: int, batch_size: int) -> int:
        """Steps of one local epoch by ``round_steps`` (before ``max_steps``)."""
        n = n_labeled + (n_unlabeled if self.round_steps == "all" else 0)
        return math.ceil(n / batch_size)

    def model_config(self) -> ModelConfig:
        """The detector's :class:`ModelConfig` (the server builds the same)."""
        return detector_model_config(self.__dict__)

    def recipe(self, lr: float, batch_size: int) -> Recipe:
        """The training recipe of a site (and of the study's central regimes)."""
        return Recipe(
            lr=lr,
            batch_size=batch_size,
            lesion_prob=self.lesion_prob,
            # under DP a woman's images only get her own lesions: a lesion of
            # one woman in another's image would escape the per-woman clipping
            augment=dataclasses.replace(
                SITE_AUGMENT,
                paste=self.paste,
                paste_same_woman=self.dp,
                min_box_mm=self.min_box_mm,
            ),
        )

    def adapt_config(self, seed: int) -> AdaptConfig:
        """The client-side adaptation settings these options imply."""
        return AdaptConfig(
            ssl_enabled=self.ssl,
            consistency=self.ssl_consistency,
            ema_decay=self.ema_decay,
            rampup_steps=self.ssl_rampup_steps,
            unsup_weight=self.ssl_unsup_weight,
            unlabeled_ratio=self.ssl_unlabeled_ratio,
            score_thresholds=dict.fromkeys(CLASSES, self.ssl_threshold),
            standardize=self.standardize,
            seed=seed,
        )


def round_seed(seed: int, server_round: int) -> int:
    """The augmentation seed of ``server_round`` (round 1: ``seed`` itself)."""
    return int(seed) + 1_000_003 * (int(server_round) - 1)


def detector_options(
    fed: FederationConfig, source: str, prefix: str = "trainer.options"
) -> DetectorOptions:
    """A federation's ``trainer.options`` as typed :class:`DetectorOptions`.

    Errors name ``source`` (the file) and the key under ``prefix``.
    """
    return from_mapping(
        dict(fed.trainer.options), DetectorOptions, source=source, prefix=prefix
    )


def check_private_training(
    opts: DetectorOptions, personalization: Personalization
) -> None:
    """Refuse settings under which DP-SGD would not protect what the site sends.

    Only with ``opts.dp``. BatchNorm's running statistics are computed from the
    women's images without noise, so ``norm: batch`` needs FedBN
    (``personalization.local_norm``) to keep them on the site. The mean-teacher
    loss (``ssl``) trains on unlabeled women outside the per-woman clipping,
    and the intensity standardizer (``standardize``) is fitted on every
    woman, so one woman would move every other woman's gradient.
    """
    if not opts.dp:
        return
    src = "federation config"
    if opts.norm == "batch" and not personalization.local_norm:
        raise ConfigError(
            src,
            "trainer.options.dp",
            "DP-SGD with trainer.options.norm: batch needs personalization."
            "local_norm: true: BatchNorm running statistics are computed without "
            "noise and must never leave the site (set personalization.local_norm: "
            "true, or trainer.options.norm: group)",
        )
    if opts.ssl:
        raise ConfigError(
            src,
            "trainer.options.ssl",
            "cannot be combined with trainer.options.dp: the consistency loss on "
            "unlabeled women is outside the per-woman clipping",
        )
    if opts.standardize:
        raise ConfigError(
            src,
            "trainer.options.standardize",
            "cannot be combined with trainer.options.dp: the standardizer is "
            "fitted on every training woman without noise",
        )
    if opts.reestimate_norm:
        raise ConfigError(
            src,
            "trainer.options.reestimate_norm",
            "cannot be combined with trainer.options.dp: the statistics are "
            "estimated on every training woman without noise",
        )


def check_norm_reestimation(
    opts: DetectorOptions, personalization: Personalization
) -> None:
    """Refuse ``reestimate_norm`` where the statistics would leave the site.

    Re-estimated BatchNorm statistics describe the site's images; only FedBN
    (``personalization.local_norm``) keeps the norm layers at home.
    """
    if opts.reestimate_norm and not personalization.local_norm:
        raise ConfigError(
            "federation config",
            "trainer.options.reestimate_norm",
            "needs personalization.local_norm: true (FedBN): without it the "
            "re-estimated statistics of the site's images would be sent to the "
            "server with the shared arrays",
        )


def check_site_options(opts: DetectorOptions, personalization: Personalization) -> None:
    """Every check a site makes of its options against its personalization.

    :func:`check_private_training`, :func:`check_norm_reestimation` and no
    ``round_steps: all`` under DP; the
    site's trainer and ``mammofed-sim run`` (before any work) call this one.
    """
    check_private_training(opts, personalization)
    check_norm_reestimation(opts, personalization)
    if opts.dp and opts.round_steps != "labeled":
        raise ConfigError(
            "federation config",
            "trainer.options.round_steps",
            f"{opts.round_steps!r} with dp: true: DP-SGD draws its own women "
            "each step (Poisson sampling, its accountant's plan), so a round's "
            "steps are not set here; use round_steps: labeled",
        )


@dataclass(frozen=True)
class LocalRun:
    """What one round of local training of the shared weights did.

    Attributes:
        trained: ``False`` when nothing was trained (the DP budget is spent;
            ``reason`` says so) and the received arrays go back unchanged.
        loss: mean training loss; skipped: skipped steps (under DP: skipped
            women); examples: the ``num-examples`` to report; extra: metrics
            beyond :data:`TRAIN_METRICS` (``dp-epsilon``).
    """

    trained: bool
    loss: float
    skipped: int
    examples: int
    extra: Metrics = field(default_factory=dict)
    reason: str = ""


#: ``local_round(labeled, optimizer, extra_loss_fn, config) -> LocalRun``: how a
#: site trains the shared weights in one round (the normal epochs or DP-SGD).
LocalRound = Callable[
    [Dataset[Any], torch.optim.Optimizer, Any, FitInstructions], LocalRun
]


def check_dp_delta(dp: PatientDPSGD, n_women: int) -> float:
    """The delta ``dp`` would account at, when it is below ``1 / n_women``.

    The stored plan's delta (kept for the life of the site's accountant;
    against ``1 / n`` of the women it was planned for), else
    ``trainer.options.dp_delta``, else :func:`common.detector.dp.default_delta`
    (always below ``1 / n``). DP needs ``delta < 1 / n``: at ``delta`` 0.5 a
    mechanism may publish half the women's data and still claim any epsilon,
    so the site's ``privacy.max_epsilon`` floor would mean nothing.

    Raises:
        PrivacyError: the delta is at least ``1 / n_women``; names the run's
            setting or the accountant file, and the value.
    """
    n = max(int(n_women), 1)
    plan = dp.accountant().plan
    if plan is not None:
        # judged by the women it was planned for (a site that grew since keeps
        # its plan's default delta)
        n, delta = max(int(plan.n_patients), 1), plan.delta
        what = f"{dp.accountant_path}: the stored DP plan's delta {delta:g}"
        fix = "; it is kept for the life of that file (remove it on purpose)"
    elif dp.settings.delta > 0:
        delta = dp.settings.delta
        what, fix = f"trainer.options.dp_delta = {delta:g}", ""
    else:
        return default_delta(n)
    if delta >= 1.0 / n:
        raise PrivacyError(
            f"{what} is not below 1/n = {1.0 / n:.3g} (n = {n} training women): "
            f"at such a delta epsilon guarantees nothing{fix}"
        )
    return float(delta)


class PrivateRound:
    """Patient-level DP-SGD in place of the normal epochs (``trainer.options.dp``).

    A :data:`LocalRound` around :class:`common.detector.dp.PatientDPSGD`: Poisson draws
    of the site's labeled training women, per-woman clipped gradients plus
    Gaussian noise, the accountant in the site's state dir and the budget
    stop. The FedProx term (data-independent) is added after the noise.
    ``num-examples`` is the planned number of women (steps x q x n), not the
    draw, so the weight the server sees does not reveal who was drawn.
    """

    #: Train metrics this round adds.
    metric_names: tuple[str, ...] = DP_TRAIN_METRICS

    def __init__(
        self,
        model: nn.Module,
        opts: DetectorOptions,
        state_dir: Path,
        *,
        planned_rounds: int,
        device: torch.device,
        site: str,
    ) -> None:
        self.model = model
        self.max_steps = opts.max_steps
        self.site = site
        self.dp = PatientDPSGD(
            opts.dp_settings(), state_dir, planned_rounds=planned_rounds, device=device
        )

    def __call__(
        self,
        labeled: Dataset[Any],
        optimizer: torch.optim.Optimizer,
        extra: Any,
        config: FitInstructions,
    ) -> LocalRun:
        """Train one round under DP (or nothing when the budget would be exceeded)."""
        # a delta the run (or an earlier run's stored plan) chose may not void
        # the epsilon the site's floor checks; refused before any image is read
        check_dp_delta(self.dp, len(patient_groups(labeled)))

        def regularizer(model: nn.Module) -> Tensor:
            return extra(model, [], [])  # type: ignore[no-any-return]

        r: DPRoundResult = self.dp.run_round(
            self.model,
            optimizer,
            labeled,
            epochs=config.local_epochs,
            max_steps=self.max_steps,
            regularizer=None if extra is None else regularizer,
            label=f"site {self.site} round {config.server_round}:",
        )
        metrics: Metrics = {DP_EPSILON: float(r.epsilon)}
        if not r.trained:
            return LocalRun(False, 0.0, 0, 1, metrics, r.reason)
        # a round whose draws were all empty has no loss: NaN, which the site's
        # history keeps and a reply leaves out (never a made-up 0)
        loss = r.mean_loss
        examples = max(1, round(r.expected_women))
        return LocalRun(True, loss, r.skipped, examples, metrics)


class DetectorTrainer:
    """Federated local training of the FCOS lesion detector on one site."""

    def __init__(
        self,
        site: str,
        state_dir: Path,
        fed_cfg: FederationConfig,
        data_dir: Path | None = None,
        adapt_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.site = site
        self.fed_cfg = fed_cfg
        #: train metrics of the last :meth:`fit` that were NOT sent (their true
        #: values; the reply carries 0): recorded in the site's own history
        self.withheld: Metrics = {}
        self.opts = detector_options(fed_cfg, "federation config")
        #: the site's adaptation settings: the federation's, then its own overrides
        self.adapt = apply_overrides(
            self.opts.adapt_config(fed_cfg.seed),
            adapt_overrides or {},
            source=f"site {site} config",
        )
        if data_dir is None:
            if not self.opts.cache_root:
                raise ConfigError(
                    "federation config",
                    "trainer.options.cache_root",
                    f"site {site!r} has no data dir in its node config and no "
                    "cache_root is set",
                )
            data_dir = Path(self.opts.cache_root) / site
        self.data_dir = Path(data_dir)
        self.state = SiteState(state_dir, site)
        self.device = resolve_device(self.opts.device)
        if self.opts.threads > 0:
            torch.set_num_threads(self.opts.threads)
        self.personalization = fed_cfg.personalization
        check_site_options(self.opts, self.personalization)
        seed_everything(fed_cfg.seed)
        self.model = build_detector(self.opts.model_config())
        #: composes the site's model and owns its personal files
        self.site_model = SiteModel(self.model, self.personalization, self.state)
        self.shared_keys = self.site_model.shared_keys
        self.head_keys = self.site_model.head_keys
        self._dataset: SiteDataset | None = None
        self._standardizer: HistogramStandardizer | None = None
        # how the shared weights are trained: the normal epochs, or DP-SGD
        self._local_round: LocalRound = self._standard_round
        self._extra_train_metrics: tuple[str, ...] = ()
        if self.opts.dp:
            private = PrivateRound(
                self.model,
                self.opts,
                self.site_model.accountant_dir,
                planned_rounds=fed_cfg.num_rounds,
                device=self.device,
                site=site,
            )
            self._local_round = private
            self._extra_train_metrics = private.metric_names
        #: the site's choice of its own model (``select``; ``client.selection``)
        self.select_settings = self._select_settings()
        self._held_out: frozenset[str] | None = None
        self._selector: Selector | None = None

    def _select_settings(self) -> SelectSettings | None:
        """The choice's settings; a named candidate the run cannot build raises."""
        if not self.opts.select:
            return None
        asked = self.opts.select_candidates
        names, why = applicable(
            parse_candidates(asked),
            self.personalization,
            batch_norm=any(
                isinstance(m, nn.modules.batchnorm._BatchNorm)
                for m in self.model.modules()
            ),
            head_epochs=self.opts.select_head_epochs,
        )
        if asked.strip() and why:
            name, reason = next(iter(why.items()))
            raise ConfigError(
                "federation config",
                "trainer.options.select_candidates",
                f"names {name!r} ({asked!r}) but this run cannot build it: {reason}",
            )
        return SelectSettings(
            fraction=self.opts.select_validation_fraction,
            margin=self.opts.select_margin,
            candidates=names,
            head_epochs=self.opts.select_head_epochs,
            final_round=self.fed_cfg.num_rounds,
        )

    # --- what crosses the network -------------------------------------------------
    def shared_spec(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the shared arrays (the only arrays ever sent)."""
        sd = self.model.state_dict()
        return {k: tuple(sd[k].shape) for k in self.shared_keys}

    def metric_names(self, phase: str) -> tuple[str, ...]:
        """Metric names of ``train`` and ``evaluate`` replies (same on every site)."""
        if phase == "train":
            return TRAIN_METRICS + self._extra_train_metrics
        if self.select_settings is not None and not self.opts.dp:
            return (*EVAL_METRICS, SELECTED_MODEL)
        return EVAL_METRICS

    def initial_shared(self) -> Arrays:
        """Shared arrays of a freshly seeded model."""
        seed_everything(self.fed_cfg.seed)
        fresh = build_detector(self.opts.model_config())
        sd = fresh.state_dict()
        return {k: sd[k].detach().cpu().numpy().copy() for k in self.shared_keys}

    # --- site data ----------------------------------------------------------------
    @property
    def dataset(self) -> SiteDataset:
        """The site's cache (loaded once per trainer)."""
        if self._dataset is None:
            if not self.data_dir.is_dir():
                raise MammofedError(
                    f"site {self.site}: data dir {self.data_dir} does not exist"
                )
            self._dataset = SiteDataset(
                self.data_dir,
                test_fraction=TEST_FRACTION,
                seed=self.fed_cfg.seed,
                model_spacing_mm=self.opts.working_spacing_mm,
            )
        return self._dataset

    def standardizer(self) -> HistogramStandardizer | None:
        """The site's fitted standardizer (fitted once, kept in the site state)."""
        if not self.opts.standardize:
            return None
        if self._standardizer is None:
            path = self.site_model.standardizer_path
            if path.is_file():
                self._standardizer = HistogramStandardizer.load(path)
            else:
                view = self._site_view("train")
                n = len(view)  # type: ignore[arg-type]
                images = (view[i][0] for i in range(n))
                cfg = self.adapt
                self._standardizer = HistogramStandardizer.fit(images, cfg)
                self._standardizer.save(path)
                log.info("site %s: fitted intensity standardizer", self.site)
        return self._standardizer

    @property
    def held_out(self) -> frozenset[str]:
        """Validation women (patient ids) kept out of local training (``select``).

        :func:`client.selection.validation_women` of the labeled training
        women, seeded by the run's seed; empty without ``select``.
        """
        if self.select_settings is None:
            return frozenset()
        if self._held_out is None:
            ds = self.dataset
            women: dict[str, bool] = {}
            for i in ds.indices("labeled"):
                r = ds.records[i]
                women[r.patient_id] = women.get(r.patient_id, False) or r.has_lesion
            self._held_out = validation_women(
                women, self.select_settings.fraction, self.fed_cfg.seed
            )
        return self._held_out

    def _indices(self, name: str) -> list[int]:
        """Record indices of view ``name`` without the held-out women."""
        held = self.held_out
        idx = self.dataset.indices(name)
        return [i for i in idx if self.dataset.records[i].patient_id not in held]

    def _site_view(self, name: str) -> Dataset[Any]:
        """View ``name`` of the cache that local training may use."""
        if not self.held_out:
            return self.dataset.view(name)
        return self.dataset.subset(self._indices(name), hide_labels=name == "unlabeled")

    def training_images(self) -> Dataset[Any]:
        """Every training image local work may use, standardized, not augmented.

        Labeled or not; never a test woman, nor a held-out validation woman:
        what BatchNorm statistics are re-estimated on.
        """
        return self._view("train", train=False)

    def validation_view(self) -> Dataset[Any]:
        """The held-out women's labeled images (standardized like the others)."""
        held = self.held_out
        ds = self.dataset
        idx = [i for i in ds.indices("labeled") if ds.records[i].patient_id in held]
        base: Dataset[Any] = ds.subset(idx)
        std = self.standardizer()
        return base if std is None else Transformed(base, std)

    def _view(self, name: str, *, train: bool, server_round: int = 1) -> Dataset[Any]:
        """The site's ``name`` view, standardized.

        ``train``: with the recipe's augmentations, drawn from a generator of
        the run's seed and ``server_round`` (round 1: the run's seed, as
        central training's first epoch), so that every round augments
        differently.
        """
        base: Dataset[Any] = self._site_view(name)
        std = self.standardizer()
        if std is not None:
            base = Transformed(base, std)
        if train:
            g = torch.Generator().manual_seed(
                round_seed(self.fed_cfg.seed, server_round)
            )
            recipe = self.opts.recipe(self.fed_cfg.trainer.learning_rate, 1)
            base = Transformed(base, train_transform(recipe.augment, g, base))
        return base

    # --- model assembly -----------------------------------------------------------
    def compose(
        self, shared: Arrays, *, personal_head: bool | None = None
    ) -> nn.Module:
        """``self.model`` on its device: global ``shared`` + the site's personal arrays.

        ``personal_head``: compose the personal head too (default: when the run
        has one); see :meth:`SiteModel.compose`.
        """
        self.site_model.compose(shared, personal_head=personal_head)
        return self.model.to(self.device)

    # --- federated rounds ---------------------------------------------------------
    def fit(self, shared: Arrays, config: FitInstructions) -> tuple[Arrays, Metrics]:
        """Train locally from the global ``shared`` arrays for one round.

        Returns the updated shared arrays and ``train-loss``, ``skipped-steps``
        and ``num-examples`` (images seen; under DP the planned number of
        women), plus ``dp-epsilon`` under DP. The FedProx term ``mu/2 *
        ||w - w_global||^2`` over shared parameters is applied when the server
        sends ``proximal-mu > 0``. When the DP budget would be exceeded the
        received arrays go back unchanged (``num-examples`` 1, the least the
        server accepts) and nothing is trained, the personal head included.
        With ``select`` the site first keeps what it received as its base
        model (when it has none yet, or at round 1).
        """
        if self.selector is not None:
            self.selector.remember_base(
                self._fresh_state, shared, first_round=config.server_round == 1
            )
        seed_everything(self.fed_cfg.seed + config.server_round)
        self.compose(shared, personal_head=False)
        labeled = self._view("labeled", train=True, server_round=config.server_round)
        n_lab = len(labeled)  # type: ignore[arg-type]
        if n_lab == 0:
            raise MammofedError(f"site {self.site}: no labeled training images")
        frozen_keys = self._fewshot_frozen(n_lab, config.server_round)
        with fs.frozen(self.model, frozen_keys):
            params = [p for p in self.model.parameters() if p.requires_grad]
            recipe = self.opts.recipe(config.learning_rate, config.batch_size)
            optimizer = recipe.optimizer(params)
            extra = self._proximal(shared, config.proximal_mu)
            run = self._local_round(labeled, optimizer, extra, config)
        if run.trained:
            sd = self.model.state_dict()
            out = {k: sd[k].detach().cpu().numpy().copy() for k in self.shared_keys}
            # frozen shared tensors go back exactly as received (BatchNorm
            # running statistics of a frozen layer included)
            for k in frozen_keys:
                if k in out:
                    out[k] = np.asarray(shared[k]).copy()
            if self.opts.reestimate_norm:
                # the site's statistics for the weights it now has (FedBN keeps
                # them at home); the head is tuned on top of them
                reestimate_norm_stats(self.model, self.training_images(), self.device)
            self.site_model.save_personal(self._finetune_personal_head())
        else:
            log.warning(
                "site %s round %d: %s; replying the received shared arrays unchanged",
                self.site,
                config.server_round,
                run.reason,
            )
            out = {k: np.asarray(shared[k]).copy() for k in self.shared_keys}
        metrics: Metrics = {
            NUM_EXAMPLES: int(run.examples),
            TRAIN_LOSS: float(run.loss),
            SKIPPED_STEPS: int(run.skipped),
            **run.extra,
        }
        log.info(
            "site %s round %d: loss %.4f over %d examples (%d skipped)%s",
            self.site,
            config.server_round,
            metrics[TRAIN_LOSS],
            run.examples,
            run.skipped,
            "".join(f", {k} {v:.4g}" for k, v in run.extra.items()),
        )
        self.withheld = {}
        if self.opts.dp and not self.opts.dp_share_train_stats:
            # data-dependent scalars outside the guarantee: kept on the site
            self.withheld = {k: metrics[k] for k in (TRAIN_LOSS, SKIPPED_STEPS)}
            metrics[TRAIN_LOSS] = 0.0
            metrics[SKIPPED_STEPS] = 0
        return out, metrics

    def _fewshot_frozen(self, n_labeled: int, server_round: int) -> list[str]:
        """Shared non-head keys to freeze this round (TFA-style few-shot site).

        Automatic (with the ``fewshot`` option, on by default) when the site
        has fewer than ``fewshot_max_labeled`` labeled
        training images and no unlabeled images for semi-supervision (a
        semi-supervised site trains every layer with its consistency loss);
        the site config's ``adapt.head_only`` forces it either way. Never
        under DP (its clipping covers all trainable parameters as planned).
        """
        auto = self.opts.fewshot and fs.few_labels(
            n_labeled,
            len(self._indices("unlabeled")) if self.opts.ssl else 0,
            self.adapt,
            ssl=self.opts.ssl,
        )
        head_only = self.adapt.head_only if self.adapt.head_only is not None else auto
        if not head_only or self.opts.dp:
            return []
        keys = fs.fewshot_frozen_keys(self.model, self.personalization)
        log.info(
            "site %s round %d: few-shot site (%d labeled images, limit %d%s): "
            "training the head only, %d shared tensors frozen",
            self.site,
            server_round,
            n_labeled,
            self.adapt.fewshot_max_labeled,
            ", forced by the site config" if self.adapt.head_only else "",
            len(keys),
        )
        return keys

    def _standard_round(
        self,
        labeled: Dataset[Any],
        optimizer: torch.optim.Optimizer,
        extra: Any,
        config: FitInstructions,
    ) -> LocalRun:
        """The normal local round: ``local_epochs`` lesion-balanced epochs (+ SSL).

        The recipe of ``client.local_training.train_central`` (sampler of epoch ``e``
        seeded ``seed + e``): one round on one site is one central epoch. Local
        epoch ``e`` of round ``r`` draws as central epoch ``(r - 1) *
        local_epochs + e`` would: a round once drew the same images in the same
        order every time, and about a third of a site's labeled images (the
        sampler draws with replacement) never trained the federation.
        """
        recipe = self.opts.recipe(config.learning_rate, config.batch_size)
        # one epoch: a pass over the labeled images (round_steps "all": over
        # every training image, labeled or not), capped at max_steps
        n_unlabeled = len(self._indices("unlabeled"))
        steps = self.opts.epoch_steps(
            len(labeled),  # type: ignore[arg-type]
            n_unlabeled,
            recipe.batch_size,
        )
        steps = min(steps, self.opts.max_steps or steps)
        seed = self.fed_cfg.seed + (config.server_round - 1) * config.local_epochs
        if self.opts.ssl and n_unlabeled > 0:
            if config.proximal_mu > 0:
                log.warning(
                    "site %s round %d: the server sent proximal-mu %g, but a "
                    "semi-supervised round has no proximal term: trained without it",
                    self.site,
                    config.server_round,
                    config.proximal_mu,
                )
            runs = self._ssl_epochs(
                [
                    recipe.loader(labeled, steps * recipe.batch_size, seed + e)
                    for e in range(config.local_epochs)
                ],
                optimizer,
                steps,
            )
        else:
            runs = [
                (s.mean_loss, s.skipped_steps, s.images)
                for s in train_epochs(
                    self.model,
                    labeled,
                    recipe,
                    optimizer,
                    epochs=config.local_epochs,
                    steps=steps,
                    seed=seed,
                    device=self.device,
                    extra_loss_fn=extra,
                )  # fmt: skip
            ]
        finite = [r[0] for r in runs if math.isfinite(r[0])]
        loss = float(np.mean(finite)) if finite else float("nan")
        return LocalRun(True, loss, sum(r[1] for r in runs), sum(r[2] for r in runs))

    def _proximal(self, shared: Arrays, mu: float) -> Any:
        if mu <= 0:
            return None
        named = dict(self.model.named_parameters())
        anchors = {
            k: torch.as_tensor(np.asarray(shared[k]), device=self.device)
            for k in self.shared_keys
            if k in named
        }

        def prox(model: nn.Module, images: Any, targets: Any) -> Tensor:
            terms = [((named[k] - a) ** 2).sum() for k, a in anchors.items()]
            return 0.5 * mu * torch.stack(terms).sum()

        return prox

    def _ssl_epochs(
        self,
        loaders: list[DataLoader],
        optimizer: torch.optim.Optimizer,
        steps: int,
    ) -> list[tuple[float, int, int]]:
        """The round's semi-supervised passes, one per labeled loader (epoch).

        Each pass: labeled FCOS loss + teacher consistency. One teacher per
        round: loaded once (and with ``teacher_sync: copy_shared`` given the
        new global layers once, before the first pass), carried with its EMA
        and its ramp-up step through every local epoch, saved after the last.
        The FedProx term is not applied here (``local_round`` takes none).
        """
        cfg = self.adapt
        teacher_path = self.site_model.teacher_path
        teacher, step = load_or_create_teacher(teacher_path, self.model, cfg)
        if cfg.teacher_sync == "copy_shared":
            teacher.sync_shared(self.model, self.shared_keys)
        unl = self._view("unlabeled", train=False)
        lesions = (
            self._view("labeled", train=False) if cfg.consistency == "paste" else None
        )
        runs = []
        for loader in loaders:
            unl_loader = DataLoader(
                unl, batch_size=loader.batch_size, shuffle=True, collate_fn=collate
            )
            stats = local_round(
                self.model,
                teacher,
                loader,
                unl_loader,
                optimizer,
                cfg,
                self.device,
                step,
                max_steps=steps,
                lesions=lesions,
            )
            step = stats.step
            loss = stats.sup_loss + stats.unsup_weight * stats.unsup_loss
            # an unlabeled image counts toward the site's averaging weight only
            # where its loss reaches the update: with ``ssl_unsup_weight`` 0 the
            # shared layers learn from the labeled images alone (the unlabeled
            # ones move only the site's own norm statistics)
            counted = stats.unlabeled_images if cfg.unsup_weight > 0 else 0
            images = stats.labeled_images + counted
            runs.append((float(loss), int(stats.skipped_steps), int(images)))
        # pending until the server keeps this round (client.state)
        teacher.save(self.site_model.teacher_write_path(), step=step)
        return runs

    def _finetune_personal_head(
        self, *, from_global: bool = False, epochs: int | None = None
    ) -> dict[str, np.ndarray] | None:
        """FedPer: head-only fine-tuning of the site's personal head copy.

        Starts from the stored personal head (or the freshly trained global head
        on the first round; always the model's current global head with
        ``from_global``) and tunes it with :func:`common.detector.adapt.finetune_head`,
        the site's few-shot path (``adapt.fewshot_lr``, ``_weight_decay``,
        ``_batch_size``, strong augmentation; every non-head tensor frozen,
        norm layers in eval mode) for ``epochs`` (default ``head_epochs``)
        epochs on the labeled view. Returns the personal head arrays; the
        model's global head is restored.
        """
        epochs = self.opts.head_epochs if epochs is None else epochs
        if not self.personalization.personal_head or epochs == 0:
            return None
        sd = self.model.state_dict()
        global_head = {k: sd[k].detach().clone() for k in self.head_keys}
        stored = {} if from_global else (self.state.load_personal() or {})
        heads = {k: v for k, v in stored.items() if k.startswith(PERSONAL_HEAD_PREFIX)}
        # the head only: compose() would lay the server's personal defaults
        # over the norm layers this round has just trained (FedBN)
        self.site_model.load_head(heads)
        head = {PERSONAL_HEAD_PREFIX + k: v for k, v in self._tune_head(epochs).items()}
        sd = self.model.state_dict()
        sd.update(global_head)
        self.model.load_state_dict(sd)
        return head

    def _tune_head(self, epochs: int) -> dict[str, np.ndarray]:
        """Tune the loaded model's head on the training labels; its tensors.

        :func:`common.detector.adapt.finetune_head`, head only (every other
        tensor frozen, norm layers in eval mode), ``epochs`` epochs on the
        labeled view local training uses. Returns the head (model keys); the
        model keeps it.
        """
        frozen = [k for k in self.model.state_dict() if k not in set(self.head_keys)]
        fs.finetune_head(
            self.model, self._view("labeled", train=False), frozen, self.adapt,
            device=self.device, head_only=True, epochs=epochs,
        )  # fmt: skip
        sd = self.model.state_dict()
        return {k: sd[k].detach().cpu().numpy().copy() for k in self.head_keys}

    # --- the site's choice of its own model (``select``) --------------------------
    def _fresh_state(self) -> dict[str, np.ndarray]:
        """Every tensor of a freshly seeded model (the global RNG is left alone)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.fed_cfg.seed)
            sd = build_detector(self.opts.model_config()).state_dict()
        return {k: v.detach().cpu().numpy().copy() for k, v in sd.items()}

    def _score(self, model: nn.Module, view: Dataset[Any]) -> dict[str, float]:
        """``{class: CPM}`` of ``model`` on ``view`` (NaN: no lesion of it)."""
        r = evaluate_detailed(model, view, self.device, n_boot=0)
        return {c: float(f.cpm) for c, f in r.per_class.items()}

    @property
    def selector(self) -> Selector | None:
        """The site's :class:`client.selection.Selector` (``None``: no ``select``)."""
        settings = self.select_settings
        if settings is None:
            return None
        if self._selector is None:
            self._selector = Selector(
                self.site_model,
                SelectionStore(self.state),
                settings,
                validation=self.validation_view(),
                train_images=self.training_images(),
                evaluate=self._score,
                tune_head=lambda: self._tune_head(settings.head_epochs),
                device=self.device,
            )
        return self._selector

    def select(self, shared: Arrays, server_round: int | None) -> Selection:
        """The site's choice for the global ``shared`` arrays (made, or as recorded).

        ``server_round`` ``None``: the recorded choice for these arrays, else
        they are taken for the final round's. Raises without ``select``.
        """
        selector = self.selector
        if selector is None:
            raise MammofedError(
                f"site {self.site}: trainer.options.select is off: no choice"
            )
        selector.remember_base(self._fresh_state, shared, first_round=False)
        return selector.select(shared, server_round)

    def evaluate(self, shared: Arrays, config: FitInstructions) -> Metrics:
        """CPM per class of the site's own model on its held-out test women.

        With ``select`` the site first makes its choice for ``shared``
        (:meth:`select`; its index is the ``selected-model`` metric, not sent
        under DP) and scores the chosen model.
        """
        extra: Metrics = {}
        if self.selector is not None:
            choice = self.select(shared, config.server_round).choice
            if SELECTED_MODEL in self.metric_names("evaluate"):
                extra[SELECTED_MODEL] = candidate_index(choice)
        if not self.dataset.indices(self.opts.eval_view):
            log.warning(
                "site %s: %s view is empty; CPM reported as NaN",
                self.site,
                self.opts.eval_view,
            )
            nan = {k: 0 if k == NUM_EXAMPLES else math.nan for k in EVAL_METRICS}
            return {**nan, **extra}
        m = self.evaluate_detailed(shared, server_round=config.server_round).metrics
        return {
            **{
                k: int(m[k]) if k == NUM_EXAMPLES else float(m[k]) for k in EVAL_METRICS
            },
            **extra,
        }

    def site_model_for(
        self, shared: Arrays, server_round: int | None = None
    ) -> nn.Module:
        """The site's own model for ``shared`` on its device.

        Without ``select``: the global arrays + the site's personal state
        (:meth:`compose`); with it: the candidate the site chose
        (:meth:`select`, :func:`client.selection.compose_candidate`).
        """
        selector = self.selector
        if selector is None:
            return self.compose(shared)
        return selector.compose(shared, self.select(shared, server_round).choice)

    def evaluate_detailed(
        self, shared: Arrays, *, server_round: int | None = None, **kwargs: Any
    ) -> Any:
        """Full :class:`common.detector.engine.EvalResult` of the site's own model.

        The model is :meth:`site_model_for` ``(shared, server_round)``.
        """
        model = self.site_model_for(shared, server_round)
        view = self._view(self.opts.eval_view, train=False)
        kwargs.setdefault("n_boot", self.opts.n_boot)
        return evaluate_detailed(model, view, self.device, **kwargs)


#: The ``detector`` trainer's registry factory.
make_detector_trainer = register_trainer(DETECTOR_TRAINER)(DetectorTrainer)
