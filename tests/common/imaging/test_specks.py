"""Calcification specks at the stored resolution and the clusters they form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from common.imaging.cache import CacheError, SiteCache
from common.imaging.image_io import read_any
from common.imaging.specks import (
    CLUSTER_RADIUS_MM,
    check_specks,
    find_specks,
    speck_clusters,
    with_speck_clusters,
)
from common.keys import CALCIFICATION, CLASS_TO_LABEL, MASS

CALC, MASS_L = CLASS_TO_LABEL[CALCIFICATION], CLASS_TO_LABEL[MASS]
#: stored (x, y) of a five-speck cluster (0.2 mm pixels: within 2 mm)
CLUSTER = [(100, 200), (104, 203), (98, 206), (106, 209), (101, 211)]
LONE = (140, 320)  # one bright speck, far from everything
PAIR = [(90, 380), (93, 383)]  # two specks: not a cluster


def _mammogram(path: Path, *, right: bool = True, seed: int = 0) -> None:
    """A 0.2 mm film-like PNG: textured breast (on the right when ``right``),
    the cluster, a lone speck and a pair, each speck one pixel."""
    rng = np.random.default_rng(seed)
    h, w = 480, 300
    tissue = ndimage.gaussian_filter(rng.random((h, w)), 6) * 0.3 + 0.4
    grain = rng.normal(0, 0.01, (h, w))
    px = np.zeros((h, w))
    px[20:460, 0:220] = (tissue + grain)[20:460, 0:220]
    for x, y in [*CLUSTER, LONE, *PAIR]:
        px[y, x] += 0.25
    if right:
        px = px[:, ::-1]
    Image.fromarray(np.clip(px * 255, 0, 255).astype(np.uint8)).save(path)


def _stored(xy: tuple[int, int], right: bool, w: int = 300) -> tuple[float, float]:
    x, y = xy
    return ((w - 1 - x) if right else x) + 0.5, y + 0.5


@pytest.mark.parametrize("right", [True, False])
def test_specks_are_found_where_they_are_in_model_space(tmp_path, right):
    _mammogram(tmp_path / "m.png", right=right)
    im = read_any(
        tmp_path / "m.png", working_spacing_mm=0.4, spacing_mm=0.2, specks=True
    )
    assert im.geometry.flip is right
    s = im.specks
    assert s is not None and s.dtype == np.float32 and s.shape[1] == 3
    assert np.all(np.diff(s[:, 2]) <= 0)  # brightest first
    for xy in [*CLUSTER, LONE, *PAIR]:
        sx, sy = _stored(xy, right)
        want = im.geometry.to_model(np.array([[sx, sy, sx, sy]]))[0, :2]
        d = np.hypot(*(s[:, :2] - want).T)
        assert d.min() <= 1.0, f"speck at stored {xy} not found (nearest {d.min()})"
    # the planted specks are the brightest things in the breast
    top = s[:8, :2]
    for xy in CLUSTER:
        sx, sy = _stored(xy, right)
        want = im.geometry.to_model(np.array([[sx, sy, sx, sy]]))[0, :2]
        assert np.hypot(*(top - want).T).min() <= 1.0
    # not asked: none
    assert (
        read_any(tmp_path / "m.png", working_spacing_mm=0.4, spacing_mm=0.2).specks
        is None
    )


def test_clusters_need_three_specks_close_together(tmp_path):
    _mammogram(tmp_path / "m.png")
    im = read_any(
        tmp_path / "m.png", working_spacing_mm=0.4, spacing_mm=0.2, specks=True
    )
    assert im.specks is not None
    boxes, scores = speck_clusters(im.specks, 0.4)
    assert len(boxes) >= 1 and np.all((scores > 0) & (scores < 1))
    assert np.all(np.diff(scores) <= 0)
    best = boxes[0]
    centre = im.geometry.to_model(
        np.array([[*_stored(CLUSTER[0], True), *_stored(CLUSTER[-1], True)]])
    )[0]
    cx, cy = (best[0] + best[2]) / 2, (best[1] + best[3]) / 2
    assert abs(cx - (centre[0] + centre[2]) / 2) < 4
    assert abs(cy - (centre[1] + centre[3]) / 2) < 4
    # the lone speck and the pair make no cluster of their own
    for xy in (LONE, PAIR[0]):
        sx, sy = _stored(xy, True)
        m = im.geometry.to_model(np.array([[sx, sy, sx, sy]]))[0]
        cen = np.stack(
            [(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1
        )
        near = np.hypot(*(cen - m[:2]).T) * 0.4 < 2.0
        assert not np.any(near & (scores >= scores[0] * 0.9))


def test_cluster_rule_on_hand_made_specks():
    sp = 0.4
    r = CLUSTER_RADIUS_MM / sp
    grain = [[200.0 + 30 * i, 400.0, 5.0] for i in range(12)]  # far apart, dim
    three = [[50.0, 50.0, 9.0], [52.0, 51.0, 8.0], [51.0, 50.0 + r * 0.8, 7.0]]
    two = [[150.0, 150.0, 20.0], [151.0, 151.0, 19.0]]  # bright, but only two
    specks = np.array(three + two + grain, np.float32)
    boxes, scores = speck_clusters(specks, sp)
    assert len(boxes) == 1  # the pair and the lone grain specks are no cluster
    b = boxes[0]
    assert b[0] <= 50 <= b[2] and b[1] <= 50 and b[3] >= 50 + r * 0.8
    # k = 2 lets the bright pair through, and first
    boxes2, _ = speck_clusters(specks, sp, k=2)
    assert 150 <= (boxes2[0][0] + boxes2[0][2]) / 2 <= 151
    # scores are relative to the image's own specks: scaling every z changes none
    scaled = specks.copy()
    scaled[:, 2] *= 10
    np.testing.assert_allclose(speck_clusters(scaled, sp)[1], scores, rtol=1e-5)
    # fewer specks than k: nothing
    assert speck_clusters(specks[:2], sp)[0].shape == (0, 4)
    with pytest.raises(ValueError, match="k >= 1"):
        speck_clusters(specks, sp, k=0)


def test_with_speck_clusters_replaces_calcifications_only():
    specks = np.array(
        [[50, 50, 9], [52, 51, 8], [51, 53, 7]]
        + [[300, 300 + i, 4] for i in range(0, 300, 20)],
        np.float32,
    )
    det = {
        "boxes": np.array(
            [[0, 0, 10, 10], [100, 100, 120, 120], [5, 5, 9, 9]], np.float32
        ),
        "scores": np.array([0.9, 0.2, 0.8], np.float32),
        "labels": np.array([MASS_L, MASS_L, CALC]),
    }
    out = with_speck_clusters(det, specks, 0.4)
    masses = out["labels"] == MASS_L
    assert out["scores"].dtype == np.float32  # the detector's dtype kept
    np.testing.assert_array_equal(out["scores"][masses], det["scores"][:2])
    as64 = {**det, "scores": det["scores"].astype(np.float64) + 1e-12}
    kept = with_speck_clusters(as64, specks, 0.4)
    assert kept["scores"].dtype == np.float64
    np.testing.assert_array_equal(
        kept["scores"][kept["labels"] == MASS_L], as64["scores"][:2]
    )
    calcs = out["boxes"][out["labels"] == CALC]
    assert len(calcs) == 1 and calcs[0][0] <= 50 <= calcs[0][2]  # the network's is gone
    assert np.all(np.diff(out["scores"]) <= 0)


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (np.zeros((3, 2), np.float32), "float\\[N, 3\\]"),
        (np.zeros((3, 3), np.int64), "float\\[N, 3\\]"),
        (np.array([[1.0, 2.0, np.nan]]), "non-finite"),
    ],
)
def test_check_specks_refuses(bad, why):
    with pytest.raises(ValueError, match=why):
        check_specks(bad, "here")


def test_cache_specks_file_is_checked(tmp_path):
    cache = SiteCache(tmp_path)
    cache.images_dir.mkdir(parents=True)
    assert cache.load_specks("k") is None
    np.save(cache.specks_path("k"), np.zeros((2, 3), np.float32))
    assert cache.load_specks("k").shape == (2, 3)
    # an object array would unpickle: refused unread
    np.save(
        cache.specks_path("k"), np.array([{"a": 1}], dtype=object), allow_pickle=True
    )
    with pytest.raises(CacheError, match="specks.npy"):
        cache.load_specks("k")
    np.save(cache.specks_path("k"), np.zeros((2, 4), np.float32))
    with pytest.raises(CacheError, match=r"k\.specks\.npy.*float\[N, 3\]"):
        cache.load_specks("k")
    # a header claiming a huge array: refused from the header, nothing read
    huge = np.lib.format.open_memmap(
        cache.specks_path("k"), mode="w+", dtype=np.float32, shape=(10**6, 3)
    )
    del huge
    with pytest.raises(CacheError, match="more than 4096"):
        cache.load_specks("k")
    cache.specks_path("k").write_bytes(b"not numpy")
    with pytest.raises(CacheError, match="unreadable specks file"):
        cache.load_specks("k")


def test_no_breast_no_specks():
    from common.imaging.geometry import Geometry

    flat = np.zeros((100, 100), np.float32)
    assert find_specks(flat, Geometry.identity((100, 100)), 0.2).shape == (0, 3)
    with pytest.raises(ValueError, match="stored_spacing_mm"):
        find_specks(flat, Geometry.identity((100, 100)), 0.0)


def test_one_mark_per_cluster_and_calibrated_scores():
    from common.imaging.specks import cluster_probability

    sp = 0.4
    grain = [[300.0 + 30 * i, 400.0, 5.0] for i in range(12)]
    a = [[50.0, 50.0, 9.0], [52.0, 51.0, 8.5], [51.0, 53.0, 8.0]]
    # three more specks 3 mm away: another neighbourhood, the same cluster
    b = [[57.5, 50.0, 7.9], [59.0, 52.0, 7.8], [58.0, 54.0, 7.7]]
    boxes, scores = speck_clusters(np.array(a + b + grain, np.float32), sp)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    d = np.hypot(*(centres[:, None] - centres[None]).transpose(2, 0, 1))
    assert np.all(d[np.triu_indices(len(boxes), 1)] * sp > 5.0)
    # the score is monotone in the ratio, 0.5 where the fit puts it, in (0, 1)
    r = np.array([0.5, 1.0, 1.5, 2.0, 3.0, 10.0])
    p = np.array([cluster_probability(x) for x in r])
    assert np.all(np.diff(p) > 0) and np.all((p > 0) & (p < 1))
    assert cluster_probability(0.0) == 0.0
    assert cluster_probability(2.0) == pytest.approx(0.12, abs=0.02)
