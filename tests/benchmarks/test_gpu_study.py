"""benchmarks/gpu_study.sh, the device call's script, run on CPU at test size.

No session may get a GPU, and CI never has one: the script's path (the
study's regimes over seeds, the copies out of the work folder, the report)
is exercised here with the test scenario and federation, so a session that
is lent a device spends it measuring, not debugging.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from simulation.regimes import RECOMMENDED

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_study.sh"


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {
        **os.environ,
        "PYTHON": sys.executable,
        "OUT": str(tmp_path / "out"),
        "WORK": str(tmp_path / "work"),
        "SCENARIO": "configs/simulation/test.yaml",
        "FED": "configs/federation/sim-test.yaml",
        "SEEDS": "0",
        "PARALLEL": "1",
        "W": "1",
        "N_BOOT": "20",
        "T": "400",
        "OMP_NUM_THREADS": "1",
        **env,
    }
    proc = subprocess.Popen(
        ["bash", str(SCRIPT)], cwd=REPO, env=full, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:  # never leave the run behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def test_the_recommended_study_runs_and_reports(tmp_path: Path) -> None:
    done = _run(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:]
    out = tmp_path / "out"
    assert (out / "exit.txt").read_text().startswith("run exit 0")
    report = (out / "report.md").read_text()
    for regime in ("base", "local-only", RECOMMENDED, "oracle"):
        assert f"| {regime} " in report or f" {regime} |" in report, regime
    assert (out / "seed-0" / RECOMMENDED / "metrics.json").is_file()
    assert "--regime personalized-ssl-tuned" in (out / "command.txt").read_text()


def test_an_unknown_mode_is_refused(tmp_path: Path) -> None:
    done = _run(tmp_path, MODE="everything")
    assert done.returncode == 2
    assert "MODE: recommended or shift, got 'everything'" in done.stdout


def test_the_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0
