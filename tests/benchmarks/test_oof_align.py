"""benchmarks.oof_align: a run at another spacing, put on the reference's images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.compare_runs import load_run
from benchmarks.oof_align import align, main


def _cache(root: Path, keys: dict[str, str]) -> Path:
    root.mkdir(parents=True)
    lines = ["key,source"] + [f"{k},{s}" for k, s in keys.items()]
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root


def _row(key: str, spacing: float, fold: int, gt: list, det: list) -> dict:
    return {
        "key": key, "spacing_mm": spacing, "gt_boxes": gt,
        "gt_labels": [0] * len(gt), "ignore_boxes": [], "det_boxes": det,
        "det_scores": [0.9] * len(det), "det_labels": [0] * len(det),
        "case": key.split("/")[0] + "/w1", "fold": fold,
    }  # fmt: skip


@pytest.fixture
def pair(tmp_path: Path) -> dict[str, Path]:
    ref_cache = _cache(tmp_path / "c04", {"a04": "m1.png", "b04": "m2.png"})
    run_cache = _cache(tmp_path / "c02", {"a02": "m1.png", "b02": "m2.png"})
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps([
        _row("c04/a04", 0.4, 0, [[10, 10, 20, 20]], []),
        _row("c04/b04", 0.4, 1, [], [[5, 5, 7, 7]]),
    ]))  # fmt: skip
    run = tmp_path / "run.json"
    # the same images at 0.2 mm (boxes twice as large); listed in another order
    run.write_text(json.dumps([
        _row("c02/b02", 0.2, 1, [], [[100, 100, 120, 120]]),
        _row("c02/a02", 0.2, 0, [[20, 20, 40, 40]], [[20, 20, 40, 40], [0, 0, 2, 2]]),
    ]))  # fmt: skip
    return {"ref": ref, "ref_cache": ref_cache, "run": run, "run_cache": run_cache}


def test_detections_move_to_the_reference_images_and_pixels(pair, tmp_path):
    rows = {r["key"]: r for r in align(**pair)}
    assert set(rows) == {"c04/a04", "c04/b04"}
    a = rows["c04/a04"]
    assert a["spacing_mm"] == 0.4 and a["gt_boxes"] == [[10, 10, 20, 20]]
    assert a["det_boxes"] == [[10, 10, 20, 20], [0, 0, 1, 1]]
    assert rows["c04/b04"]["det_boxes"] == [[50, 50, 60, 60]]
    out = tmp_path / "out.json"
    assert main(["--ref", str(pair["ref"]), "--ref-cache", str(pair["ref_cache"]),
                 "--run", str(pair["run"]), "--run-cache", str(pair["run_cache"]),
                 "--out", str(out)]) == 0  # fmt: skip
    # compare_runs reads the written file as a run on the reference's images
    assert {im.key for im in load_run(out)["cv"]} == {"c04/a04", "c04/b04"}


def test_another_cross_validation_or_other_annotations_are_refused(pair, tmp_path):
    rows = json.loads(pair["run"].read_text())
    rows[0]["fold"] = 3
    pair["run"].write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="fold 3.*not the same cross-validation"):
        align(**pair)
    rows[0]["fold"] = 1
    rows[1]["gt_boxes"] = [[60, 60, 80, 80]]  # 8 mm away from the reference's
    pair["run"].write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="m1.png: ground truth differs"):
        align(**pair)


def test_missing_or_doubled_sources_are_refused_by_name(pair, tmp_path):
    (pair["run_cache"] / "manifest.csv").write_text("key,source\na02,m1.png\n")
    with pytest.raises(ValueError, match="'c02/b02' is not in"):
        align(**pair)
    (pair["run_cache"] / "manifest.csv").write_text(
        "key,source\na02,m1.png\nb02,m1.png\n"
    )
    with pytest.raises(ValueError, match="'m1.png' listed twice"):
        align(**pair)
    (pair["run_cache"] / "manifest.csv").unlink()
    with pytest.raises(ValueError, match="manifest.csv: missing or empty"):
        align(**pair)
    pair["run"].write_text("{not json")
    with pytest.raises(ValueError, match="run.json: not an oof_predictions.json"):
        align(**pair)
