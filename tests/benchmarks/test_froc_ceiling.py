"""benchmarks.froc_ceiling: the most a re-scoring of a detector's marks reaches."""

from __future__ import annotations

import gzip
import json

import numpy as np

from benchmarks.froc_ceiling import (
    ceiling_row,
    lesion_reach,
    main,
    oracle_ranked,
    top_marks,
)
from common.detector.froc import FrocImage, froc_class


def test_ceiling_ranks_hits_first_and_reports_each_cluster():
    # image 0: the cluster's mark scores below a false mark elsewhere; image 1:
    # a cluster no mark reaches, its one speck the image's third brightest
    a = FrocImage(
        key="s/a",
        spacing_mm=0.4,
        gt_boxes=np.array([[35.0, 35.0, 47.0, 48.0]]),
        gt_labels=np.array([1]),
        det_boxes=np.array(
            [[36, 36, 46, 46], [200, 200, 210, 210], [0, 0, 9, 9]], float
        ),
        det_scores=np.array([0.2, 0.9, 0.7]),
        det_labels=np.array([1, 1, 0]),
    )
    b = FrocImage(
        key="s/b",
        spacing_mm=0.4,
        gt_boxes=np.array([[100.0, 100.0, 110.0, 110.0]]),
        gt_labels=np.array([1]),
        det_boxes=np.array([[300, 300, 310, 310]], float),
        det_scores=np.array([0.5]),
        det_labels=np.array([1]),
    )
    images = [a, b]
    assert froc_class(images, 1).cpm < 0.5  # found only after two false marks
    best = oracle_ranked(images, 1)
    assert froc_class(best, 1).cpm == 0.5  # one of two found before any false mark
    assert list(best[0].det_scores) == [1.2, 0.9, 0.7]  # the mass is untouched
    assert list(best[1].det_scores) == [0.5]
    specks = {
        "s/a": np.array([[41.0, 41.0, 9.0], [42.0, 43.0, 5.0]], np.float32),
        "s/b": np.array([[105.0, 105.0, 6.0], [5, 5, 20.0], [9, 9, 30.0]], np.float32),
    }
    rows = lesion_reach(images, specks, 1)
    assert [r["fp_per_image"] for r in rows] == [1.0, None]  # 2 false marks >= 0.2
    assert [r["specks"] for r in rows] == [2, 1]
    assert [r["max_z"] for r in rows] == [9.0, 6.0]
    assert [r["rank_in_image"] for r in rows] == [0, 2]


def test_ceiling_row_and_the_command(tmp_path):
    a = FrocImage(
        key="s/a",
        spacing_mm=0.4,
        gt_boxes=np.array([[35.0, 35.0, 47.0, 48.0], [300.0, 30.0, 320.0, 50.0]]),
        gt_labels=np.array([0, 0]),  # two masses; no mark reaches the second
        det_boxes=np.array([[36, 36, 46, 46], [200, 200, 210, 210]], float),
        det_scores=np.array([0.2, 0.9]),
        det_labels=np.array([0, 0]),
    )
    row = ceiling_row([a], 0)
    assert row["n_lesions"] == 2 and row["reached_by_a_mark"] == 1
    assert row["found_at_fp_per_image"] == [1.0]
    assert row["sens_at_1fp"] == 0.5 and row["cpm"] < 0.5
    assert row["cpm_ceiling"] == 0.5 and row["sens_at_1fp_ceiling"] == 0.5
    assert row["marks_per_image"] == 2.0
    assert row["cpm_ceiling_top20"] == 0.5
    # with one mark an image, the best (false) one stays and the hit is gone
    assert froc_class(oracle_ranked(top_marks([a], 0, 1), 0), 0).cpm == 0.0
    oof = tmp_path / "oof.json.gz"
    with gzip.open(oof, "wt") as fh:
        json.dump([a.to_json()], fh)
    assert main(["--oof", str(oof), "--results", str(tmp_path)]) == 0
    lines = [json.loads(x) for x in (tmp_path / "froc_ceiling.jsonl").open()]
    assert [x["figure"] for x in lines] == ["mass-cpm-ceiling"]  # no cluster: no line
    assert lines[0]["value"] == 0.5 and lines[0]["context"]["reached_by_a_mark"] == 1
