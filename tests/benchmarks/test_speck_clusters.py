"""benchmarks.speck_clusters: the replacement and the nested selection."""

from __future__ import annotations

import numpy as np

from benchmarks.speck_clusters import GRID, cache_key, nested, replace_clusters
from common.detector.froc import FrocImage, froc_class

CLUSTER = [[40.0, 40.0, 9.0], [42.0, 41.0, 8.0], [41.0, 43.0, 7.0]]
GRAIN = [[100.0 + 7 * i, 150.0, 4.0] for i in range(12)]  # apart: no cluster


def _image(i: int, with_cluster: bool) -> tuple[FrocImage, np.ndarray]:
    gt = [[35.0, 35.0, 47.0, 48.0]] if with_cluster else []
    im = FrocImage(
        key=f"site/k{i}",
        spacing_mm=0.4,
        gt_boxes=np.array(gt).reshape(-1, 4),
        gt_labels=np.ones(len(gt), np.int64),
        det_boxes=np.array([[0, 0, 5, 5], [200, 200, 210, 210]], float),
        det_scores=np.array([0.9, 0.8]),
        det_labels=np.array([0, 1]),  # a mass and a (false) network cluster
        case=f"w{i // 2}",
    )
    specks = np.array((CLUSTER if with_cluster else []) + GRAIN, np.float32)
    return im, specks


def test_replace_and_nested_selection_find_the_clusters():
    pairs = [_image(i, i % 2 == 0) for i in range(20)]
    images = [p[0] for p in pairs]
    specks = {p[0].key: p[1] for p in pairs}
    assert cache_key("site/k3") == "k3"
    # the network's clusters miss every lesion; the specks' hit every one first
    assert froc_class(images, 1).cpm == 0.0
    new = replace_clusters(images, specks, k=3, radius_mm=5.0, ref_rank=10)
    assert froc_class(new, 1).cpm == 1.0
    for a, b in zip(images, new, strict=True):  # masses kept, network clusters gone
        assert list(b.det_scores[b.det_labels == 0]) == list(
            a.det_scores[a.det_labels == 0]
        )
        assert not np.any((b.det_labels == 1) & (b.det_boxes[:, 0] == 200))
    folds = {im.key: i % 4 for i, im in enumerate(images)}
    out, chosen = nested(images, folds, specks)
    assert sorted(im.key for im in out) == sorted(im.key for im in images)
    assert len(chosen) == 4 and all(c in GRID for c in chosen)
    # k = 4 finds no three-speck cluster: never chosen when k <= 3 hits all
    assert all(c[0] <= 3 for c in chosen)
    assert froc_class(out, 1).cpm == 1.0
