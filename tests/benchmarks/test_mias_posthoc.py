"""The post-hoc mini-MIAS analyses: rank rules, nested re-scoring, speck clusters."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from benchmarks.mias_posthoc import (
    CALC,
    CONVERGENCE,
    MASS,
    WHERE,
    CachedImage,
    convergence_features,
    convergence_maps,
    nested_rescore,
    rank_rule,
    speck_clusters,
    speck_peaks,
    where_features,
)
from common.detector.froc import FrocImage, froc_class
from common.imaging.geometry import Geometry


def _image(i: int, hit_score: float, fp_score: float) -> FrocImage:
    """One mass at (100, 100)-(150, 150); a hit on it and a false positive."""
    return FrocImage(
        key=f"im{i}",
        spacing_mm=0.4,
        gt_boxes=np.array([[100.0, 100.0, 150.0, 150.0]]),
        gt_labels=np.array([MASS]),
        det_boxes=np.array(
            [
                [110.0, 110.0, 140.0, 140.0],
                [400.0, 400.0, 430.0, 430.0],
                [10.0, 10.0, 20.0, 20.0],
            ]
        ),  # fmt: skip
        det_scores=np.array([hit_score, fp_score, 0.9]),
        det_labels=np.array([MASS, MASS, CALC]),
        case=f"w{i}",
    )


def test_rank_rules_keep_the_top_mass_marks_and_every_cluster_mark() -> None:
    ims = [_image(0, 0.3, 0.8)]
    (top1,) = rank_rule(ims, "top1")
    assert list(top1.det_scores) == [0.8, 0.9] and list(top1.det_labels) == [MASS, CALC]
    (rel,) = rank_rule(ims, "rel")
    assert rel.det_scores[1] == pytest.approx(0.8)  # the best keeps its score
    assert rel.det_scores[0] == pytest.approx(0.3 * np.sqrt(0.3 / 0.8))
    assert rel.det_scores[2] == pytest.approx(0.9)  # clusters untouched
    with pytest.raises(ValueError, match="topK or rel"):
        rank_rule(ims, "bottom")


def test_nested_rescore_learns_a_feature_from_the_other_folds_only() -> None:
    """Hits score below false positives, but a feature marks them: re-scored
    out of fold, every mass is found before any false positive."""
    rng = np.random.default_rng(0)
    ims = [
        _image(i, 0.2 + 0.1 * rng.random(), 0.6 + 0.1 * rng.random()) for i in range(20)
    ]
    folds = [i % 4 for i in range(20)]
    mark = np.array([[0.0, 1.0], [0.0, -1.0], [0.0, 0.0]])
    feats = [mark + rng.normal(0, 0.1, (3, 2)) for _ in ims]
    before = froc_class(ims, MASS)
    after = nested_rescore(ims, folds, feats, [1])
    assert before.sens_at[0.25] == 0.0
    assert froc_class(after, MASS).sens_at[0.25] == 1.0
    assert [a.det_scores[2] for a in after] == [0.9] * 20  # other class untouched
    healthy = [
        dataclasses.replace(im, gt_boxes=np.zeros((0, 4)), gt_labels=np.zeros(0))
        for im in ims[:2]
    ]  # only false positives: nothing to learn from
    with pytest.raises(ValueError, match="one outcome only"):
        nested_rescore(healthy, [0, 1], feats[:2], [1])


def test_speck_peaks_and_clusters_on_a_synthetic_film() -> None:
    """Five bright specks within 2 mm make one cluster; a lone speck none."""
    rng = np.random.default_rng(1)
    img = np.full((400, 400), 120.0) + rng.normal(0, 2.0, (400, 400))
    img[:, :20] = 0  # background beside the breast
    for y, x in [(200, 200), (203, 206), (208, 201), (196, 209), (205, 212), (80, 320)]:
        img[y - 1 : y + 1, x - 1 : x + 1] += 60.0
    peaks = speck_peaks(img.astype(np.float32), (0, 0, 400, 400), spacing_mm=0.2)
    strong = peaks[peaks[:, 2] > 8]
    assert len(strong) == 6
    boxes, scores = speck_clusters(peaks, z_min=8, link_px=25, k_min=3, min_box_px=30)
    assert boxes.shape == (1, 4) and len(scores) == 1
    cx, cy = (boxes[0, 0] + boxes[0, 2]) / 2, (boxes[0, 1] + boxes[0, 3]) / 2
    assert abs(cx - 205) < 6 and abs(cy - 202) < 6
    assert boxes[0, 2] - boxes[0, 0] >= 30


def test_an_oof_file_without_folds_is_refused_not_scored_nan(tmp_path) -> None:
    import json

    from benchmarks.mias_posthoc import analyse

    oof = tmp_path / "oof_predictions.json"
    records = [_image(i, 0.8, 0.3).to_json() for i in range(4)]
    records[2]["fold"] = 1  # one record has its fold, three do not
    oof.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"oof_predictions\.json: 3 of 4 records"):
        analyse(oof, tmp_path / "no-cache", analyses=["rank"], n_boot=10)


def _marks(boxes, scores, labels) -> FrocImage:
    """One mass at (100, 100)-(150, 150) at 0.4 mm; the given marks."""
    return FrocImage(
        key="im",
        spacing_mm=0.4,
        gt_boxes=np.array([[100.0, 100.0, 150.0, 150.0]]),
        gt_labels=np.array([MASS]),
        det_boxes=np.asarray(boxes, np.float64),
        det_scores=np.asarray(scores, np.float64),
        det_labels=np.asarray(labels, np.int64),
    )


def test_suppress_rules_thin_marks_side_by_side_per_class() -> None:
    """Two false marks on one region (IoU about 0.39, which the model's NMS
    at 0.6 keeps) cost two false positives; reach and IoU 0.3 keep one. A
    cluster mark on the same spot is another class and stays."""
    from benchmarks.mias_posthoc import suppress_rule

    im = _marks(
        [
            [400.0, 400.0, 460.0, 460.0],  # false, 0.8
            [415.0, 415.0, 475.0, 475.0],  # false, 0.7, centre 8.5 mm away
            [110.0, 110.0, 140.0, 140.0],  # the hit, 0.6
            [400.0, 400.0, 460.0, 460.0],  # a cluster mark on the same spot
        ],
        [0.8, 0.7, 0.6, 0.9],
        [MASS, MASS, MASS, CALC],
    )
    before = froc_class([im], MASS)
    assert before.n_detections == 3
    for mode in ("reach", "iou0.3", "iou0.1"):
        (thin,) = suppress_rule([im], mode)
        assert sorted(thin.det_scores.tolist()) == [0.6, 0.8, 0.9], mode
        assert list(thin.det_labels[thin.det_scores == 0.9]) == [CALC]
        assert froc_class([thin], MASS).n_detections == 2
    # beyond the reach (half the diagonal, 17 mm) and IoU 0: both stay
    far = _marks(
        [[400.0, 400.0, 460.0, 460.0], [480.0, 480.0, 540.0, 540.0]],
        [0.8, 0.7],
        [MASS, MASS],
    )
    for mode in ("reach", "iou0.1"):
        assert len(suppress_rule([far], mode)[0].det_scores) == 2
    # a lesion's mark within the reach of a higher false mark is lost: the
    # rule's risk, which the benchmark measures
    near = _marks(
        [[95.0, 95.0, 165.0, 165.0], [110.0, 110.0, 140.0, 140.0]],
        [0.9, 0.5],
        [MASS, MASS],
    )
    (thin,) = suppress_rule([near], "reach")
    assert thin.det_scores.tolist() == [0.9]
    with pytest.raises(ValueError, match="suppress rule 'iou'"):
        suppress_rule([im], "iou")


def test_analyse_reads_gzipped_oof_files_with_their_folds(tmp_path) -> None:
    import gzip
    import json

    from benchmarks.mias_posthoc import analyse

    records = [dict(_image(i, 0.8, 0.3).to_json(), fold=i % 2) for i in range(4)]
    oof = tmp_path / "oof_predictions.json.gz"
    oof.write_bytes(gzip.compress(json.dumps(records).encode()))
    rows = analyse(oof, tmp_path / "no-cache", analyses=["suppress"], n_boot=10)
    sup = [r for r in rows if r["analysis"] == "suppress"]
    assert {(r["variant"], r["class"]) for r in sup} == {
        (m, c) for m in ("iou0.3", "iou0.1", "reach") for c in ("mass", "calcification")
    }
    # nothing to thin in these images: every variant scores as the detector
    # (no calcification lesion here, so only the masses have a CPM)
    assert all(r["minus_detector"] == 0.0 for r in sup if r["class"] == "mass")
    assert all(r["marks_per_image"] == 3.0 for r in sup)
    bad = tmp_path / "oof.json"
    bad.write_text('{"key": "not a list"}')
    with pytest.raises(ValueError, match=r"oof\.json: not an oof_predictions.*list"):
        analyse(bad, tmp_path / "no-cache", analyses=["suppress"], n_boot=10)


def _cached(pixels: np.ndarray, density: str = "") -> CachedImage:
    """A left MLO whose 500 x 250 crop is the whole stored image."""
    return CachedImage(
        pixels=pixels,
        patient="w0",
        view="MLO",
        laterality="L",
        geometry=Geometry.from_dict(
            {
                "stored_shape": [500, 250],
                "crop": [0, 0, 250, 500],
                "flip": False,
                "model_shape": [500, 250],
            }
        ),
        source=Path("im0.pgm"),
        density=density,
    )


def test_where_features_place_size_rank_and_density_of_each_mark() -> None:
    """In a 500 x 250 (H x W) crop: the hit (score 0.3) is the image's second
    mass mark, the false positive (0.8) its first; the cluster mark is ranked
    among nothing and keeps rank 0."""
    im = _image(0, 0.3, 0.8)
    cached = {"im0": _cached(np.zeros((500, 250), np.float32), density="d")}
    (f,) = where_features([im], cached)
    col = {name: i for i, name in enumerate(WHERE)}
    assert f.shape == (3, len(WHERE))
    assert f[0, col["x"]] == pytest.approx(125 / 250)
    assert f[0, col["y"]] == pytest.approx(125 / 500)
    assert f[0, col["y2"]] == pytest.approx((125 / 500) ** 2)
    assert f[0, col["log_size_mm"]] == pytest.approx(np.log(30 * 0.4))
    assert list(f[:, col["rank_in_image"]]) == [1.0, 0.0, 0.0]
    assert f[0, col["image_top_logit"]] == pytest.approx(np.log(0.8 / 0.2))
    assert f[0, col["logit"]] == pytest.approx(np.log(0.3 / 0.7))
    assert set(f[:, col["dense"]]) == {1.0}  # "d" is mini-MIAS's D
    cached["im0"] = dataclasses.replace(cached["im0"], density="F")
    (f,) = where_features([im], cached)
    assert set(f[:, col["dense"]]) == {0.0}


def _blob_image(h: int = 500, w: int = 250, seed: int = 0) -> np.ndarray:
    """A noisy breast (a dark strip at the left edge as background) with one
    bright round blob of sigma 15 px centred at (x, y) = (125, 125) and a
    bright straight band along y = 380."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = 0.5 + rng.normal(0, 0.02, (h, w))
    img += 0.3 * np.exp(-((xx - 125) ** 2 + (yy - 125) ** 2) / (2 * 15.0**2))
    img += 0.3 * np.exp(-((yy - 380) ** 2) / (2 * 6.0**2))
    img[:, :4] = 0.0
    return img.astype(np.float32)


