"""Registry of detector architectures (as timm's ``register_model``): name -> builder.

Builders register themselves with the :func:`register_model` decorator where
they are defined; the built-in ones (:mod:`common.detector.model.fcos`) are imported by
the package ``common.detector.model``, so they are registered before any caller can look
a name up, and a model registered by user code is added next to them.
:func:`build_detector` checks ``cfg.arch`` against the registry and raises
:class:`common.errors.ConfigError` listing the valid names when it is unknown.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from common.detector.model.config import ModelConfig
from common.errors import ConfigError

__all__ = ["Builder", "available_models", "build_detector", "register_model"]

#: ``ModelConfig -> nn.Module`` (train mode: loss dict; eval mode: detections).
Builder = Callable[[ModelConfig], nn.Module]

_REGISTRY: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering a builder under ``name`` (a taken name raises)."""

    def deco(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def available_models() -> tuple[str, ...]:
    """Registered architecture names, sorted."""
    return tuple(sorted(_REGISTRY))


def build_detector(cfg: ModelConfig) -> nn.Module:
    """Build the detector ``cfg.arch`` names, from ``cfg``.

    Returns a module whose train mode maps ``(images, targets)`` to a loss dict
    and whose eval mode returns model-space detections (see
    :mod:`common.detector.model.fcos`).

    Raises:
        ConfigError: ``cfg.arch`` is not registered (the error lists the names).
    """
    builder = _REGISTRY.get(cfg.arch)
    if builder is None:
        raise ConfigError(
            "model registry",
            "arch",
            f"unknown model {cfg.arch!r} (valid names: "
            f"{', '.join(available_models())})",
        )
    return builder(cfg)
