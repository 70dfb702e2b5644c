"""Weighted box fusion of several detectors' findings (common.detector.ensemble)."""

from __future__ import annotations

import numpy as np
import pytest

from common.detector.ensemble import fuse, fuse_images
from common.detector.froc import FrocImage, froc_class

MASS, CALC = 0, 1
SP = 0.5  # mm per pixel: the 5 mm reach is 10 px


def im(key: str, dets=(), scores=(), labels=None, gt=(), case="") -> FrocImage:
    return FrocImage(
        key=key,
        spacing_mm=SP,
        gt_boxes=np.array(gt, dtype=float).reshape(-1, 4),
        gt_labels=np.zeros(len(gt), np.int64),
        det_boxes=np.array(dets, dtype=float).reshape(-1, 4),
        det_scores=np.array(scores, dtype=float),
        det_labels=np.array(labels if labels is not None else [MASS] * len(dets)),
        case=case,
    )


def test_agreeing_findings_merge_and_a_lone_one_keeps_a_share():
    a = im("k", dets=[[0, 0, 10, 10], [100, 100, 110, 110]], scores=[0.8, 0.6])
    b = im("k", dets=[[2, 0, 12, 10]], scores=[0.4], case="")
    f = fuse_images([a, b])
    order = np.argsort(-f.det_scores)
    np.testing.assert_allclose(f.det_scores[order], [0.6, 0.3])
    # the merged box is the score-weighted mean: x 0*2/3 + 2*1/3
    np.testing.assert_allclose(f.det_boxes[order[0]], [2 / 3, 0, 10 + 2 / 3, 10])
    np.testing.assert_allclose(f.det_boxes[order[1]], [100, 100, 110, 110])


def test_one_models_near_findings_stay_apart_and_classes_never_mix():
    a = im("k", dets=[[0, 0, 10, 10], [1, 0, 11, 10]], scores=[0.9, 0.5])
    b = im("k", dets=[[0, 0, 10, 10]], scores=[0.7], labels=[CALC])
    f = fuse_images([a, b])
    assert sorted(f.det_labels.tolist()) == [MASS, MASS, CALC]
    np.testing.assert_allclose(
        sorted(f.det_scores.tolist()), sorted([0.45, 0.25, 0.35])
    )


def test_out_of_reach_findings_do_not_merge():
    a = im("k", dets=[[0, 0, 10, 10]], scores=[0.8])
    b = im("k", dets=[[30, 0, 40, 10]], scores=[0.8])  # 15 mm apart
    assert len(fuse_images([a, b]).det_scores) == 2


def test_a_detector_fused_with_itself_scores_the_same():
    rng = np.random.default_rng(0)
    images = []
    for i in range(12):
        gt = [[50, 50, 80, 80]] if i % 2 == 0 else []
        dets = [[52, 50, 82, 80]] if i % 3 == 0 else []
        dets += [[float(x), 200, float(x) + 20, 220] for x in rng.integers(0, 400, 2)]
        images.append(im(f"i{i}", dets=dets, scores=rng.random(len(dets)), gt=gt))
    fused = fuse([images, images])
    assert [x.key for x in fused] == [x.key for x in images]
    assert froc_class(fused, MASS).cpm == pytest.approx(froc_class(images, MASS).cpm)


def test_other_images_are_refused_by_name():
    with pytest.raises(ValueError, match="not the same image"):
        fuse_images([im("a"), im("b")])
    with pytest.raises(ValueError, match="model 1 scored other images"):
        fuse([[im("a"), im("b")], [im("a")]])
    with pytest.raises(ValueError, match="no model"):
        fuse([])
    kept = fuse_images([im("a", case="w1"), im("a", case="w1")])
    assert kept.case == "w1" and len(kept.det_scores) == 0


def test_a_stored_record_fuses_with_the_freshly_scored_image_it_came_from():
    """detections.json keeps boxes to 0.01 px: a regime read back (--reuse)
    fuses with one scored in this run, while another lesion is still refused."""
    fresh = im(
        "k",
        dets=[[10.123456, 10, 40, 40]],
        scores=[0.7],
        gt=[[10.004, 9.996, 40.3333, 40]],
    )
    stored = FrocImage.from_json(fresh.to_json())
    assert not np.array_equal(stored.gt_boxes, fresh.gt_boxes)
    fused = fuse_images([fresh, stored])
    assert len(fused.det_scores) == 1 and fused.det_scores[0] == pytest.approx(
        0.7, abs=1e-4
    )
    moved = im("k", gt=[[10.02, 10, 40.3333, 40]])
    with pytest.raises(ValueError, match="not the same image"):
        fuse_images([fresh, moved])
    other_class = FrocImage.from_json({**fresh.to_json(), "gt_labels": [CALC]})
    with pytest.raises(ValueError, match="not the same image"):
        fuse_images([fresh, other_class])
