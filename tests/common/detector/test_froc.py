"""Hand-computed FROC cases (evaluation.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.detector.froc import (
    DUPLICATE,
    FALSE_POSITIVE,
    HIT,
    IGNORED,
    ClassMetrics,
    FrocImage,
    froc_all,
    froc_class,
    match_image,
    plot_froc,
)

MASS, CALC = 0, 1


def box_at(cx: float, cy: float, half: float = 10.0) -> list[float]:
    return [cx - half, cy - half, cx + half, cy + half]


def img(key, gt=(), gl=(), dets=(), scores=(), labels=None, ignore=(), sp=0.1):
    dets = list(dets)
    return FrocImage(
        key=key,
        spacing_mm=sp,
        gt_boxes=np.array(gt, dtype=float).reshape(-1, 4),
        gt_labels=np.array(gl, dtype=np.int64),
        ignore_boxes=np.array(ignore, dtype=float).reshape(-1, 4),
        det_boxes=np.array(dets, dtype=float).reshape(-1, 4),
        det_scores=np.array(scores, dtype=float),
        det_labels=np.array(
            labels if labels is not None else [MASS] * len(dets), dtype=np.int64
        ),
    )


def worked_example():
    im1 = img(
        "1",
        gt=[[100, 100, 200, 200]],
        gl=[MASS],
        dets=[box_at(150, 150), box_at(160, 150), box_at(900, 900)],
        scores=[0.9, 0.8, 0.7],
    )
    im2 = img("2", dets=[box_at(50, 50)], scores=[0.95])
    return [im1, im2]


def test_worked_example_cpm_08():
    r = froc_class(worked_example(), MASS)
    assert r.cpm == pytest.approx(0.8)
    assert r.sens_at[0.125] == 0 and r.sens_at[0.25] == 0
    for f in (0.5, 1.0, 2.0, 4.0):
        assert r.sens_at[f] == 1.0
    # curve: origin, (0.5, 0), (0.5, 1), (0.5, 1) duplicate, (1.0, 1)
    np.testing.assert_allclose(r.fp_per_image, [0, 0.5, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(r.sensitivity, [0, 0, 1, 1, 1])
    assert r.n_lesions == 1 and r.n_images == 2
    # AP: precision 1/2 at recall 1 (0.95 FP first, then hit)
    assert r.ap == pytest.approx(0.5)


def test_outcomes_duplicate_and_fp():
    s, o, n = match_image(worked_example()[0], MASS)
    assert n == 1
    assert list(o) == [HIT, DUPLICATE, FALSE_POSITIVE]


def test_miss_gives_zero_sensitivity():
    im = img(
        "m", gt=[[100, 100, 120, 120]], gl=[MASS], dets=[box_at(400, 400)], scores=[0.9]
    )
    r = froc_class([im], MASS)
    assert r.cpm == 0.0
    assert all(v == 0.0 for v in r.sens_at.values())
    assert r.ap == 0.0


def test_hit_radius_is_5mm_minimum_and_in_mm():
    # tiny lesion (diag 2.8 px) at 0.1 mm: radius 5 mm = 50 px
    gt = [[100, 100, 102, 102]]
    near = img("a", gt=gt, gl=[MASS], dets=[box_at(101 + 49, 101)], scores=[0.5])
    far = img("b", gt=gt, gl=[MASS], dets=[box_at(101 + 51, 101)], scores=[0.5])
    assert list(match_image(near, MASS)[1]) == [HIT]
    assert list(match_image(far, MASS)[1]) == [FALSE_POSITIVE]
    # at 0.2 mm/px the same 51 px offset is 10.2 mm: a miss; 24 px is a hit
    coarse = img(
        "c", gt=gt, gl=[MASS], dets=[box_at(101 + 24, 101)], scores=[0.5], sp=0.2
    )
    assert list(match_image(coarse, MASS)[1]) == [HIT]


def test_ignore_region_neither_hit_nor_fp():
    im = img(
        "i",
        ignore=[[300, 300, 400, 400]],
        dets=[box_at(350, 350), box_at(600, 600)],
        scores=[0.9, 0.8],
    )
    assert list(match_image(im, MASS)[1]) == [IGNORED, FALSE_POSITIVE]
    les = img("l", gt=[[0, 0, 20, 20]], gl=[MASS], dets=[box_at(10, 10)], scores=[0.1])
    r = froc_class([im, les], MASS)
    # only one FP over two images (the ignored one does not count)
    assert r.fp_per_image[-1] == pytest.approx(0.5)


def test_normal_image_counts_in_denominator():
    les = img(
        "l",
        gt=[[0, 0, 20, 20]],
        gl=[MASS],
        dets=[box_at(10, 10), box_at(500, 500)],
        scores=[0.9, 0.8],
    )
    r1 = froc_class([les], MASS)
    normals = [img(f"n{i}") for i in range(3)]
    r4 = froc_class([les, *normals], MASS)
    assert r1.fp_per_image[-1] == 1.0
    assert r4.fp_per_image[-1] == 0.25
    assert r1.sens_at[0.5] == 1.0  # origin->hit at fp 0 then FP
    assert r4.n_images == 4


def test_no_lesions_at_all_is_nan():
    r = froc_class([img("n", dets=[box_at(5, 5)], scores=[0.3])], MASS)
    assert math.isnan(r.cpm) and math.isnan(r.ap)
    assert all(math.isnan(v) for v in r.sens_at.values())
    d = ClassMetrics.from_result(r).to_json()
    assert d["cpm"] is None and d["curve"] is None
    assert ClassMetrics.from_json(d) == ClassMetrics.from_result(r)


def test_ties_in_score_processed_together():
    # one hit and one FP at the same score: one curve point (fp 1, sens 1),
    # never an intermediate (0, 1) that would depend on order
    a = img(
        "a",
        gt=[[0, 0, 20, 20]],
        gl=[MASS],
        dets=[box_at(500, 500), box_at(10, 10)],
        scores=[0.5, 0.5],
    )
    r = froc_class([a], MASS)
    np.testing.assert_allclose(r.fp_per_image, [0.0, 1.0])
    np.testing.assert_allclose(r.sensitivity, [0.0, 1.0])
    assert r.sens_at[0.5] == 0.0 and r.sens_at[1.0] == 1.0
    # swapping the detection order changes nothing
    b = img(
        "a",
        gt=[[0, 0, 20, 20]],
        gl=[MASS],
        dets=[box_at(10, 10), box_at(500, 500)],
        scores=[0.5, 0.5],
    )
    rb = froc_class([b], MASS)
    assert rb.cpm == r.cpm
    np.testing.assert_allclose(rb.sensitivity, r.sensitivity)


def test_classes_are_separate():
    im = img(
        "c",
        gt=[[0, 0, 20, 20]],
        gl=[CALC],
        dets=[box_at(10, 10)],
        scores=[0.9],
        labels=[MASS],
    )
    mass = froc_class([im], MASS)
    calc = froc_class([im], CALC)
    assert math.isnan(mass.cpm)  # no mass lesion
    assert mass.fp_per_image[-1] == 1.0  # the mass detection is a FP for mass
    assert calc.cpm == 0.0 and calc.n_detections == 0


def test_two_lesions_nearest_gets_hit():
    im = img(
        "t",
        gt=[[0, 0, 100, 100], [100, 0, 200, 100]],
        gl=[MASS, MASS],
        dets=[box_at(60, 50), box_at(140, 50)],
        scores=[0.9, 0.8],
    )
    s, o, n = match_image(im, MASS)
    assert list(o) == [HIT, HIT] and n == 2


def test_bootstrap_ci_is_seeded_and_brackets():
    rng = np.random.default_rng(1)
    ims = []
    for i in range(30):
        gt = [[100, 100, 150, 150]] if i % 2 == 0 else []
        dets = [box_at(125, 125)] if i % 4 == 0 else []
        dets += [box_at(float(x), 700) for x in rng.integers(300, 900, 2)]
        ims.append(
            img(
                str(i),
                gt=gt,
                gl=[MASS] * len(gt),
                dets=dets,
                scores=rng.random(len(dets)),
            )
        )
    r1 = froc_class(ims, MASS, n_boot=200, seed=3)
    r2 = froc_class(ims, MASS, n_boot=200, seed=3)
    assert r1.cpm_ci == r2.cpm_ci
    lo, hi = r1.cpm_ci
    assert 0.0 <= lo <= r1.cpm <= hi <= 1.0
    assert hi > lo


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="spacing_mm"):
        img("x", sp=0.0)
    with pytest.raises(ValueError, match="det_boxes"):
        FrocImage(key="y", spacing_mm=0.1, det_boxes=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="lengths"):
        FrocImage(
            key="z",
            spacing_mm=0.1,
            det_boxes=np.zeros((2, 4)),
            det_scores=np.zeros(1),
            det_labels=np.zeros(2),
        )


def test_plot_and_all(tmp_path):
    res = froc_all(worked_example(), n_boot=20)
    assert set(res) == {"mass", "calcification"}
    out = plot_froc(list(res.values()), tmp_path / "f.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def _study(hit_every: int, seed: int) -> list[FrocImage]:
    """30 images, half with a mass; every ``hit_every``-th mass found (score 0.9)."""
    rng = np.random.default_rng(seed)
    ims = []
    for i in range(30):
        gt = [[100, 100, 150, 150]] if i % 2 == 0 else []
        dets = [box_at(125, 125)] if i % 2 == 0 and (i // 2) % hit_every == 0 else []
        scores = [0.9] * len(dets)
        dets += [box_at(float(x), 700) for x in (300, 600)]
        scores += list(rng.random(2) * 0.5)
        ims.append(img(f"im{i}", gt=gt, gl=[MASS] * len(gt), dets=dets, scores=scores))
    return ims


def test_paired_cpm_difference_exact_and_paired():
    from common.detector.froc import paired_cpm_difference

    weak, strong = _study(3, 0), _study(1, 0)
    d, (lo, hi) = paired_cpm_difference(weak, strong, MASS, n_boot=300, seed=1)
    want = froc_class(strong, MASS).cpm - froc_class(weak, MASS).cpm
    assert d == pytest.approx(want) and want > 0.5
    assert 0 < lo <= d <= hi
    # order does not matter (images matched by key); the reverse is the negative
    d2, ci2 = paired_cpm_difference(weak, strong[::-1], MASS, n_boot=300, seed=1)
    assert d2 == pytest.approx(d) and ci2 == pytest.approx((lo, hi))
    d3, (lo3, hi3) = paired_cpm_difference(strong, weak, MASS, n_boot=300, seed=1)
    assert d3 == pytest.approx(-d) and (lo3, hi3) == pytest.approx((-hi, -lo))
    # a detector against itself: exactly zero in every resample
    assert paired_cpm_difference(weak, weak, MASS, n_boot=50) == (0.0, (0.0, 0.0))
    # no calcification anywhere: undefined
    dc, cic = paired_cpm_difference(weak, strong, CALC, n_boot=20)
    assert math.isnan(dc) and all(math.isnan(x) for x in cic)
    with pytest.raises(ValueError, match="differ"):
        paired_cpm_difference(weak, strong[1:], MASS)
    with pytest.raises(ValueError, match="differ"):
        paired_cpm_difference(weak + weak[:1], strong + strong[:1], MASS)


def test_froc_image_json_round_trip_and_bad_record():
    im = img("k1", gt=[[1, 2, 30, 40]], gl=[CALC], dets=[box_at(15, 20)],
             scores=[0.123456789], ignore=[[0, 0, 5, 5]], sp=0.07)  # fmt: skip
    back = FrocImage.from_json(im.to_json())
    assert back.key == "k1" and back.spacing_mm == 0.07
    np.testing.assert_array_equal(back.gt_boxes, im.gt_boxes)
    np.testing.assert_array_equal(back.gt_labels, [CALC])
    np.testing.assert_array_equal(back.ignore_boxes, im.ignore_boxes)
    assert back.det_scores[0] == 0.123456789  # exact: a rounded score could tie
    assert froc_class([back], CALC).cpm == froc_class([im], CALC).cpm
    with pytest.raises(ValueError, match="'k2'.*gt_boxes"):
        FrocImage.from_json({"key": "k2", "spacing_mm": 0.1})


def _as_cases(images: list[FrocImage], per_case: int) -> list[FrocImage]:
    """The same images, every ``per_case`` consecutive ones one woman."""
    from dataclasses import replace

    return [replace(im, case=f"w{i // per_case}") for i, im in enumerate(images)]


def test_bootstrap_resamples_whole_cases_not_images():
    from common.detector.froc import case_index, paired_cpm_difference

    # 4 copies of each image = 4 views of one woman that agree: an image
    # bootstrap takes them for 4x the evidence; the case bootstrap does not
    base = _study(2, 0)
    views = [im for im in base for _ in range(4)]
    views = [
        FrocImage.from_json({**im.to_json(), "key": f"{im.key}/{j % 4}"})
        for j, im in enumerate(views)
    ]
    strong = _study(1, 0)
    strong_views = [
        FrocImage.from_json({**im.to_json(), "key": f"{im.key}/{j}"})
        for im in strong
        for j in range(4)
    ]
    a_img, b_img = views, strong_views
    a_case, b_case = _as_cases(views, 4), _as_cases(strong_views, 4)
    assert case_index(a_case).tolist()[:9] == [0, 0, 0, 0, 1, 1, 1, 1, 2]
    assert case_index(a_img).tolist() == list(range(len(a_img)))
    d_img, (lo_i, hi_i) = paired_cpm_difference(a_img, b_img, MASS, n_boot=400)
    d_case, (lo_c, hi_c) = paired_cpm_difference(a_case, b_case, MASS, n_boot=400)
    assert d_img == pytest.approx(d_case)  # the point estimate does not change
    # the honest interval is about sqrt(4) = 2x wider
    assert (hi_c - lo_c) > 1.6 * (hi_i - lo_i)
    # the case bootstrap of the 4-view set matches the image bootstrap of one view
    d1, (lo1, hi1) = paired_cpm_difference(base, strong, MASS, n_boot=400)
    assert d1 == pytest.approx(d_case)
    assert (hi_c - lo_c) == pytest.approx(hi1 - lo1, abs=0.1)
    r_img = froc_class(a_img, MASS, n_boot=300, seed=2).cpm_ci
    r_case = froc_class(a_case, MASS, n_boot=300, seed=2).cpm_ci
    assert (r_case[1] - r_case[0]) > 1.6 * (r_img[1] - r_img[0])


def test_case_survives_the_json_round_trip_and_old_records_read_as_no_case():
    im = FrocImage(key="k", spacing_mm=0.1, case="PH-B-00003")
    assert FrocImage.from_json(im.to_json()).case == "PH-B-00003"
    old = {k: v for k, v in im.to_json().items() if k != "case"}
    assert FrocImage.from_json(old).case == ""


def test_gap_closed_is_the_share_of_the_difference_and_its_interval_pairs_runs():
    from common.detector.froc import pooled_gap_closed

    low, mid, high = _study(4, 0), _study(2, 0), _study(1, 0)
    cpm = [froc_class(x, MASS).cpm for x in (low, mid, high)]
    want = (cpm[1] - cpm[0]) / (cpm[2] - cpm[0])
    assert 0.3 < want < 0.8
    r = pooled_gap_closed([low], [mid], [high], MASS, n_boot=200, seed=3)
    assert r["closed"] == pytest.approx(want)
    assert r["cpm_low"] == pytest.approx(cpm[0]) and r["cpm_high"] == pytest.approx(
        cpm[2]
    )
    lo, hi = r["ci95"]
    assert lo <= want <= hi and hi - lo > 0 and r["undefined"] == 0
    # two runs: the mean differences' ratio; the same again is seeded
    r2 = pooled_gap_closed([low, low], [mid, high], [high, high], MASS, n_boot=100)
    two = (cpm[1] - cpm[0] + cpm[2] - cpm[0]) / (2 * (cpm[2] - cpm[0]))
    assert r2["closed"] == pytest.approx(two)
    assert (
        pooled_gap_closed([low, low], [mid, high], [high, high], MASS, n_boot=100) == r2
    )
    # mid at the top closes all of it; at the bottom none
    assert pooled_gap_closed([low], [high], [high], MASS, n_boot=20)["closed"] == 1.0
    assert pooled_gap_closed([low], [low], [high], MASS, n_boot=20)["closed"] == 0.0
    # no gap (the labels' version no better): no ratio, every resample undefined
    none = pooled_gap_closed([high], [mid], [low], MASS, n_boot=30)
    assert math.isnan(none["closed"]) and none["undefined"] == 30
    assert all(math.isnan(x) for x in none["ci95"])
    with pytest.raises(ValueError, match="same number of runs"):
        pooled_gap_closed([low], [mid, mid], [high], MASS)
    with pytest.raises(ValueError, match=r"run 0 \(high\): scored other images"):
        pooled_gap_closed([low], [mid], [high[1:]], MASS)


def test_near_tied_scores_keep_their_order_through_the_json_round_trip():
    # a hit just above a false positive elsewhere: rounded to 1e-5 they would
    # tie, the hit would only count at 0.5 FP/image, and the CPM would fall
    a = img("a", gt=[box_at(100, 100)], gl=[MASS], dets=[box_at(100, 100)],
            scores=[0.500004])  # fmt: skip
    b = img("b", dets=[box_at(900, 900)], scores=[0.499996])
    back = [FrocImage.from_json(im.to_json()) for im in (a, b)]
    assert froc_class([a, b], MASS).cpm == 1.0
    assert froc_class(back, MASS).cpm == 1.0


def test_tied_detections_give_the_same_outcome_in_any_order():
    # A reaches both masses (nearer the first), B only the first: processed A
    # first, B is a duplicate and the second mass is missed; the outcome must
    # not depend on the order the tied detections are listed in
    gt = [[98, 98, 102, 102], [106, 98, 110, 102]]  # centres 8 mm apart (1 mm/px)
    a, b = [101, 98, 105, 102], [98, 98, 102, 102]
    runs = [
        img("x", gt=gt, gl=[MASS, MASS], dets=d, scores=[0.5, 0.5], sp=1.0)
        for d in ([a, b], [b, a])
    ]
    curves = [froc_class([r], MASS) for r in runs]
    assert curves[0].cpm == curves[1].cpm
    np.testing.assert_array_equal(curves[0].sensitivity, curves[1].sensitivity)
    outcomes = [sorted(match_image(r, MASS)[1].tolist()) for r in runs]
    assert outcomes[0] == outcomes[1]


def test_gap_that_cancels_to_a_rounding_residue_is_no_gap():
    from common.detector.froc import pooled_gap_closed

    three = [box_at(100, 100), box_at(2000, 100), box_at(4000, 100)]

    def run(k: int) -> list[FrocImage]:  # finds the first k of three masses
        return [img("i", gt=three, gl=[MASS] * 3, dets=three[:k], scores=[0.9] * k)]

    # mean high - mean low = (0 + 1)/2 - (1/3 + 2/3)/2: zero, in floats ~1e-17
    r = pooled_gap_closed(
        [run(1), run(2)], [run(1), run(3)], [run(0), run(3)], MASS, n_boot=40
    )
    assert math.isnan(r["closed"])
    assert all(math.isnan(x) or abs(x) <= 1.0 for x in r["ci95"])
