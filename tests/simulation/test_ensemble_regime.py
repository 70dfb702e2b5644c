"""The ensemble regime: each site's members' scored images, fused, scored again."""

from __future__ import annotations

import numpy as np
import pytest

from common.detector.engine import EvalResult
from common.detector.froc import FrocImage, froc_all
from simulation.run import ensemble_results


def _scored(found: set[int]) -> EvalResult:
    """8 women with a mass each; the masses in ``found`` detected at 0.9."""
    images = []
    for i in range(8):
        dets = [[50.0, 50.0, 80.0, 80.0]] if i in found else []
        dets.append([300.0, 300.0, 320.0, 320.0])
        images.append(
            FrocImage(
                key=f"im{i}",
                spacing_mm=0.4,
                gt_boxes=np.array([[50.0, 50.0, 80.0, 80.0]]),
                gt_labels=np.array([0]),
                det_boxes=np.array(dets),
                det_scores=np.array([0.9] * (len(dets) - 1) + [0.3]),
                det_labels=np.zeros(len(dets), np.int64),
                case=f"w{i}",
            )
        )
    per_class = froc_all(images, n_boot=0)
    return EvalResult({}, per_class, tuple(images))


def test_sites_are_fused_and_rescored_and_unscored_sites_stay_unscored() -> None:
    fed = {"B": _scored({0, 1, 2, 3}), "C": _scored({0}), "D": None}
    local = {"B": _scored({4, 5, 6, 7}), "C": _scored({0}), "D": _scored({1})}
    out = ensemble_results([fed, local], n_boot=20, seed=0)
    assert set(out) == {"B", "C", "D"} and out["D"] is None
    b = out["B"]
    assert b is not None and len(b.images) == 8
    # complementary members: the fused model finds every mass
    assert b.per_class["mass"].sens_at[4.0] == pytest.approx(1.0)
    assert fed["B"].per_class["mass"].sens_at[4.0] == pytest.approx(0.5)
    assert b.metrics["cpm-mass"] == pytest.approx(b.per_class["mass"].cpm)
    assert b.per_class["mass"].cpm_ci is not None  # n_boot > 0: an interval
    assert [im.case for im in b.images] == [f"w{i}" for i in range(8)]


def test_one_member_is_that_model_alone() -> None:
    """A few-shot site of ``personalized-ssl+tuned+local-unless-fewshot`` runs
    one model: its result is the member's, not a re-scored copy."""
    tuned = {"B": _scored({0, 1, 2}), "C": None}
    out = ensemble_results([tuned], n_boot=20, seed=0)
    assert out["B"] is tuned["B"] and out["C"] is None
