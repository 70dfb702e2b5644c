from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from common.detector.froc import ClassMetrics, FrocCurve
from common.wire import runfolder as RF
from common.wire.runfolder import RunFolderError, SiteMetrics
from simulation import regimes as R
from simulation.report import gap_closed, write_report


def _site_metrics(cpm_mass: float, cpm_calc: float) -> SiteMetrics:
    def cls(cpm: float) -> ClassMetrics:
        return ClassMetrics(
            cpm=cpm,
            cpm_ci95=[max(0.0, cpm - 0.1), min(1.0, cpm + 0.1)],
            ap=cpm / 2,
            sensitivity_at_fp={"1": cpm},
            n_images=10,
            n_lesions=5,
            n_detections=20,
            curve=FrocCurve([0.2, 1.0, 3.0], [0.1, cpm, cpm]),
        )

    return SiteMetrics(10, {"mass": cls(cpm_mass), "calcification": cls(cpm_calc)})


def _regime(
    run: Path, name: str, sites: dict[str, tuple[float, float]], rounds: bool = False
) -> None:
    d = run / name
    d.mkdir(parents=True)
    kind = "federated" if rounds else "central"
    metrics = {s: _site_metrics(*v) for s, v in sites.items()}
    record = RF.RegimeMetrics(name, kind, metrics)
    RF.write_record(d / RF.METRICS_JSON, record)
    assert RF.read_record(RF.RegimeMetrics, d / RF.METRICS_JSON) == record
    if rounds:
        rows = [
            RF.StudyRound(r, s, bytes_sent=1000 + r, metrics={"train-loss": 1.0 / r})
            for r in (1, 2)
            for s in sites
        ]
        RF.write_rounds(d / RF.ROUNDS_JSONL, rows)
        assert RF.read_rounds(d / RF.ROUNDS_JSONL) == rows
        with open(d / RF.ROUNDS_JSONL, "a") as fh:
            fh.write("not json\n")


def _run_json(run: Path, base_sites: list[str] | None = None) -> None:
    base_sites = base_sites or []
    RF.write_record(
        run / RF.RUN_JSON, RF.StudyRun("t", ["A", "B"], [], 0.4, base_sites)
    )


def test_report_table_gap_closed_and_files(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _regime(run, R.BASE, {"A": (0.8, 0.6), "B": (0.2, 0.1)})
    _regime(run, R.ORACLE, {"A": (0.9, 0.7), "B": (0.6, 0.5)})
    _regime(run, R.PERSONALIZED, {"A": (0.85, 0.65), "B": (0.5, 0.3)}, rounds=True)
    (run / "configs").mkdir()
    (run / "configs" / "federation.yaml").write_text("strategy: personalized\n")
    _run_json(run)
    out = tmp_path / "rep"
    md = write_report([run], out)
    text = md.read_text()
    assert "| B |" in text and "strategy: personalized" in text
    data = json.loads((out / "report.json").read_text())
    assert data["regimes"] == [R.BASE, R.PERSONALIZED, R.ORACLE]
    g = data["table"]["B"][R.PERSONALIZED]["mass"]["gap_closed"]
    assert g == pytest.approx((0.5 - 0.2) / (0.6 - 0.2))
    assert (out / "froc_A.png").stat().st_size > 1000
    assert (out / "rounds_train-loss.png").is_file()
    assert data["bytes_per_round"][0]["mean_bytes_per_round"] == pytest.approx(1001.5)


def test_gap_closed_undefined_without_gap() -> None:
    assert math.isnan(gap_closed(0.5, 0.4, 0.4))
    assert math.isnan(gap_closed(math.nan, 0.1, 0.4))
    # a gap smaller than MIN_GAP is noise on small test sets: not reported
    assert math.isnan(gap_closed(0.5, 0.40, 0.43))
    assert gap_closed(0.5, 0.4, 0.6) == pytest.approx(0.5)


def test_report_rejects_folder_without_metrics(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFolderError, match="no <regime>/metrics.json"):
        write_report([tmp_path / "empty"], tmp_path / "out")


def _images(hit_every: int, n: int = 40) -> list:
    """n test images, half with a mass; every ``hit_every``-th mass found."""
    import numpy as np

    from common.detector.froc import FrocImage

    out = []
    for i in range(n):
        gt = [[100.0, 100.0, 150.0, 150.0]] if i % 2 == 0 else []
        hit = i % 2 == 0 and (i // 2) % hit_every == 0
        det = [[115.0, 115.0, 135.0, 135.0]] if hit else []
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
            )  # fmt: skip
        )
    return out


def _paired_report(tmp_path: Path, strong: set[str], weak: set[str]) -> tuple:
    """A run of sites A (base) and B where ``strong`` regimes find every mass
    and ``weak`` ones a third; its ``(report.md text, report.json)``."""
    run = tmp_path / "run"
    for name in strong | weak:
        images = _images(1 if name in strong else 3)
        _regime(run, name, {"A": (0.5, 0.1), "B": (0.5, 0.1)})
        dets = {s: [im.to_json() for im in images] for s in ("A", "B")}
        (run / name / RF.DETECTIONS_JSON).write_text(json.dumps(dets))
    _run_json(run, ["A"])
    md = write_report([run], tmp_path / "rep").read_text()
    return md, json.loads((tmp_path / "rep" / "report.json").read_text())


