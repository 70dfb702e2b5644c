"""The initial global model, built by the server itself (never taken from a node).

A registry ``trainer name -> builder(FederationConfig) -> shared arrays``:
each builder rebuilds, with the run's ``seed``, exactly the model the sites'
trainer of that name builds, and returns its *shared* arrays (the names and
shapes every train reply must then have). A detector run may instead start
from a checkpoint file, which :func:`checkpoint_shared_arrays` checks against
the model config implied by ``trainer.options`` before using it.

The builders seed torch inside :func:`torch.random.fork_rng`, so building the
initial model does not move the RNG state of anything else in the process
(the in-process simulation runs server and sites in one process).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import from_mapping
from common.detector.model.config import ModelConfig
from common.errors import ConfigError
from common.keys import DETECTOR_TRAINER
from common.wire.federation import FederationConfig

__all__ = [
    "DETECTOR_MODEL_OPTIONS",
    "INITIAL_MODELS",
    "DetectorModelOptions",
    "checkpoint_arrays",
    "checkpoint_shared_arrays",
    "detector_model_config",
    "initial_shared_arrays",
    "with_initial_checkpoint",
]

Arrays = dict[str, np.ndarray]
InitialBuilder = Callable[[FederationConfig], Arrays]


_MODEL = ModelConfig()


@dataclasses.dataclass(frozen=True)
class DetectorModelOptions:
    """The model part of the detector trainer's ``trainer.options``.

    Defaults are :class:`ModelConfig`'s (one source), and
    ``client.detector_trainer.DetectorOptions`` takes its model fields from
    here (a test checks that both give the same :class:`ModelConfig`).
    """

    arch: str = _MODEL.arch
    norm: str = _MODEL.norm
    fpn_channels: int = _MODEL.fpn_channels
    head_convs: int = _MODEL.head_convs
    working_spacing_mm: float = _MODEL.working_spacing_mm
    speck_channel: bool = _MODEL.speck_channel
    tta_flip: bool = _MODEL.tta_flip
    breast_mask: bool = _MODEL.breast_mask
    speck_clusters: bool = _MODEL.speck_clusters


#: ``trainer.options`` keys that shape the detector (the others steer training).
DETECTOR_MODEL_OPTIONS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(DetectorModelOptions)
)


def detector_model_config(options: Mapping[str, Any]) -> ModelConfig:
    """:class:`ModelConfig` of the detector trainer for ``trainer.options``.

    Raises:
        ConfigError: a model option of the wrong type or out of range (the
            error names ``trainer.options.<key>`` and the value).
    """
    values = dataclasses.asdict(DetectorModelOptions())
    values.update({k: options[k] for k in DETECTOR_MODEL_OPTIONS if k in options})
    return from_mapping(
        values, ModelConfig, source="federation config", prefix="trainer.options"
    )


def _state_arrays(state: Mapping[str, torch.Tensor], keys: Any) -> Arrays:
    return {k: state[k].detach().cpu().numpy().copy() for k in keys}


def _detector_shared(model: torch.nn.Module, cfg: FederationConfig) -> Arrays:
    from common.detector.model.params import shared_and_personal

    shared, _ = shared_and_personal(model, cfg.personalization)
    return _state_arrays(model.state_dict(), shared)


def _detector_initial(cfg: FederationConfig) -> Arrays:
    from common.detector.model.registry import build_detector

    model_cfg = detector_model_config(cfg.trainer.options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_detector(model_cfg)
    return _detector_shared(model, cfg)


def _toy_initial(cfg: FederationConfig) -> Arrays:
    from common.detector.model.toy import ToyNet, ToyOptions, toy_shared_keys

    channels = ToyOptions.parse(cfg.trainer.options).channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = ToyNet(channels)
    keys = toy_shared_keys(
        model,
        local_norm=cfg.personalization.local_norm,
        personal_head=cfg.personalization.personal_head,
    )
    return _state_arrays(model.state_dict(), keys)


#: trainer name -> builder of the seeded initial shared arrays.
INITIAL_MODELS: dict[str, InitialBuilder] = {
    "toy": _toy_initial,
    DETECTOR_TRAINER: _detector_initial,
}


def initial_shared_arrays(cfg: FederationConfig) -> Arrays:
    """Shared arrays of the model ``cfg.trainer`` builds with ``cfg.seed``.

    Raises:
        ConfigError: a trainer without an initial-model builder (the error
            lists the valid names) or a bad model option.
    """
    name = cfg.trainer.name
    if name not in INITIAL_MODELS:
        raise ConfigError(
            "federation config",
            "trainer.name",
            f"no initial model for trainer {name!r} (valid names: "
            f"{', '.join(sorted(INITIAL_MODELS))})",
        )
    return INITIAL_MODELS[name](cfg)


def checkpoint_shared_arrays(path: str | Path, cfg: FederationConfig) -> Arrays:
    """Shared arrays of the detector checkpoint at ``path``, checked against ``cfg``.

    The checkpoint is read with :func:`common.detector.checkpoint.load_model` and
    ``expected_cfg`` = the model config of ``cfg.trainer.options``, so a file
    made for another architecture, width, spacing or normalization is refused.

    Raises:
        ConfigError: the run's trainer is not the detector.
        common.errors.CheckpointMismatch: unreadable file, another model
            config, or weights that do not fit the model.
    """
    return checkpoint_arrays(path, cfg)[0]


def checkpoint_arrays(path: str | Path, cfg: FederationConfig) -> tuple[Arrays, Arrays]:
    """``(shared, personal defaults)`` of the detector checkpoint at ``path``.

    The personal defaults are the checkpoint's float personal arrays (FedBN
    norm layers; empty without ``local_norm``): what a site that has no
    personal copy yet starts from, so that a base model's normalization is not
    replaced by a fresh one. Checked as :func:`checkpoint_shared_arrays`.
    """
    if cfg.trainer.name != DETECTOR_TRAINER:
        raise ConfigError(
            "federation config",
            "initial_checkpoint",
            f"needs trainer 'detector' (a detector checkpoint), got trainer "
            f"{cfg.trainer.name!r} with {str(path)!r}",
        )
    from common.detector.checkpoint import load_model
    from common.detector.model.params import shared_and_personal

    model, _ = load_model(path, detector_model_config(cfg.trainer.options))
    shared, personal = shared_and_personal(model, cfg.personalization)
    state = model.state_dict()
    floats = [k for k in personal if state[k].is_floating_point()]
    return _state_arrays(state, shared), _state_arrays(state, floats)


def with_initial_checkpoint(
    cfg: FederationConfig, path: Path, flag: str = "--initial-checkpoint"
) -> FederationConfig:
    """``cfg`` started from checkpoint ``path`` (replacing any initial arrays).

    Raises:
        ConfigError: ``path`` is not a file (names ``flag`` and the path).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError("command line", flag, f"file does not exist: {str(p)!r}")
    return dataclasses.replace(cfg, initial_arrays=None, initial_checkpoint=p.resolve())
