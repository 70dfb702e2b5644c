"""Registry of detector architectures (style rule 5): name -> builder.

``register_model(name)`` decorates a ``ModelConfig -> nn.Module`` builder;
:func:`build_detector` looks the name up and raises
:class:`common.errors.ConfigError` listing the valid names when it is unknown.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from common.errors import ConfigError

Builder = Callable[..., nn.Module]

_REGISTRY: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering a builder under ``name`` (duplicate names raise)."""

    def deco(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def available_models() -> tuple[str, ...]:
    """Registered architecture names, sorted."""
    _ensure_builtin()
    return tuple(sorted(_REGISTRY))


def get_builder(name: str) -> Builder:
    """The builder registered as ``name``; unknown names list the valid ones."""
    _ensure_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            "model registry",
            "arch",
            f"unknown model {name!r} (valid names: {', '.join(available_models())})",
        ) from None


def build_detector(cfg: object) -> nn.Module:
    """Build the detector for ``cfg`` (a :class:`common.model.config.ModelConfig`).

    Returns a module whose train mode maps ``(images, targets)`` to a loss dict
    and whose eval mode returns model-space detections (see
    :mod:`common.model.fcos`).
    """
    arch = getattr(cfg, "arch", None)
    if not isinstance(arch, str):
        raise ConfigError("model registry", "arch", f"must be a string, got {arch!r}")
    return get_builder(arch)(cfg)


def _ensure_builtin() -> None:
    if not _REGISTRY:
        from common.model import fcos

        for name in ("tiny", "small", "resnet18", "resnet34", "resnet50"):
            _REGISTRY[name] = fcos.build_fcos
