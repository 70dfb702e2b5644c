"""The report over several seeds: table means, paired differences pooled over seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.detector.froc import FrocImage, froc_class
from common.wire import runfolder as RF
from common.wire.runfolder import SiteMetrics
from simulation import regimes as R
from simulation.commands.run import parse_seeds
from simulation.report import write_report


def _images(found: int, n: int = 40) -> list[FrocImage]:
    """n images, half with a mass; the first ``found`` masses detected."""
    out = []
    for i in range(n):
        gt = [[100.0, 100.0, 150.0, 150.0]] if i % 2 == 0 else []
        det = [[115.0, 115.0, 135.0, 135.0]] if i % 2 == 0 and i // 2 < found else []
        det += [[600.0, 600.0, 620.0, 620.0]]
        out.append(
            FrocImage(
                key=f"im{i}",
                spacing_mm=0.4,
                gt_boxes=np.array(gt).reshape(-1, 4),
                gt_labels=np.zeros(len(gt)),
                det_boxes=np.array(det),
                det_scores=np.linspace(0.9, 0.2, len(det)),
                det_labels=np.zeros(len(det)),
            )
        )
    return out


def _run(root: Path, seed: int, found: dict[str, int]) -> Path:
    run = root / f"seed-{seed}"
    for regime, k in found.items():
        d = run / regime
        d.mkdir(parents=True)
        images = _images(k)
        m = SiteMetrics.from_results(
            {
                "mass": froc_class(images, 0, n_boot=20),
                "calcification": froc_class(images, 1, n_boot=20),
            }
        )
        RF.write_record(
            d / RF.METRICS_JSON, RF.RegimeMetrics(regime, "central", {"B": m})
        )
        (d / RF.DETECTIONS_JSON).write_text(
            json.dumps({"B": [im.to_json() for im in images]})
        )
    RF.write_record(run / RF.RUN_JSON, RF.StudyRun("t", ["A", "B"], [], 0.4, ["A"]))
    return run


def test_seeds_pool_in_table_and_paired_rows(tmp_path: Path) -> None:
    # personalized finds 14, 16, 18 of 20 masses; local-only 6, 8, 10
    runs = [
        _run(
            tmp_path,
            s,
            {R.PERSONALIZED: 14 + 2 * s, R.LOCAL_ONLY: 6 + 2 * s, R.BASE: 8},
        )
        for s in range(3)
    ]
    md = write_report(runs, tmp_path / "rep").read_text()
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    cell = data["table"]["B"][R.PERSONALIZED]["mass"]
    runs_cpm = [froc_class(_images(k), 0).cpm for k in (14, 16, 18)]
    assert cell["cpm_runs"] == pytest.approx(runs_cpm)
    assert cell["cpm"] == pytest.approx(np.mean(runs_cpm))
    assert cell["cpm_ci"] == pytest.approx([min(runs_cpm), max(runs_cpm)])
    # the sensitivities and AP beside it are the same runs' means, not the
    # last run's (16/20 is the middle seed's sensitivity at 1 FP/image)
    runs_res = [froc_class(_images(k), 0) for k in (14, 16, 18)]
    assert cell["sensitivity"]["1"] == pytest.approx(16 / 20)
    assert cell["sensitivity"]["1"] != runs_res[-1].sens_at[1.0]
    assert cell["ap"] == pytest.approx(np.mean([r.ap for r in runs_res]))
    rows = {(r["regime"], r["against"], r["class"]): r for r in data["paired"]}
    row = rows[(R.PERSONALIZED, R.LOCAL_ONLY, "mass")]
    assert row["n_runs"] == 3 and row["resolved"]
    local = [froc_class(_images(k), 0).cpm for k in (6, 8, 10)]
    assert row["difference"] == pytest.approx(np.mean(runs_cpm) - np.mean(local))
    assert row["ci95"][0] > 0
    assert "personalized better" in md
    assert rows[(R.LOCAL_ONLY, R.BASE, "mass")]["n_runs"] == 3
    # the forest plot of the regime's differences against base and local-only
    png = tmp_path / "rep" / "paired_recommended.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![paired differences](paired_recommended.png)" in md


def test_regimes_with_other_run_counts_are_not_paired(tmp_path: Path) -> None:
    runs = [_run(tmp_path, 0, {R.PERSONALIZED: 10, R.LOCAL_ONLY: 5})]
    runs.append(_run(tmp_path, 1, {R.PERSONALIZED: 12}))
    write_report(runs, tmp_path / "rep")
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert not [r for r in data["paired"] if r["against"] == R.LOCAL_ONLY]
    # nothing paired: no forest plot
    assert not (tmp_path / "rep" / "paired_recommended.png").exists()


@pytest.mark.parametrize("text", ["0,1,1", "a,b", "-1,2", ""])
def test_bad_seed_lists_are_refused(text: str) -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="--seeds"):
        parse_seeds(text)
    assert parse_seeds("0,1,2") == (0, 1, 2)


def test_the_report_states_the_share_of_the_labels_gap_semi_supervision_closes(
    tmp_path: Path,
) -> None:
    from common.detector.froc import pooled_gap_closed
    from simulation.report import SSL_GAP, SSL_GAP_GOAL

    # labeled only finds 4-6 of 20 masses, semi-supervised 12-14, all labels 16-18
    found = {R.PERSONALIZED: 4, R.PERSONALIZED_SSL: 12, R.PERSONALIZED_ALL_LABELS: 16}
    runs = [_run(tmp_path, s, {r: k + s for r, k in found.items()}) for s in range(3)]
    md = write_report(runs, tmp_path / "rep").read_text()
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    rows = {r["class"]: r for r in data["ssl_gap"]}
    mass = rows["mass"]
    want = pooled_gap_closed(
        *([_images(found[r] + s) for s in range(3)] for r in SSL_GAP),
        0,
        n_boot=1000,
    )
    assert mass["site"] == "B" and mass["n_runs"] == 3
    assert mass["closed"] == pytest.approx(want["closed"])
    assert mass["closed_ci95"] == pytest.approx(list(want["ci95"]))
    assert mass["gap_resolved"] and mass["gap_ci95"][0] > 0
    assert mass["met"] == (want["closed"] >= SSL_GAP_GOAL) and mass["met"]
    assert "## Semi-supervision: the gap it closes" in md
    assert f"| B | mass | {mass['cpm_labeled']:.2f} |" in md
    # no calcification anywhere: nothing to close, said so
    assert not rows["calcification"]["gap_resolved"]
    assert "no gap resolved" in md
    # without the all-labels regime there is no section
    runs2 = [_run(tmp_path / "two", 0, {R.PERSONALIZED: 4, R.PERSONALIZED_SSL: 9})]
    md2 = write_report(runs2, tmp_path / "rep2").read_text()
    assert "the gap it closes" not in md2


def test_a_worker_that_runs_two_seeds_names_each_in_its_log(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--parallel reuses a worker process for the next seed: its log lines must
    name that seed, not the worker's first one."""
    import logging
    import types

    from simulation import run as sim_run

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)

    def study(req: object) -> Path:
        logging.getLogger("simulation.run").info("working")
        return Path(".")

    monkeypatch.setattr(sim_run, "run_study", study)
    try:
        for seed in (0, 2):
            sim_run._run_seed(types.SimpleNamespace(seed=seed))  # type: ignore[arg-type]
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    err = capsys.readouterr().err
    assert "[seed 0] simulation.run: working" in err
    assert "[seed 2] simulation.run: working" in err
