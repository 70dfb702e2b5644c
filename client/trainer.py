"""The local-training interface the ClientApp drives, and its registry.

A :class:`LocalTrainer` owns a site's model and data. The ClientApp hands it the
global *shared* arrays and the round's :class:`common.wire.federation.FitInstructions`
and sends back only what :meth:`LocalTrainer.shared_spec` declares. Personal
state (FedBN norm layers, FedPer head, ...) stays with the trainer, which keeps
it on the site's disk through :class:`client.state.SiteState`.

Register a trainer with :func:`register_trainer`; the detector trainer is a
one-file addition that calls it at import time and is listed in
:data:`TRAINER_MODULES` so the registry imports it on demand.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from common.config.site import SitePrivacy
from common.errors import ConfigError
from common.keys import DETECTOR_TRAINER
from common.wire.federation import FederationConfig, FitInstructions

log = logging.getLogger(__name__)

Metrics = dict[str, float | int]
Arrays = dict[str, np.ndarray]


@runtime_checkable
class LocalTrainer(Protocol):
    """What a site's trainer provides to the federation client."""

    site: str

    def shared_spec(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the arrays exchanged with the server."""
        ...

    def metric_names(self, phase: str) -> tuple[str, ...]:
        """Exact metric names returned by ``phase`` (``train`` or ``evaluate``)."""
        ...

    def initial_shared(self) -> Arrays:
        """The shared arrays of a freshly initialized model (seeded)."""
        ...

    def fit(self, shared: Arrays, config: FitInstructions) -> tuple[Arrays, Metrics]:
        """Train locally from ``shared``; return updated shared arrays and metrics.

        Metrics include ``num-examples`` (the examples trained on).
        """
        ...

    def evaluate(self, shared: Arrays, config: FitInstructions) -> Metrics:
        """Evaluate ``shared`` + this site's personal state on local held-out data."""
        ...


TrainerFactory = Callable[..., LocalTrainer]

#: name -> factory(site, state_dir, fed_cfg, data_dir=None, adapt_overrides=None)
TRAINERS: dict[str, TrainerFactory] = {}

#: Modules imported on demand so that their trainers register themselves.
TRAINER_MODULES: tuple[str, ...] = ("client.toy", "client.detector_trainer")


def register_trainer(name: str) -> Callable[[TrainerFactory], TrainerFactory]:
    """Decorator registering a trainer factory under ``name``."""

    def deco(factory: TrainerFactory) -> TrainerFactory:
        if name in TRAINERS and TRAINERS[name] is not factory:
            raise ValueError(f"trainer {name!r} is already registered")
        TRAINERS[name] = factory
        return factory

    return deco


def available_trainers() -> tuple[str, ...]:
    """Registered trainer names (importing the known trainer modules first)."""
    for mod in TRAINER_MODULES:
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)
    return tuple(sorted(TRAINERS))


def build_trainer(
    name: str,
    site: str,
    state_dir: Path,
    fed_cfg: FederationConfig,
    data_dir: Path | None = None,
    adapt_overrides: Mapping[str, Any] | None = None,
) -> LocalTrainer:
    """Construct trainer ``name`` for ``site``; unknown names list valid ones.

    ``adapt_overrides`` (the site config's ``adapt`` section) reaches trainers
    that adapt to the site (the detector); others ignore it.
    """
    valid = available_trainers()
    if name not in TRAINERS:
        raise ConfigError(
            "federation config",
            "trainer.name",
            f"unknown trainer {name!r} (valid names: {', '.join(valid)})",
        )
    trainer = TRAINERS[name](
        site,
        Path(state_dir),
        fed_cfg,
        data_dir=data_dir,
        adapt_overrides=dict(adapt_overrides or {}),
    )
    log.info("site %s: built trainer %s", site, name)
    return trainer


def check_privacy_floor(
    fed_cfg: FederationConfig, floor: SitePrivacy | None, source: str
) -> None:
    """Refuse a run whose privacy is below this site's own floor.

    ``floor`` comes from the site config (``source``), not from the run: the
    run's ``trainer.options`` are chosen by whoever launches it. With
    ``floor.max_epsilon`` the run must train with patient-level DP-SGD
    (``dp: true``, the detector trainer) at a target ``dp_epsilon`` of at most
    that, and may not send what the guarantee does not cover: un-noised
    training statistics (``dp_share_train_stats``) or evaluation metrics of
    women it trains on (``eval_view`` other than ``test``; only held-out test
    women's metrics are exempt from DP, docs/privacy.md). Checked before the
    trainer is built, so nothing of the site is read.

    Raises:
        PrivacyError: the run trains without DP-SGD, asks a larger epsilon or
            sends figures outside the guarantee (the site answers error
            ``SITE_PRIVACY``; names the run's setting and the site's floor,
            file and key).
    """
    if floor is None or floor.max_epsilon is None:
        return
    from common.detector.dp import PrivacyError

    limit = f"{source}: privacy.max_epsilon = {floor.max_epsilon:g}"
    eps = run_dp_epsilon(fed_cfg)
    if eps is not None:
        from client.detector_trainer import detector_options

        opts = detector_options(fed_cfg, "run config")
        if opts.dp_share_train_stats:
            raise PrivacyError(
                "the run asks trainer.options.dp_share_train_stats = true (training "
                "loss and skipped steps sent without noise) under this site's "
                f"floor ({limit})"
            )
        if opts.eval_view != "test":
            raise PrivacyError(
                f"the run asks trainer.options.eval_view = {opts.eval_view!r}: "
                "evaluation metrics of women the site trains on are outside the DP "
                f"guarantee; under this site's floor ({limit}) only 'test' is allowed"
            )
    if eps is None:
        raise PrivacyError(
            f"the run trains without DP-SGD (trainer {fed_cfg.trainer.name!r}, "
            f"trainer.options.dp off), below this site's floor ({limit})"
        )
    if eps > floor.max_epsilon:
        raise PrivacyError(
            f"the run asks trainer.options.dp_epsilon = {eps:g}, above this "
            f"site's floor ({limit})"
        )


def run_dp_epsilon(fed_cfg: FederationConfig) -> float | None:
    """The target epsilon a run's trainer promises each site; None without DP."""
    if fed_cfg.trainer.name != DETECTOR_TRAINER:
        return None
    from client.detector_trainer import detector_options

    opts = detector_options(fed_cfg, "run config")
    return float(opts.dp_epsilon) if opts.dp else None
