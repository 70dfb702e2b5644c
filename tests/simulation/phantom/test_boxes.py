"""Boxes are exact: a lesion rendered alone lies inside its box, which is tight."""

from __future__ import annotations

import numpy as np
import pytest

from simulation.phantom import Scenario, render_image
from simulation.phantom.generate import draw_lesions
from simulation.phantom.lesions import (
    LesionSpec,
    draw_lesion_shape,
    render_lesion,
)

MARGIN_WEIGHTS = {
    "circumscribed": 1.0,
    "lobulated": 1.0,
    "ill_defined": 1.0,
    "spiculated": 1.0,
}


@pytest.mark.parametrize("seed", range(12))
def test_lesion_alone_inside_its_tight_box(seed: int) -> None:
    rng = np.random.default_rng(seed)
    kind = "mass" if seed % 2 else "calcification"
    diam = (5.0, 30.0) if kind == "mass" else (5.0, 15.0)
    spec = draw_lesion_shape(
        kind, (40.0, 50.0), diam, MARGIN_WEIGHTS, (0.1, 0.6), (3, 20), rng
    )
    r = render_lesion(spec, (400, 300), 0.2)
    assert r is not None
    full = np.zeros((400, 300), np.float32)
    full[r.y0 : r.y0 + r.path.shape[0], r.x0 : r.x0 + r.path.shape[1]] = r.path
    x0, y0, x1, y1 = r.box
    inside = np.zeros_like(full, dtype=bool)
    inside[y0:y1, x0:x1] = True
    assert full[~inside].max(initial=0.0) == 0.0
    # tight: every edge row/column of the box holds lesion
    assert full[y0, x0:x1].max() > 0 and full[y1 - 1, x0:x1].max() > 0
    assert full[y0:y1, x0].max() > 0 and full[y0:y1, x1 - 1].max() > 0
    # the extent used for placement really bounds the lesion
    ext_px = spec.extent_mm() / 0.2
    assert (x1 - x0) <= 2 * ext_px + 2 and (y1 - y0) <= 2 * ext_px + 2


def test_lesion_off_grid_is_none() -> None:
    spec = LesionSpec(
        kind="mass", margin="circumscribed", center_mm=(-50.0, -50.0), diameter_mm=10.0
    )
    assert render_lesion(spec, (100, 100), 0.2) is None
    with pytest.raises(ValueError, match="unknown lesion kind"):
        render_lesion(
            LesionSpec(kind="cyst", margin="", center_mm=(5.0, 5.0), diameter_mm=2.0),
            (100, 100),
            0.2,
        )


@pytest.mark.parametrize("lat", ["L", "R"])
def test_image_boxes_in_stored_orientation(test_scenario: Scenario, lat: str) -> None:
    spec = LesionSpec(
        kind="mass", margin="circumscribed", center_mm=(30.0, 60.0), diameter_mm=12.0
    )
    img = render_image(test_scenario, "A", 0, lat, "CC", lesions=[spec])
    assert len(img.findings) == 1
    x0, y0, x1, y1 = img.findings[0].box
    la = img.lesion_attenuation
    assert la[y0:y1, x0:x1].any()
    outside = la.copy()
    outside[y0:y1, x0:x1] = 0
    assert not outside.any()
    w = la.shape[1]
    cx = (x0 + x1) / 2 * img.spacing_mm
    # L: chest wall on the left of the stored image; R: on the right
    expected = 30.0 if lat == "L" else w * img.spacing_mm - 30.0
    assert cx == pytest.approx(expected, abs=2 * img.spacing_mm)
    # the breast sits on the chest-wall side too
    cols = np.flatnonzero(img.mask.any(axis=0))
    assert (cols[0] == 0) if lat == "L" else (cols[-1] == w - 1)


def test_drawn_lesions_inside_breast(test_scenario: Scenario) -> None:
    n = 0
    for woman in range(2):
        for lat in ("L", "R"):
            for view in ("CC", "MLO"):
                img = render_image(test_scenario, "A", woman, lat, view)
                assert img.mask[img.lesion_attenuation != 0].all(), (woman, lat, view)
                n += len(img.findings)
    assert n > 0


def test_no_lesions_when_prevalence_zero(test_scenario: Scenario) -> None:
    import dataclasses

    from simulation.phantom.anatomy import (
        build_anatomy,
        canonical_shape,
        draw_breast,
        draw_woman,
    )

    an = test_scenario.anatomy
    maps = build_anatomy(
        an,
        draw_breast(
            an, draw_woman(an, np.random.default_rng(0)), "CC", np.random.default_rng(1)
        ),
        canonical_shape(an, 0.5),
        0.5,
        np.random.default_rng(2),
    )
    none = dataclasses.replace(test_scenario.lesions, prevalence=0.0)
    assert draw_lesions(none, maps, np.random.default_rng(3)) == []
    always = dataclasses.replace(test_scenario.lesions, prevalence=1.0)
    assert len(draw_lesions(always, maps, np.random.default_rng(3))) >= 1
