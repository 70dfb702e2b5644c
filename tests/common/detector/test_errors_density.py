"""Sensitivity by breast density at the operating point (``by_density``)."""

from __future__ import annotations

import numpy as np
import pytest

from common.detector.errors import (
    BY_DENSITY_KEY,
    BY_SIZE_KEY,
    UNKNOWN_DENSITY,
    DensityTable,
    class_errors,
    density_groups,
    write_error_outputs,
)
from common.detector.froc import FrocImage, froc_class
from tests.common.detector.test_errors import img  # one FrocImage builder

MASS, CALC = 0, 1
SP = 0.1  # mm per pixel


def box(cx: float, cy: float, side_px: float = 80.0) -> list[float]:
    h = side_px / 2
    return [cx - h, cy - h, cx + h, cy + h]


#: k1 (a): mass hit at 0.9 (found), mass hit only at 0.05 (missed), four FPs
#: at 0.1; k2 (a): no lesion, FP at 0.8; k3 (D): mass hit at 0.7; k4 (no
#: density): mass never reached, FP at 0.6. Over 4 images 1 FP/image is
#: reached at 0.6 (2 FPs, 0.5/image); at 0.1 it would be 6/4.
def scenario() -> list[FrocImage]:
    k1 = img(
        "k1",
        gt=[box(200, 200), box(600, 600)],
        dets=[box(200, 200), box(600, 600), *(box(100 * i, 900) for i in range(4))],
        scores=[0.9, 0.05, 0.1, 0.1, 0.1, 0.1],
    )
    k2 = img("k2", dets=[box(500, 500)], scores=[0.8])
    k3 = img("k3", gt=[box(300, 300)], dets=[box(300, 300)], scores=[0.7])
    k4 = img("k4", gt=[box(300, 300)], dets=[box(800, 800)], scores=[0.6])
    return [k1, k2, k3, k4]


DENSITY = {"k1": "a", "k2": "a", "k3": "D", "k4": None}


def test_density_groups_count_exactly():
    images = scenario()
    ce = class_errors(images, MASS, densities=DENSITY)
    assert ce.point.threshold == pytest.approx(0.6)
    assert ce.point.fp_per_image == pytest.approx(0.5)
    got = {
        g.density: (g.n_images, g.n_lesions, g.n_found, g.n_false_positives)
        for g in ce.densities or []
    }
    assert got == {"a": (2, 2, 1, 1), "D": (1, 1, 1, 0), UNKNOWN_DENSITY: (1, 1, 0, 1)}
    # BI-RADS before MIAS (DENSITY_VALUES order), unknown last
    assert [g.density for g in ce.densities or []] == ["a", "D", UNKNOWN_DENSITY]
    by = {g.density: g for g in ce.densities or []}
    assert by["a"].sensitivity == 0.5 and by["a"].fp_per_image == 0.5
    assert by["D"].sensitivity == 1.0 and by["D"].fp_per_image == 0.0
    assert by[UNKNOWN_DENSITY].sensitivity == 0.0
    # summed over the groups: the class's totals at the operating point
    groups = ce.densities or []
    assert sum(g.n_found for g in groups) / sum(g.n_lesions for g in groups) == (
        pytest.approx(froc_class(images, MASS).sens_at[1.0])
    )
    fp = sum(g.n_false_positives for g in groups)
    assert fp == pytest.approx(ce.point.fp_per_image * len(images))
    # no calcification anywhere: groups with images but no lesion
    calc = class_errors(images, CALC, densities=DENSITY).densities or []
    assert [(g.n_lesions, g.sensitivity, g.n_false_positives) for g in calc] == [
        (0, None, 0)
    ] * 3


