"""Error analysis: operating point, misses, top false positives, size bins, gallery."""

from __future__ import annotations

import logging
import math
import struct

import numpy as np
import pytest

from common.detector.errors import (
    BY_SIZE_KEY,
    ERRORS_KEY,
    FALSE_POSITIVE_CASE,
    MISS,
    SizeTable,
    class_errors,
    crop_window,
    gallery_name,
    lesion_outcomes,
    missed_lesions,
    operating_point,
    plot_error_gallery,
    size_bin_names,
    size_table,
    top_false_positives,
    write_error_outputs,
)
from common.detector.froc import (
    FrocImage,
    froc_class,
    match_image,
    match_image_lesions,
)

MASS, CALC = 0, 1
SP = 0.1  # mm per pixel
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def box_mm(cx: float, cy: float, side_mm: float) -> list[float]:
    """A square box of ``side_mm`` centred at pixel ``(cx, cy)`` (0.1 mm pixels)."""
    h = side_mm / SP / 2
    return [cx - h, cy - h, cx + h, cy + h]


def img(key, gt=(), gl=None, dets=(), scores=(), labels=None, ignore=()):
    gt, dets = list(gt), list(dets)
    return FrocImage(
        key=key,
        spacing_mm=SP,
        gt_boxes=np.array(gt, dtype=float).reshape(-1, 4),
        gt_labels=np.array(gl if gl is not None else [MASS] * len(gt), np.int64),
        ignore_boxes=np.array(ignore, dtype=float).reshape(-1, 4),
        det_boxes=np.array(dets, dtype=float).reshape(-1, 4),
        det_scores=np.array(scores, dtype=float),
        det_labels=np.array(
            labels if labels is not None else [MASS] * len(dets), np.int64
        ),
    )


#: L1: 20 mm mass in image a, hit at 0.9 (found); L2: 4 mm mass in b, hit only
#: at 0.1 (missed, found lower); L3: 8 mm mass in b, no detection near it
#: (missed, never found). False positives 0.95 (c), 0.8 (a), 0.3 (c), 0.2 (c);
#: a duplicate (0.85, near L1) and an ignored one (0.99, c) are not errors. With
#: 3 images, 1 FP/image is reached at threshold 0.3 (3 FPs), 0.2 would be 4/3.
L1, L2, L3 = box_mm(500, 500, 20), box_mm(200, 200, 4), box_mm(800, 800, 8)


def scenario() -> list[FrocImage]:
    a = img(
        "a",
        gt=[L1],
        dets=[box_mm(505, 500, 10), box_mm(495, 500, 10), box_mm(100, 900, 6)],
        scores=[0.9, 0.85, 0.8],
    )
    b = img("b", gt=[L2, L3], dets=[box_mm(201, 200, 4)], scores=[0.1])
    c = img(
        "c",
        dets=[
            box_mm(300, 300, 12),
            box_mm(600, 100, 5),
            box_mm(50, 50, 3),
            box_mm(900, 900, 5),
        ],
        scores=[0.95, 0.3, 0.2, 0.99],
        ignore=[[850, 850, 950, 950]],
    )
    return [a, b, c]


def test_operating_point_matches_the_froc_at_1_fp_per_image():
    images = scenario()
    p = operating_point(images, MASS, 1.0)
    assert p.threshold == pytest.approx(0.3)
    assert p.fp_per_image == pytest.approx(1.0)
    r = froc_class(images, MASS)
    assert p.sensitivity == pytest.approx(r.sens_at[1.0]) == pytest.approx(1 / 3)
    # a stricter rate moves the threshold up: at 0.5 FP/image only 0.95 counts,
    # and the lowest point with one FP is the duplicate's (0.85)
    assert operating_point(images, MASS, 0.5).threshold == pytest.approx(0.85)
    # no FP at all: down to the ignored detection (0.99), above the first FP
    assert operating_point(images, MASS, 0.0).threshold == pytest.approx(0.99)
    only_fp = [img("z", dets=[box_mm(100, 100, 5)], scores=[0.5])]
    assert operating_point(only_fp, MASS, 0.0).threshold == math.inf


def test_misses_are_exactly_the_lesions_not_hit_above_the_threshold():
    ce = class_errors(scenario(), MASS)
    found = {(o.key, o.index): o.found for o in ce.lesions}
    assert found == {("a", 0): True, ("b", 0): False, ("b", 1): False}
    # largest first: L3 (8 mm, never found), then L2 (4 mm, found at 0.1 only)
    assert [(c.kind, c.key, c.box) for c in ce.missed] == [
        (MISS, "b", tuple(L3)),
        (MISS, "b", tuple(L2)),
    ]
    assert ce.missed[0].score is None and ce.missed[0].det_boxes == ()
    assert ce.missed[1].score == pytest.approx(0.1)
    assert ce.missed[1].det_boxes == (tuple(box_mm(201, 200, 4)),)
    assert ce.n_missed == 2
    assert ce.missed[0].size_mm == pytest.approx(8.0)


