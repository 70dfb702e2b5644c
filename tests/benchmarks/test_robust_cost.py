"""benchmarks.robust_cost on synthetic run folders (detections.json only)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from common.detector.froc import (
    FrocImage,
    froc_class,
    paired_cpm_difference,
    pooled_paired_cpm_difference,
)
from common.wire import runfolder as RF


def _images(rng: np.random.Generator, quality: float, n: int = 24) -> list[FrocImage]:
    """``n`` images, half with one mass; ``quality`` = chance the mass is found."""
    out = []
    for i in range(n):
        gt = (
            np.array([[100.0, 100.0, 140.0, 140.0]]) if i % 2 == 0 else np.zeros((0, 4))
        )
        boxes, scores = [], []
        if len(gt) and rng.random() < quality:
            boxes.append([102.0, 101.0, 141.0, 139.0])
            scores.append(rng.uniform(0.5, 1.0))
        for _ in range(rng.integers(0, 3)):  # false positives away from the mass
            boxes.append([300.0, 300.0, 330.0, 330.0])
            scores.append(rng.uniform(0.0, 0.8))
        out.append(
            FrocImage(
                key=f"img{i:03d}",
                spacing_mm=0.4,
                gt_boxes=gt,
                gt_labels=np.zeros(len(gt), np.int64),
                det_boxes=np.array(boxes).reshape(-1, 4),
                det_scores=np.array(scores),
                det_labels=np.zeros(len(boxes), np.int64),
            )
        )
    return out


def _write(folder: Path, sites: dict[str, list[FrocImage]]) -> Path:
    folder.mkdir(parents=True)
    payload = {s: [im.to_json() for im in ims][::-1] for s, ims in sites.items()}
    (folder / RF.DETECTIONS_JSON).write_text(json.dumps(payload))
    return folder


def test_pooled_difference_and_emitted_lines(tmp_path: Path) -> None:
    from benchmarks import robust_cost

    rng = np.random.default_rng(0)
    runs: list[tuple[str, Path]] = []
    for s in range(3):
        for agg, q in (("fedavg", 0.8), ("fedmedian", 0.4)):
            sites = {"A": _images(rng, q), "B": _images(rng, q, n=10)}
            runs.append((agg, _write(tmp_path / f"seed{s}" / agg, sites)))

    # one seed: exactly paired_cpm_difference (same image draws)
    from simulation.report import load_detections

    a = load_detections(runs[0][1] / RF.DETECTIONS_JSON)["A"]
    b = load_detections(runs[1][1] / RF.DETECTIONS_JSON)["A"]
    one = pooled_paired_cpm_difference([a], [b], 0, n_boot=200, seed=3)
    want, want_ci = paired_cpm_difference(a, b, 0, n_boot=200, seed=3)
    assert one["diff"] == pytest.approx(want)
    assert one["ci95"] == pytest.approx(want_ci)

    rows = robust_cost.compare(runs, n_boot=100)
    assert {(r["site"], r["class"]) for r in rows} == {
        (s, c) for s in "AB" for c in ("mass", "calcification")
    }
    mass_a = next(r for r in rows if r["site"] == "A" and r["class"] == "mass")
    per_seed = [
        froc_class(load_detections(f / RF.DETECTIONS_JSON)["A"], 0).cpm
        for agg, f in runs
    ]
    assert mass_a["runs_fedavg"] == [round(x, 4) for x in per_seed[0::2]]
    assert mass_a["runs_robust"] == [round(x, 4) for x in per_seed[1::2]]
    assert mass_a["diff"] == pytest.approx(
        np.mean(per_seed[1::2]) - np.mean(per_seed[0::2])
    )
    lo, hi = mass_a["paired_ci95"]
    assert lo <= mass_a["diff"] <= hi and hi < 0 and mass_a["excludes_zero"]
    assert (mass_a["n_seeds"], mass_a["n_images"], mass_a["n_lesions"]) == (3, 24, 12)
    calc = next(r for r in rows if r["class"] == "calcification")
    assert math.isnan(calc["diff"]) and calc["excludes_zero"] is None

    robust_cost.main(
        [f"--run={agg}={f}" for agg, f in runs]
        + ["--results", str(tmp_path / "res"), "--n-boot", "50", "--seeds", "0,1,2"]
    )
    lines = [
        json.loads(x)
        for x in (tmp_path / "res" / "robust_cost.jsonl").read_text().splitlines()
    ]
    assert len(lines) == len(rows)
    assert "fedmedian-minus-fedavg-cpm-mass" in {d["figure"] for d in lines}

    # another test set in one run cannot be paired
    bad = _write(
        tmp_path / "bad", {"A": _images(rng, 0.5, n=23), "B": _images(rng, 0.5)}
    )
    with pytest.raises(ValueError, match="other images"):
        robust_cost.compare([*runs[:-1], ("fedmedian", bad)], n_boot=10)