def test_without_densities_no_groups_and_nothing_fires():
    images = scenario()
    assert class_errors(images, MASS).densities is None
    assert class_errors(images, MASS).density_record() is None
    # nothing fires (threshold inf): every lesion missed, no FP counted
    only_fp = [img("z", gt=[box(100, 100)], dets=[box(800, 800)], scores=[0.5])]
    ce = class_errors(only_fp, MASS, fp_rate=0.0, densities={"z": "F"})
    (g,) = ce.densities or []
    assert (g.density, g.n_lesions, g.n_found, g.n_false_positives) == ("F", 1, 0, 0)
    assert ce.density_record().threshold is None  # type: ignore[union-attr]


def test_bad_density_value_names_image_and_value():
    with pytest.raises(ValueError, match=r"image 'k3'.*got 'dense'"):
        class_errors(scenario(), MASS, densities={**DENSITY, "k3": "dense"})
    # 'A' is neither BI-RADS (lower case) nor MIAS
    with pytest.raises(ValueError, match="got 'A'"):
        class_errors(scenario(), MASS, densities={"k1": "A"})


def test_density_groups_refuse_outcomes_of_other_images():
    images = scenario()
    ce = class_errors(images, MASS, densities=DENSITY)
    with pytest.raises(ValueError, match="lesion of image 'k1'"):
        density_groups(images[1:], ce.lesions, [], 0.5, DENSITY)


def test_write_error_outputs_by_density_only_when_some_image_has_one(tmp_path):
    images = scenario()

    def load(key: str) -> np.ndarray:
        return np.zeros((1000, 1000), np.float32)

    kw = {"n_missed": 0, "n_fp": 0}
    assert BY_DENSITY_KEY not in write_error_outputs(images, tmp_path, load, **kw)
    none = dict.fromkeys(DENSITY)
    doc = write_error_outputs(images, tmp_path, load, densities=none, **kw)
    assert BY_DENSITY_KEY not in doc and BY_SIZE_KEY in doc
    doc = write_error_outputs(images, tmp_path, load, densities=DENSITY, **kw)
    table = DensityTable.from_json(doc[BY_DENSITY_KEY]["mass"])
    assert table.to_json() == doc[BY_DENSITY_KEY]["mass"]
    assert table.threshold == pytest.approx(0.6) and table.fp_rate == 1.0
    assert [(g.density, g.n_found) for g in table.groups] == [
        ("a", 1), ("D", 1), (UNKNOWN_DENSITY, 0),
    ]  # fmt: skip
    assert set(doc[BY_DENSITY_KEY]) == {"mass", "calcification"}
    with pytest.raises(TypeError):
        DensityTable.from_json({**doc[BY_DENSITY_KEY]["mass"], "extra": 1})


def test_group_totals_equal_the_operating_point_random():
    rng = np.random.default_rng(5)
    values = ["a", "b", "c", "d", "F", "G", "D", None]
    for trial in range(20):
        images, dens = [], {}
        for i in range(int(rng.integers(1, 8))):
            n_gt, n_det = int(rng.integers(0, 4)), int(rng.integers(0, 6))
            key = f"{trial}-{i}"
            images.append(
                img(
                    key,
                    gt=[box(*rng.uniform(50, 950, 2), rng.uniform(20, 300))
                        for _ in range(n_gt)],
                    gl=rng.integers(0, 2, n_gt),
                    dets=[box(*rng.uniform(50, 950, 2), rng.uniform(20, 300))
                          for _ in range(n_det)],
                    scores=rng.choice([0.2, 0.4, 0.6, 0.8], n_det),
                    labels=rng.integers(0, 2, n_det),
                )
            )  # fmt: skip
            dens[key] = values[int(rng.integers(0, len(values)))]
        for label in (MASS, CALC):
            for rate in (0.25, 1.0, 4.0):
                ce = class_errors(images, label, fp_rate=rate, densities=dens)
                groups = ce.densities or []
                assert sum(g.n_images for g in groups) == len(images)
                assert sum(g.n_lesions for g in groups) == len(ce.lesions)
                assert sum(g.n_found for g in groups) == sum(
                    o.found for o in ce.lesions
                )
                fp = sum(g.n_false_positives for g in groups)
                assert fp == pytest.approx(ce.point.fp_per_image * len(images))
