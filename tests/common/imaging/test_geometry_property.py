"""Property tests of Geometry round trips and of standardize's crop mapping."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from common.imaging.geometry import Geometry


@st.composite
def geometry_and_box(draw: st.DrawFn) -> tuple[Geometry, np.ndarray]:
    """A random Geometry and a random box inside its crop (stored space)."""
    rows = draw(st.integers(2, 4000))
    cols = draw(st.integers(2, 4000))
    x0 = draw(st.integers(0, cols - 1))
    x1 = draw(st.integers(x0 + 1, cols))
    y0 = draw(st.integers(0, rows - 1))
    y1 = draw(st.integers(y0 + 1, rows))
    mh = draw(st.integers(1, 3000))
    mw = draw(st.integers(1, 3000))
    g = Geometry((rows, cols), (x0, y0, x1, y1), draw(st.booleans()), (mh, mw))
    fx = sorted(draw(st.lists(st.floats(0, 1), min_size=2, max_size=2)))
    fy = sorted(draw(st.lists(st.floats(0, 1), min_size=2, max_size=2)))
    box = np.array(
        [
            x0 + fx[0] * (x1 - x0),
            y0 + fy[0] * (y1 - y0),
            x0 + fx[1] * (x1 - x0),
            y0 + fy[1] * (y1 - y0),
        ]
    )
    return g, box


@settings(max_examples=300, deadline=None)
@given(geometry_and_box())
def test_round_trip(gb: tuple[Geometry, np.ndarray]) -> None:
    """to_stored(to_model(b)) == b within 0.5 stored px, and boxes stay ordered."""
    g, box = gb
    model = g.to_model(box)[0]
    assert model[0] <= model[2] and model[1] <= model[3]
    back = g.to_stored(model)[0]
    np.testing.assert_allclose(back, box, atol=0.5)
    np.testing.assert_allclose(back, box, atol=1e-6 * max(g.stored_shape))


@settings(max_examples=300, deadline=None)
@given(geometry_and_box())
def test_crop_maps_onto_model_frame(gb: tuple[Geometry, np.ndarray]) -> None:
    """The crop maps onto [0, W] x [0, H]; inside boxes land inside the frame."""
    g, box = gb
    crop = np.array([g.crop], dtype=float)
    h, w = g.model_shape
    np.testing.assert_allclose(g.to_model(crop)[0], [0, 0, w, h], atol=1e-6)
    m = g.to_model(box)[0]
    eps = 1e-6 * max(w, h)
    assert -eps <= m[0] and m[2] <= w + eps and -eps <= m[1] and m[3] <= h + eps


@settings(max_examples=100, deadline=None)
@given(geometry_and_box())
def test_flip_mirrors(gb: tuple[Geometry, np.ndarray]) -> None:
    """A flipped geometry mirrors x about the model width (and not y)."""
    g, box = gb
    other = Geometry(g.stored_shape, g.crop, not g.flip, g.model_shape)
    a, b = g.to_model(box)[0], other.to_model(box)[0]
    w = g.model_shape[1]
    np.testing.assert_allclose([a[0], a[2]], [w - b[2], w - b[0]], atol=1e-6 * w)
    np.testing.assert_allclose([a[1], a[3]], [b[1], b[3]])