def test_top_false_positives_skip_duplicates_and_ignored():
    fps = top_false_positives(scenario(), MASS, n=24)
    assert [round(c.score or 0, 2) for c in fps] == [0.95, 0.8, 0.3, 0.2]
    assert [c.key for c in fps] == ["c", "a", "c", "c"]
    assert all(c.kind == FALSE_POSITIVE_CASE for c in fps)
    assert fps[0].size_mm == pytest.approx(12.0)
    # the FP of image a is drawn with a's lesion for context
    assert fps[1].gt_boxes == (tuple(L1),)
    assert [c.score for c in top_false_positives(scenario(), MASS, n=1)] == [0.95]


def test_gallery_sizes_cap_what_is_shown_not_what_is_counted():
    ce = class_errors(scenario(), MASS, n_missed=1, n_fp=2)
    assert [c.box for c in ce.missed] == [tuple(L3)]
    assert [round(c.score or 0, 2) for c in ce.false_positives] == [0.95, 0.8]
    assert ce.n_missed == 2 and ce.n_false_positives == 4
    doc = ce.errors_json("x.png")
    assert doc["n_missed"] == 2 and len(doc["missed"]) == 1
    assert doc["missed"][0] == {
        "kind": MISS,
        "key": "b",
        "box": [round(v, 2) for v in L3],
        "score": None,
        "size_mm": 8.0,
    }
    with pytest.raises(ValueError, match="n must be >= 0, got -1"):
        class_errors(scenario(), MASS, n_missed=-1)
    with pytest.raises(ValueError, match="n_fp must be >= 0, got -2"):
        class_errors(scenario(), MASS, n_fp=-2)


def test_size_bins_count_lesions_and_found_ones():
    ce = class_errors(scenario(), MASS)
    by = {b.name: (b.n_lesions, b.n_found, b.sensitivity) for b in ce.bins}
    assert by == {
        "<5": (1, 0, 0.0),
        "5-10": (1, 0, 0.0),
        "10-20": (0, 0, None),
        ">=20": (1, 1, 1.0),  # 20 mm is in [20, inf)
    }
    rec = ce.size_record()
    assert rec.threshold == pytest.approx(0.3)
    assert (rec.n_lesions, rec.n_found, rec.n_images) == (3, 1, 3)
    assert SizeTable.from_json(rec.to_json()) == rec


def test_size_table_edges_are_half_open_and_validated():
    outs = lesion_outcomes(scenario(), MASS, threshold=0.0)  # all found but L3
    bins = size_table(outs, [4.0, 8.0])
    assert [(b.name, b.n_lesions, b.n_found) for b in bins] == [
        ("<4", 0, 0),
        ("4-8", 1, 1),  # L2 is exactly 4 mm
        (">=8", 2, 1),  # L3 (8 mm, missed) and L1
    ]
    assert bins[0].hi_mm == 4.0 and bins[-1].hi_mm is None
    assert size_bin_names([2.5]) == ["<2.5", ">=2.5"]
    assert size_bin_names([]) == ["all"]
    assert [b.n_lesions for b in size_table(outs, [])] == [3]
    for bad in ([10.0, 5.0], [0.0, 5.0], [5.0, 5.0], [float("nan")]):
        with pytest.raises(ValueError, match="strictly increasing"):
            size_table(outs, bad)


def random_box(rng: np.random.Generator) -> list[float]:
    """A square box of 2-30 mm anywhere in a 1000 px (100 mm) image."""
    return box_mm(*rng.uniform(50, 950, 2), rng.uniform(2, 30))


def test_found_lesions_over_bins_equal_froc_sensitivity_random():
    rng = np.random.default_rng(3)
    for trial in range(20):
        images = []
        for i in range(int(rng.integers(1, 7))):
            n_gt, n_det = int(rng.integers(0, 4)), int(rng.integers(0, 6))
            gt = [random_box(rng) for _ in range(n_gt)]
            dets = [random_box(rng) for _ in range(n_det)]
            images.append(
                img(
                    f"{trial}-{i}", gt=gt, gl=rng.integers(0, 2, n_gt), dets=dets,
                    scores=rng.choice([0.2, 0.4, 0.6, 0.8], n_det),
                    labels=rng.integers(0, 2, n_det),
                )
            )  # fmt: skip
        for label in (MASS, CALC):
            for rate in (0.25, 1.0, 4.0):
                r = froc_class(images, label)
                ce = class_errors(images, label, fp_rate=rate)
                n = sum(b.n_lesions for b in ce.bins)
                assert n == r.n_lesions
                if n:
                    found = sum(b.n_found for b in ce.bins)
                    assert found / n == pytest.approx(r.sens_at[rate])
                assert ce.point.fp_per_image <= rate + 1e-12