def test_convergence_maps_peak_on_a_round_blob_not_on_a_band_or_texture() -> None:
    """The gradient field converges on the blob's centre (near 1 in the bands
    its edge falls in); a straight band's two edges reach 2/pi at most (the
    mean |sin| around a circle), noise about 0."""
    maps = convergence_maps(_blob_image(), 0.4)
    assert maps.shape == (3, 500, 250)
    assert np.all(np.abs(maps) <= 1.0 + 1e-5)
    for band in (0, 1):
        peak = np.unravel_index(int(maps[band].argmax()), maps[band].shape)
        assert abs(peak[0] - 125) <= 3 and abs(peak[1] - 125) <= 3, (band, peak)
        assert maps[band, 125, 125] > 0.95
        assert maps[band, 380, 125] < 2 / np.pi + 0.02  # parallel edges
        assert abs(float(maps[band, 250, 200])) < 0.2  # texture
    assert np.all(maps[:, :, :4] == 0.0)  # outside the breast
    # gray scale and contrast do not matter, directions only
    again = convergence_maps(_blob_image() * 3.0 + 7.0, 0.4)
    np.testing.assert_allclose(again[:, :, 8:], maps[:, :, 8:], atol=1e-4)


def test_convergence_features_score_the_blob_mark_above_the_band_mark() -> None:
    """A mark on the blob: high convergence, low coherence; a mark on the
    band: lower convergence; a mark on the band's upper edge: the gradient's
    directions agree (coherence near 1); the logit column is the score's."""
    box_blob = [105.0, 105.0, 145.0, 145.0]
    box_band = [105.0, 360.0, 145.0, 400.0]
    box_edge = [105.0, 362.0, 145.0, 378.0]
    im = FrocImage(
        key="im0",
        spacing_mm=0.4,
        gt_boxes=np.array([box_blob]),
        gt_labels=np.array([MASS]),
        det_boxes=np.array([box_blob, box_band, box_edge]),
        det_scores=np.array([0.3, 0.6, 0.5]),
        det_labels=np.array([MASS, MASS, MASS]),
    )
    cached = {"im0": _cached(_blob_image())}
    (f,) = convergence_features([im], cached)
    col = {name: i for i, name in enumerate(CONVERGENCE)}
    assert f.shape == (3, len(CONVERGENCE))
    assert f[0, col["logit"]] == pytest.approx(np.log(0.3 / 0.7))
    for name in ("conv_centre", "conv_box_max", "conv_any_max"):
        assert f[0, col[name]] > 0.95 and f[1, col[name]] < 0.7, name
    assert f[2, col["grad_coherence"]] > 0.5 > 0.2 > f[0, col["grad_coherence"]]


