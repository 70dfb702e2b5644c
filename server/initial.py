"""Round 0: the server makes or loads the initial global model itself.

No node supplies it (a node's reply would otherwise become everyone's model):
:func:`initial_global_arrays` takes, in this order,

1. ``initial_checkpoint``: a detector checkpoint, refused unless its model
   config matches ``trainer.options``
   (:func:`common.detector.model.initial.checkpoint_shared_arrays`);
2. ``initial_arrays``: an ``.npz`` whose names, shapes and float dtypes must
   equal the shared arrays of the configured model, all values finite;
3. otherwise the configured model built with the run's ``seed``
   (:func:`common.detector.model.initial.initial_shared_arrays`), the same arrays every
   site's trainer starts from.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from common.detector.model.initial import (
    checkpoint_arrays,
    checkpoint_shared_arrays,
    initial_shared_arrays,
)
from common.errors import MammofedError
from common.fileio import load_arrays
from common.wire.federation import FederationConfig, array_fault

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


class InitialModelError(MammofedError):
    """The configured initial model cannot be used (file, names, shapes, values)."""


def check_initial_arrays(
    arrays: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], where: Path
) -> None:
    """Refuse ``arrays`` unless names, shapes and dtypes match ``expected``.

    The dtype must be the model's own: the global model's dtype is the one
    every reply is checked against (``server.validation``), so a float64
    file would have the sites' float32 updates refused in every round.

    Raises:
        InitialModelError: naming the file, the array and both values.
    """
    have, want = set(arrays), set(expected)
    if have != want:
        raise InitialModelError(
            f"{where}: arrays do not match the model's shared arrays: unknown "
            f"{sorted(have - want)[:5]}, missing {sorted(want - have)[:5]}"
        )
    for name in sorted(want):
        ref = expected[name]
        fault = array_fault(name, arrays[name], ref.shape, np.dtype(ref.dtype))
        if fault is not None:
            raise InitialModelError(f"{where}: does not fit the model: {fault[1]}")


def initial_global_arrays(cfg: FederationConfig) -> Arrays:
    """The round-0 global shared arrays, made or loaded by the server.

    Raises:
        InitialModelError: an ``initial_arrays`` file that cannot be read or
            does not fit the model.
        common.errors.CheckpointMismatch: an ``initial_checkpoint`` for
            another model config.
        common.errors.ConfigError: a trainer without an initial-model builder.
    """
    built = initial_shared_arrays(cfg)
    if cfg.initial_checkpoint is not None:
        arrays = checkpoint_shared_arrays(cfg.initial_checkpoint, cfg)
        check_initial_arrays(arrays, built, cfg.initial_checkpoint)
        log.info(
            "initial model: %d shared arrays from checkpoint %s",
            len(arrays),
            cfg.initial_checkpoint,
        )
        return arrays
    if cfg.initial_arrays is not None:
        try:
            arrays = load_arrays(cfg.initial_arrays)
        except (OSError, ValueError) as exc:  # a broken zip too (load_arrays)
            raise InitialModelError(
                f"{cfg.initial_arrays}: cannot read initial arrays: {exc}"
            ) from exc
        check_initial_arrays(arrays, built, cfg.initial_arrays)
        log.info(
            "initial model: %d shared arrays from %s", len(arrays), cfg.initial_arrays
        )
        return arrays
    log.info(
        "initial model: %d shared arrays of trainer %r built with seed %d",
        len(built),
        cfg.trainer.name,
        cfg.seed,
    )
    return built


def initial_personal_defaults(cfg: FederationConfig) -> Arrays:
    """The initial checkpoint's personal norm arrays (``{}`` when there are none).

    Sent with every round (``common.keys.PERSONAL_DEFAULTS_KEY``) so that under
    FedBN a site without a personal copy starts from the base model's norm
    layers instead of fresh ones; never aggregated, and a site that has its
    own copy ignores them. Only a detector run with ``initial_checkpoint`` and
    ``local_norm`` has any.
    """
    if cfg.initial_checkpoint is None or not cfg.personalization.local_norm:
        return {}
    arrays = checkpoint_arrays(cfg.initial_checkpoint, cfg)[1]
    for name, value in arrays.items():
        fault = array_fault(name, value, value.shape, np.dtype(value.dtype))
        if fault is not None:
            raise InitialModelError(f"{cfg.initial_checkpoint}: {fault[1]}")
    return arrays
