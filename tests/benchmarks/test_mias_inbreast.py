"""benchmarks.mias_inbreast: the breast mask drops detections on a film label."""

from __future__ import annotations

import numpy as np

from benchmarks.mias_inbreast import breast_mask, inside_breast


def test_a_detection_on_a_label_outside_the_breast_is_dropped() -> None:
    img = np.zeros((600, 400), np.float32)
    yy, xx = np.mgrid[:600, :400]
    img[((yy - 300) / 250) ** 2 + (xx / 300) ** 2 < 1] = 0.6  # breast, chest wall left
    img[40:90, 320:380] = 1.0  # a bright film label, apart from it
    mask, factor = breast_mask(img)
    boxes = np.array(
        [
            [100.0, 280.0, 140.0, 320.0],  # in the breast
            [330.0, 50.0, 370.0, 80.0],  # on the label
            [5.0, 590.0, 15.0, 599.0],  # in the air
        ]
    )
    assert inside_breast(boxes, mask, factor).tolist() == [True, False, False]
    assert inside_breast(np.zeros((0, 4)), mask, factor).shape == (0,)
    flat, _ = breast_mask(np.full((50, 50), 0.3, np.float32))
    assert flat.all()  # nothing found: nothing dropped
