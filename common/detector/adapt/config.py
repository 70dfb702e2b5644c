"""Typed configuration of client-side adaptation (YAML -> frozen dataclass).

Load with ``common.config.load_config(path, AdaptConfig)`` (or
``from_mapping`` on the ``adapt:`` section of a site config). Every value is
used inside the hospital client only; nothing here is sent over the network.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from common.config.loader import bounded, config_to_dict, from_mapping
from common.errors import ConfigError
from common.keys import CALCIFICATION, CLASSES, MASS

#: Percentiles (of breast pixels) used as histogram landmarks by default:
#: the Nyúl–Udupa ends (1, 99) plus the deciles.
DEFAULT_PERCENTILES: tuple[float, ...] = (1.0, *(10.0 * d for d in range(1, 10)), 99.0)
#: Common intensity scale (values in ``[0, 1]``) the landmarks map to; same
#: length as :data:`DEFAULT_PERCENTILES`. Overridden by the scenario/server
#: config so every site maps to the same scale.
DEFAULT_STANDARD_SCALE: tuple[float, ...] = (
    0.05,
    0.20,
    0.28,
    0.35,
    0.42,
    0.49,
    0.56,
    0.63,
    0.71,
    0.80,
    0.95,
)

UnsupLoss = Literal["classification", "bbox_regression", "bbox_ctrness"]


def _default_thresholds() -> dict[str, float]:
    return {MASS: 0.5, CALCIFICATION: 0.5}


@dataclass(frozen=True)
class AdaptConfig:
    """Client-side adaptation settings (semi-supervision, few-shot, standardization).

    Attributes:
        ssl_enabled: train on unlabeled images with a mean teacher.
        consistency: ``pseudo_boxes`` (Unbiased Teacher: thresholded teacher
            detections as hard targets of the student's FCOS loss on a
            strongly augmented view) or ``dense`` (Dense Teacher: soft teacher
            targets on every FCOS location's class and centre-ness map; the
            strong view then differs only photometrically). Default ``dense``,
            chosen by measurement (docs/adaptation.md): with a teacher that is
            not yet confident, thresholded pseudo boxes were either almost
            absent (0.5) or noisy enough to hurt (0.3). ``paste``
            (copy-paste self-training, Ghiasi et al. 2021): lesions cut from
            the site's labeled images are pasted into its unlabeled ones and
            the student's whole FCOS loss trains on them there; the teacher's
            findings on the unlabeled image scoring at least the class
            threshold join as pseudo boxes, those scoring at least
            ``paste_ignore_score`` below it become ignore regions (an
            unlabeled woman's own lesion is then not taught as background).
        ema_decay: teacher = decay * teacher + (1 - decay) * student, per step.
        teacher_sync: what happens to the teacher's *shared* tensors when a new
            global model arrives: ``copy_shared`` overwrites them with the
            global ones (personal tensors keep their EMA), ``keep`` leaves the
            teacher untouched.
        rampup_steps: optimizer steps over which the unsupervised weight rises
            along ``exp(-5 (1 - t)^2)`` (Laine & Aila); 0 means no ramp.
        unsup_weight: weight of the unsupervised loss after the ramp.
        score_thresholds: per class name (``common.keys.CLASSES``), the teacher
            score a detection needs to become a pseudo box.
        unlabeled_ratio: unlabeled batches per labeled batch in one step.
        unsup_losses: which FCOS loss terms the pseudo boxes train (Unbiased
            Teacher keeps only classification: pseudo boxes are imprecise).
        dense_top_fraction: ``dense`` mode: fraction of locations (by teacher
            score) treated as positives for the centre-ness target.
        paste_ignore_score: ``paste`` mode: the teacher score from which a
            finding below the pseudo-box threshold becomes an ignore region.
        paste_max: ``paste`` mode: lesions pasted per unlabeled image (1..n).
        fewshot_max_labeled: below this many labeled images the client picks
            head-only fine-tuning automatically.
        head_only: ``None`` = automatic (above), ``True``/``False`` forces it.
        fewshot_folds: folds of the patient-grouped cross-validation that
            picks the number of fine-tuning epochs.
        fewshot_max_epochs: most epochs tried per fold.
        fewshot_patience: epochs without a better validation loss before a
            fold stops.
        fewshot_lr: AdamW learning rate of few-shot fine-tuning.
        fewshot_weight_decay: AdamW weight decay of few-shot fine-tuning.
        fewshot_batch_size: images per few-shot step.
        standardize: map intensities through site-fitted histogram landmarks.
        percentiles: percentiles of breast pixels used as landmarks (strictly
            increasing, within ``[0, 100]``).
        standard_scale: the common scale (values in ``[0, 1]``, strictly
            increasing, same length as ``percentiles``) the landmarks map to.
        breast_threshold: model-space pixels above this value count as breast
            when fitting and applying landmarks (background stays as is).
        seed: seed of the client's augmentation random generator.
    """

    ssl_enabled: bool = True
    consistency: Literal["pseudo_boxes", "dense", "paste"] = "dense"
    ema_decay: float = field(default=0.99, metadata=bounded(0.0, 1.0))
    teacher_sync: Literal["copy_shared", "keep"] = "copy_shared"
    rampup_steps: int = field(default=200, metadata=bounded(0, None))
    unsup_weight: float = field(default=1.0, metadata=bounded(0.0, None))
    score_thresholds: dict[str, float] = field(default_factory=_default_thresholds)
    unlabeled_ratio: int = field(default=1, metadata=bounded(0, 64))
    unsup_losses: tuple[UnsupLoss, ...] = ("classification",)
    dense_top_fraction: float = field(default=0.01, metadata=bounded(0.0, 1.0))
    paste_ignore_score: float = field(default=0.3, metadata=bounded(0.0, 1.0))
    paste_max: int = field(default=2, metadata=bounded(1, 16))
    fewshot_max_labeled: int = field(default=50, metadata=bounded(0, None))
    head_only: bool | None = None
    fewshot_folds: int = field(default=3, metadata=bounded(2, 20))
    fewshot_max_epochs: int = field(default=30, metadata=bounded(1, 10000))
    fewshot_patience: int = field(default=5, metadata=bounded(1, 10000))
    fewshot_lr: float = field(default=1e-3, metadata=bounded(0.0, 10.0))
    fewshot_weight_decay: float = field(default=1e-4, metadata=bounded(0.0, 1.0))
    fewshot_batch_size: int = field(default=4, metadata=bounded(1, 1024))
    standardize: bool = False
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    standard_scale: tuple[float, ...] = DEFAULT_STANDARD_SCALE
    breast_threshold: float = field(default=0.02, metadata=bounded(0.0, 1.0))
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.score_thresholds) - set(CLASSES))
        if unknown:
            raise ValueError(
                f"score_thresholds: unknown class {unknown[0]!r} "
                f"(valid: {', '.join(CLASSES)})"
            )
        for name, thr in self.score_thresholds.items():
            if not 0.0 <= thr <= 1.0:
                raise ValueError(
                    f"score_thresholds.{name}: must be in [0, 1], got {thr!r}"
                )
        if not self.unsup_losses:
            raise ValueError("unsup_losses: must name at least one loss term")
        if len(self.percentiles) < 2:
            raise ValueError(f"percentiles: need at least 2, got {self.percentiles!r}")
        if len(self.percentiles) != len(self.standard_scale):
            raise ValueError(
                f"standard_scale: must have {len(self.percentiles)} values "
                f"(one per percentile), got {self.standard_scale!r}"
            )
        _check_increasing("percentiles", self.percentiles, 0.0, 100.0)
        _check_increasing("standard_scale", self.standard_scale, 0.0, 1.0)

    def thresholds_by_label(self) -> tuple[float, ...]:
        """Pseudo-box score thresholds indexed by label (``CLASSES`` order).

        A class missing from ``score_thresholds`` gets 1.0 plus a hair, i.e. it
        never produces pseudo boxes.
        """
        return tuple(self.score_thresholds.get(name, 1.0 + 1e-6) for name in CLASSES)


def _check_increasing(
    name: str, values: tuple[float, ...], lo: float, hi: float
) -> None:
    for i, v in enumerate(values):
        if not lo <= v <= hi:
            raise ValueError(f"{name}[{i}]: must be in [{lo}, {hi}], got {v!r}")
        if i and v <= values[i - 1]:
            raise ValueError(f"{name}: must be strictly increasing, got {values!r}")


#: AdaptConfig fields a site may not override (the federation decides them).
FEDERATION_FIXED: frozenset[str] = frozenset({"ssl_enabled", "standardize", "seed"})


def apply_overrides(
    base: AdaptConfig,
    overrides: Mapping[str, Any],
    *,
    source: str = "site config",
    prefix: str = "adapt",
) -> AdaptConfig:
    """``base`` with a site's ``overrides`` (AdaptConfig field names) applied.

    Validated like any config (unknown key, type, range, threshold classes);
    raises :class:`ConfigError` naming ``source`` and ``prefix.key``.
    """
    if not overrides:
        return base
    fixed = sorted(set(overrides) & FEDERATION_FIXED)
    if fixed:
        raise ConfigError(
            source,
            f"{prefix}.{fixed[0]}",
            "is set for every site by the federation's trainer options "
            "(ssl, standardize) and the run's seed; a site cannot override it",
        )
    data = {**config_to_dict(base), **dict(overrides)}
    return from_mapping(data, AdaptConfig, source=source, prefix=prefix)


def validate_overrides(overrides: Mapping[str, Any], prefix: str = "adapt") -> None:
    """Check ``overrides`` on the defaults; ``ValueError("<prefix.key>: why")``.

    For ``__post_init__`` of configs that carry overrides: the config loader
    turns the ``ValueError`` into a :class:`ConfigError` naming the file.
    """
    try:
        apply_overrides(AdaptConfig(), overrides, source="", prefix=prefix)
    except ConfigError as exc:
        raise ValueError(f"{exc.key}: {exc.detail}") from None
