"""The lesion detector: config, registry, FCOS model and the parameter split.

Public API::

    ModelConfig, Personalization          # frozen dataclasses (config.py)
    build_detector(cfg) -> nn.Module      # registry.py
    register_model, available_models
    shared_and_personal(model, personalization) -> (shared_keys, personal_keys)
    head_keys(model), norm_keys(model), parameter_groups(model)
    without_breast_mask(model)            # context: detections a model trains from

Importing this package registers the built-in models
(:mod:`common.detector.model.fcos`),
so they are in the registry before any name is looked up.
"""

from common.detector.model import fcos as _builtin_models  # noqa: F401  (registers them)
from common.detector.model.config import ModelConfig, Personalization
from common.detector.model.fcos import without_breast_mask
from common.detector.model.params import (
    head_keys,
    norm_keys,
    parameter_groups,
    shared_and_personal,
)
from common.detector.model.registry import (
    available_models,
    build_detector,
    register_model,
)

__all__ = [
    "ModelConfig",
    "Personalization",
    "available_models",
    "build_detector",
    "head_keys",
    "norm_keys",
    "parameter_groups",
    "register_model",
    "shared_and_personal",
    "without_breast_mask",
]
