"""benchmarks.pseudo_precision: a teacher's pseudo boxes scored on hidden labels."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.pseudo_precision import main, tally
from common.detector.froc import FrocImage
from tests.benchmarks.test_hospital_path import _fake_study
from tests.client.conftest import SITE


def _image(
    dets: list[list[float]], scores: list[float], labels: list[int]
) -> FrocImage:
    return FrocImage(
        key="k",
        spacing_mm=1.0,
        gt_boxes=np.zeros((0, 4)),
        gt_labels=np.zeros(0, np.int64),
        ignore_boxes=np.zeros((0, 4)),
        det_boxes=np.asarray(dets, np.float32).reshape(-1, 4),
        det_scores=np.asarray(scores, np.float32),
        det_labels=np.asarray(labels, np.int64),
        case="P0",
    )


def test_a_second_box_on_a_found_lesion_and_a_miss_count_against_precision() -> None:
    dets = _image(
        [[12, 12, 28, 28], [11, 11, 29, 29], [300, 300, 320, 320], [101, 101, 119, 119],
         [100, 100, 120, 120]],
        [0.9, 0.8, 0.7, 0.2, 0.6],
        [0, 0, 0, 0, 1],
    )  # fmt: skip
    image = dataclasses.replace(
        dets,
        gt_boxes=np.array([[10.0, 10, 30, 30], [100, 100, 120, 120]]),
        gt_labels=np.array([0, 0]),
    )
    t = tally([image], 0, 0.5)
    # three mass boxes at or above 0.5: a hit, a duplicate, a false positive;
    # the second lesion's box scores 0.2, the 0.6 box is another class
    assert (t.images, t.boxes, t.hits, t.lesions, t.found) == (1, 3, 1, 2, 1)
    f = t.figures()
    assert f["precision"] == pytest.approx(1 / 3) and f["recall"] == 0.5
    assert f["per_image"] == 3.0
    low = tally([image], 0, 0.1)
    assert (low.hits, low.found) == (2, 2)
    empty = tally([image], 0, 0.95).figures()
    assert np.isnan(empty["precision"]) and empty["recall"] == 0.0


def test_main_scores_a_study_seed_and_skips_an_empty_view(tmp_path: Path) -> None:
    study = _fake_study(tmp_path)
    cache = study / "seed-0" / "personalized-dp" / "cache" / SITE
    data = tmp_path / "data"
    for kind in ("cache", "oracle"):  # every image labeled: no unlabeled view
        (data / kind).mkdir(parents=True)
        (data / kind / SITE).symlink_to(cache)
    results = tmp_path / "results"
    rc = main(
        ["--study", str(study), "--data", str(data), "--regime", "personalized-dp",
         "--site", SITE, "--threshold", "0.0", "--results", str(results)]
    )  # fmt: skip
    assert rc == 0
    rows = [json.loads(x) for x in (results / "pseudo_precision.jsonl").open()]
    assert rows and {r["context"]["seed"] for r in rows} == {"seed-0", "pooled"}
    assert {r["figure"].split("-")[0] for r in rows} == {"test"}
    recall = [r for r in rows if r["figure"] == "test-mass-recall"]
    assert recall and all(0.0 <= r["value"] <= 1.0 for r in recall)
    # at threshold 0 every detection is a pseudo box (the tiny model finds
    # masses only)
    assert all(r["context"]["boxes"] > 0 for r in rows if "-mass-" in r["figure"])


def test_main_refuses_an_oracle_of_another_scenario(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import benchmarks.pseudo_precision as pp

    study = _fake_study(tmp_path)
    cache = study / "seed-0" / "personalized-dp" / "cache" / SITE
    data = tmp_path / "data"
    for kind in ("cache", "oracle"):
        (data / kind).mkdir(parents=True)
        (data / kind / SITE).symlink_to(cache)
    real = pp._oracle_index
    # an oracle cache that holds none of the site's images
    monkeypatch.setattr(pp, "_oracle_index", lambda c, s: (real(c, s)[0], {}))
    with pytest.raises(ValueError, match="not the same scenario's oracle cache"):
        main(["--study", str(study), "--data", str(data), "--regime", "personalized-dp",
              "--site", SITE, "--results", str(tmp_path / "r")])  # fmt: skip