def test_report_paired_comparisons_from_detections(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="simulation.report"):
        md, data = _paired_report(
            tmp_path, {R.ORACLE, R.PERSONALIZED}, {R.BASE, R.LOCAL_ONLY}
        )
    # one progress line a pair, the last one done
    progress = [m for m in caplog.messages if m.startswith("paired comparison ")]
    n = len({(r["regime"], r["against"]) for r in data["paired"]})
    assert len(progress) == n > 1
    assert progress[-1].startswith(f"paired comparison {n} of {n}: ")
    assert progress[-1].endswith("(done)")
    rows = {
        (r["site"], r["class"], r["regime"], r["against"]): r for r in data["paired"]
    }
    vs_local = rows[("B", "mass", R.PERSONALIZED, R.LOCAL_ONLY)]
    assert vs_local["difference"] > 0.5 and vs_local["ci95"][0] > 0
    vs_oracle = rows[("B", "mass", R.PERSONALIZED, R.ORACLE)]
    assert vs_oracle["difference"] == 0 and vs_oracle["ratio"] == 1.0
    assert ("B", "mass", R.PERSONALIZED, R.FEDAVG) not in rows  # no FedAvg run
    assert "## Paired comparisons" in md
    assert "Goal met on B." in md  # A is the base site: not part of the goal
    assert [g["site"] for g in data["goal"]] == ["B"]
    assert data["goal"][0]["regime"] == R.PERSONALIZED  # no recommended run
    # the oracle finds every mass, base and local-only a third: no ceiling
    assert data["goal"][0]["oracle_beats_base"] is True
    assert "the oracle itself does not pass" not in md


def test_goal_needs_the_recommended_regime_above_base_and_local_only(
    tmp_path: Path,
) -> None:
    """The goal's three tests, each on the paired mass CPM of the recommended regime."""
    md, data = _paired_report(
        tmp_path,
        {R.BASE, R.ORACLE, R.RECOMMENDED},
        {R.LOCAL_ONLY, R.PERSONALIZED},
    )
    (goal,) = data["goal"]
    assert goal["regime"] == R.RECOMMENDED
    assert goal["beats_local"] is True and goal["beats_base"] is False
    assert goal["oracle_ratio"] == 1.0 and goal["reaches_oracle"] is True
    assert goal["met"] is False
    # the ceiling: the oracle (strong, like the base) does not beat the base
    assert goal["oracle_beats_base"] is False and goal["oracle_beats_local"] is True
    assert "the oracle itself does not pass one of them" in md
    assert "Goal met on no site." in md and f"**{R.RECOMMENDED}**" in md
    rows = {(r["site"], r["regime"], r["against"]) for r in data["paired"]}
    assert ("B", R.RECOMMENDED, R.PERSONALIZED) in rows
    assert "The oracle is not in these runs" not in md


def test_goal_of_a_run_made_before_the_recommendation_changed(tmp_path: Path) -> None:
    """Runs made before stop 35 (its recommended regime, the DP recipe, and no
    personalized-ssl+tuned+local) and before stop 42 (the three fused at every
    site) keep their goal on the regime of their time; with both in a run the
    goal is on the current one."""
    for k, before in enumerate(
        (R.PERSONALIZED_DP_TUNED_LOCAL, R.PERSONALIZED_SSL_TUNED_LOCAL)
    ):
        assert before != R.RECOMMENDED
        _, data = _paired_report(tmp_path / f"o{k}", {before}, {R.BASE, R.LOCAL_ONLY})
        assert data["goal"][0]["regime"] == before
    old = R.PERSONALIZED_DP_TUNED_LOCAL
    _, data = _paired_report(
        tmp_path / "b", {old, R.RECOMMENDED}, {R.BASE, R.LOCAL_ONLY}
    )
    assert data["goal"][0]["regime"] == R.RECOMMENDED
    rows = {(r["regime"], r["against"]) for r in data["paired"]}
    assert (R.RECOMMENDED, old) in rows and (old, R.BASE) in rows


def test_goal_without_the_oracle_says_so(tmp_path: Path) -> None:
    """The demo runs no oracle: the goal table says why × oracle is not run."""
    md, data = _paired_report(tmp_path, {R.RECOMMENDED}, {R.BASE, R.LOCAL_ONLY})
    (goal,) = data["goal"]
    assert goal["beats_base"] is True and goal["beats_local"] is True
    assert goal["reaches_oracle"] is None and goal["met"] is False
    assert "| B | yes | yes | – | not met | not run | not run |" in md
    assert "The oracle is not in these runs" in md


def test_report_names_a_broken_detections_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for name in (R.PERSONALIZED, R.ORACLE):
        _regime(run, name, {"A": (0.5, 0.1)})
        (run / name / RF.DETECTIONS_JSON).write_text(json.dumps({"A": [{"key": "x"}]}))
    with pytest.raises(RunFolderError, match=r"detections.json.*'x'"):
        write_report([run], tmp_path / "rep")


def test_report_names_a_malformed_metrics_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / R.BASE).mkdir(parents=True)
    # the old two-shape record (cpm_ci / sensitivity) is not the contract
    bad = {"regime": R.BASE, "kind": "central", "sites": {"A": {"n_images": 1,
           "classes": {"mass": {"cpm": 0.5, "cpm_ci": None}}}}}  # fmt: skip
    (run / R.BASE / RF.METRICS_JSON).write_text(json.dumps(bad))
    with pytest.raises(RunFolderError, match=r"base/metrics.json: malformed"):
        write_report([run], tmp_path / "rep")
