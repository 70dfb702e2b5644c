"""benchmarks.mias_classwise: masses from one run, clusters from another, mapped."""

from __future__ import annotations

import pytest

from benchmarks.mias_classwise import CALC, MASS, combine
from common.imaging.geometry import Geometry


def _row(key: str, boxes: list[list[float]], labels: list[int]) -> dict:
    return {
        "key": key, "spacing_mm": 0.4, "gt_boxes": [[1.0, 1.0, 5.0, 5.0]],
        "gt_labels": [MASS], "ignore_boxes": [], "det_boxes": boxes,
        "det_scores": [0.9 - 0.1 * i for i in range(len(boxes))],
        "det_labels": labels, "case": "w1", "fold": 0,
    }  # fmt: skip


def test_each_class_from_its_run_in_the_mass_runs_pixels() -> None:
    # the same stored file: 0.4 mm run crops x 100..600 and halves; 0.2 mm keeps 1:1
    coarse = Geometry((1000, 800), (100, 0, 600, 1000), False, (500, 250))
    fine = Geometry((1000, 800), (0, 0, 800, 1000), False, (1000, 800))
    mass_index = {"a": ("mdb001.png", coarse)}
    calc_index = {"b": ("mdb001.png", fine)}
    mass = [
        _row(
            "cache/a",
            [[10.0, 10.0, 20.0, 20.0], [30.0, 30.0, 40.0, 40.0]],
            [MASS, CALC],
        )
    ]
    calc = [
        _row(
            "cache-native/b",
            [[300.0, 200.0, 320.0, 220.0], [0.0, 0.0, 9.0, 9.0]],
            [CALC, MASS],
        )
    ]
    (out,) = combine(mass, calc, mass_index, calc_index)
    assert out["key"] == "cache/a" and out["gt_boxes"] == mass[0]["gt_boxes"]
    assert out["det_labels"] == [MASS, CALC]
    assert out["det_boxes"][0] == [10.0, 10.0, 20.0, 20.0]
    # stored (300, 200)-(320, 220) -> crop-relative x 200..220, halved
    assert out["det_boxes"][1] == pytest.approx([100.0, 100.0, 110.0, 110.0])
    assert out["det_scores"] == pytest.approx([0.9, 0.9])


def test_runs_of_other_women_are_refused() -> None:
    g = Geometry.identity((10, 10))
    mass = [_row("cache/a", [], [])]
    calc = [_row("cache-native/b", [], [])]
    with pytest.raises(ValueError, match="mdb001.png: scored by the mass run only"):
        combine(mass, calc, {"a": ("mdb001.png", g)}, {"b": ("mdb002.png", g)})
    with pytest.raises(ValueError, match="mdb002.png: scored by the calcification"):
        combine([], calc, {}, {"b": ("mdb002.png", g)})


def test_take_every_class_maps_the_other_run_into_the_first_runs_pixels() -> None:
    coarse = Geometry((1000, 800), (100, 0, 600, 1000), False, (500, 250))
    fine = Geometry((1000, 800), (0, 0, 800, 1000), False, (1000, 800))
    first = [_row("cache/a", [[10.0, 10.0, 20.0, 20.0]], [MASS])]
    other = [
        _row(
            "cache-03/b",
            [[300.0, 200.0, 320.0, 220.0], [500.0, 400.0, 540.0, 440.0]],
            [CALC, MASS],
        )
    ]
    (out,) = combine(
        first,
        other,
        {"a": ("mdb001.png", coarse)},
        {"b": ("mdb001.png", fine)},
        take=frozenset({MASS, CALC}),
    )
    # keys, cases and ground truth stay the first run's; every detection is the other's
    assert out["key"] == "cache/a" and out["gt_boxes"] == first[0]["gt_boxes"]
    assert out["det_labels"] == [CALC, MASS]
    assert out["det_scores"] == pytest.approx([0.9, 0.8])
    assert out["det_boxes"] == [
        pytest.approx([100.0, 100.0, 110.0, 110.0]),
        pytest.approx([200.0, 200.0, 220.0, 220.0]),
    ]