def test_match_image_lesions_agrees_with_match_image_and_picks_the_nearest():
    # one detection within reach of two lesions hits the nearer one
    near, far = box_mm(100, 100, 10), box_mm(160, 100, 10)
    im = img("n", gt=[far, near], dets=[box_mm(110, 100, 6)], scores=[0.7])
    scores, outcomes, hit_by = match_image_lesions(im, MASS)
    assert hit_by.tolist() == [-1, 0]
    s2, o2, n = match_image(im, MASS)
    assert np.array_equal(scores, s2) and np.array_equal(outcomes, o2) and n == 2
    # a calcification detection never hits a mass
    other = img("o", gt=[near], dets=[box_mm(100, 100, 10)], scores=[0.9], labels=[1])
    assert match_image_lesions(other, MASS)[2].tolist() == [-1]


def test_class_absent_and_no_images_do_not_crash(tmp_path, caplog):
    images = scenario()  # masses only
    ce = class_errors(images, CALC)
    assert ce.lesions == [] and ce.missed == [] and ce.false_positives == []
    assert ce.point.threshold == math.inf and math.isnan(ce.point.sensitivity)
    assert ce.empty_reason() == (
        "no calcification lesion and no calcification false positive"
    )
    rec = ce.size_record().to_json()
    assert rec["threshold"] is None and rec["sensitivity"] is None
    assert all(b["n_lesions"] == 0 for b in rec["bins"])

    empty = class_errors([], MASS)
    assert empty.point.threshold == math.inf and empty.n_images == 0
    assert empty.empty_reason() == "no images were scored"
    with caplog.at_level(logging.INFO, logger="common.detector.errors"):
        doc = write_error_outputs([], tmp_path / "none", lambda k: np.zeros((4, 4)))
    assert not (tmp_path / "none").exists()  # nothing written
    assert doc[ERRORS_KEY]["mass"]["gallery"] is None
    assert doc[BY_SIZE_KEY]["mass"]["n_images"] == 0
    assert "no error gallery: no images were scored" in caplog.text

    with pytest.raises(ValueError, match="label must be in"):
        class_errors(images, 2)
    with pytest.raises(ValueError, match="fp_rate must be finite and >= 0, got -1"):
        operating_point(images, MASS, -1.0)


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return struct.unpack(">II", data[16:24])


def test_gallery_png_for_each_class(tmp_path, caplog):
    rng = np.random.default_rng(0)
    pixels = {k: rng.random((1000, 1000)).astype(np.float32) for k in "abc"}
    with caplog.at_level(logging.INFO, logger="common.detector.errors"):
        doc = write_error_outputs(scenario(), tmp_path, pixels.__getitem__, title="t")
    w, h = _png_size(tmp_path / gallery_name("mass"))
    assert w > 500 and h > 300  # thumbnails, not the one-line note
    nw, nh = _png_size(tmp_path / gallery_name("calcification"))
    assert nh < h  # the "nothing to show" note
    assert "calcification: error gallery empty: no calcification lesion" in caplog.text
    assert "mass at 1 FP/image: 1/3 lesions found by size" in caplog.text
    assert doc[ERRORS_KEY]["mass"]["gallery"] == "errors-mass.png"
    assert [c["key"] for c in doc[ERRORS_KEY]["mass"]["false_positives"]] == [
        "c", "a", "c", "c",
    ]  # fmt: skip
    assert doc[BY_SIZE_KEY]["mass"]["n_found"] == 1


def test_gallery_survives_an_image_it_cannot_load(tmp_path, caplog):
    ce = class_errors(scenario(), MASS)

    def only_a(key: str) -> np.ndarray:
        if key != "a":
            raise FileNotFoundError(f"no pixels for {key}")
        return np.zeros((1000, 1000), np.float32)

    with caplog.at_level(logging.WARNING, logger="common.detector.errors"):
        out = plot_error_gallery(ce, only_a, tmp_path / "g" / "e.png")
    assert _png_size(out)[0] > 0
    assert "image b not loaded: no pixels for b" in caplog.text


def test_crop_window_is_centred_and_clipped():
    # 8 mm minimum half side at 0.1 mm = 80 px
    assert crop_window([480, 480, 520, 520], (1000, 1000), 0.1) == (420, 420, 580, 580)
    # a large box: half side = its longer side
    assert crop_window([400, 450, 600, 550], (1000, 1000), 0.1) == (300, 300, 700, 700)
    # at the corner, clipped to the image
    assert crop_window([0, 0, 10, 10], (50, 40), 0.1) == (0, 0, 40, 50)


def test_missed_lesions_rejects_negative_n():
    with pytest.raises(ValueError, match="n must be >= 0"):
        missed_lesions([], -1)
