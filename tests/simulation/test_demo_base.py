"""The shipped vendor-H base model (models/demo-base-h.pt) fits the demo it starts."""

from __future__ import annotations

import dataclasses

import numpy as np

from common.detector.checkpoint import load_checkpoint
from common.detector.model.initial import checkpoint_arrays, detector_model_config
from common.wire.federation import load_federation_config
from simulation.demo import BASE_MODEL, FEDERATION


def test_shipped_base_model_loads_as_the_demo_federations_initial_model() -> None:
    assert BASE_MODEL.is_file(), "make base-model writes it; the demo starts from it"
    assert BASE_MODEL.stat().st_size < 4 * 2**20  # small enough for the repository
    fed = load_federation_config(FEDERATION)
    ck = load_checkpoint(BASE_MODEL, detector_model_config(fed.trainer.options))
    assert ck.extra.get("epochs") == 30  # make base-model: --rounds 30
    shared, norms = checkpoint_arrays(
        BASE_MODEL, dataclasses.replace(fed, initial_checkpoint=BASE_MODEL)
    )
    assert shared and norms  # sim-demo is FedBN: the norms travel as defaults
    assert all(np.isfinite(v).all() for v in (*shared.values(), *norms.values()))
