"""benchmarks.study_time: a finished study's wall time and each regime's share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import study_time as bench
from common.wire import runfolder as RF


def _seed(folder: Path, seconds: dict[str, float], reused: dict[str, str]) -> None:
    folder.mkdir(parents=True)
    RF.write_record(
        folder / RF.RUN_JSON,
        RF.StudyRun(
            scenario="s", sites=["A"], regimes=list(seconds), working_spacing_mm=0.4,
            base_sites=["A"], seconds=seconds, reused=reused,
        ),
    )  # fmt: skip


def test_figures_per_regime_over_seeds_without_reused_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "study"
    _seed(
        run / "seed-0",
        {"local-only": 100.0, "personalized-dp": 400.0, "oracle": 5.0, "total": 505.0},
        {"oracle": "/elsewhere"},
    )
    _seed(
        run / "seed-1",
        {"local-only": 120.0, "personalized-dp": 440.0, "oracle": 210.0, "total": 770},
        {},
    )
    monkeypatch.setenv("MAMMOFED_BENCH_RESULTS", str(tmp_path / "results"))
    assert bench.main(["--run", str(run), "--wall-s", "6000"]) == 0
    lines = (tmp_path / "results" / "study_time.jsonl").read_text().splitlines()
    rows = {r["figure"]: r for r in map(json.loads, lines)}
    wall = rows["study_wall_s"]
    assert wall["value"] == 6000 and wall["context"]["within_budget"] is False
    assert wall["context"]["seeds"] == 2
    dp = rows["regime_s/personalized-dp"]
    assert dp["value"] == 420.0 and dp["context"]["over_local_only"] == 3.82
    assert dp["context"]["eta_weight"] > 1
    # seed 0 copied the oracle from an earlier run: only seed 1's time counts
    assert rows["regime_s/oracle"]["context"]["per_seed"] == [210.0]
    assert rows["regime_s/total"]["value"] == 637.5


def test_a_folder_without_a_finished_study_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--run", str(tmp_path), "--wall-s", "10"])
    assert "not a finished study" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--run", str(tmp_path), "--wall-s", "0"])