def test_pooled_rows_average_the_seeds_and_skip_a_variant_one_file_lacks() -> None:
    """Two seeds: the re-scoring that swaps each image's hit above its false
    positive gains in both, the identity gains nothing; a variant only one
    seed has is not pooled; one file alone gives no pooled row."""
    from benchmarks.mias_posthoc import pooled_rows

    def seed_file(hit: float, fp: float) -> dict:
        ref = [_image(i, hit, fp) for i in range(12)]
        better = [_image(i, fp + 0.1, hit) for i in range(12)]
        return {
            ("where", "identity"): (ref, ref),
            ("where", "swap"): (ref, better),
        }

    a, b = seed_file(0.3, 0.8), seed_file(0.4, 0.7)
    b[("where", "only here")] = b[("where", "identity")]
    rows = {r["variant"]: r for r in pooled_rows([a, b], n_boot=50)}
    assert set(rows) == {"identity", "swap"}
    assert rows["identity"]["minus_detector"] == 0.0
    assert rows["identity"]["minus_detector_ci95"] == [0.0, 0.0]
    assert rows["swap"]["minus_detector"] > 0.2
    assert rows["swap"]["minus_detector_ci95"][0] > 0.0
    assert rows["swap"]["pooled_over"] == 2
    assert pooled_rows([a], n_boot=50) == []
