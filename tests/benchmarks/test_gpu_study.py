"""benchmarks/gpu_study.sh, the device call's script, run on CPU at test size.

No session may get a GPU, and CI never has one: the script's path (the
study's regimes over seeds, the report, the three files a device call brings
back) is exercised here with the test scenario and federation, so a session
that is lent a device spends it measuring, not debugging.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

from simulation.regimes import RECOMMENDED

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_study.sh"


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {
        **os.environ,
        "PYTHON": sys.executable,
        "WHEELS": "",  # this Python's packages, not a device's cp312 wheels
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


def _left_running(tmp_path: Path) -> list[str]:
    """Command lines of processes still working under ``tmp_path``."""
    found = []
    for p in Path("/proc").iterdir():
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if str(tmp_path) in cmd:
            found.append(cmd)
    return found


def test_the_recommended_study_runs_and_brings_back_its_files(
    tmp_path: Path,
) -> None:
    done = _run(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "detections-seed-0.tar.gz",
        "report.md",
        "results.tar",
        "summary.txt",
    ]
    summary = (out / "summary.txt").read_text()
    assert "run exit 0" in summary and "seeds reported: 1" in summary
    assert "--regime personalized-ssl-tuned" in summary
    report = (out / "report.md").read_text()
    for regime in ("base", "local-only", RECOMMENDED, "oracle"):
        assert f" {regime} |" in report, regime
    with tarfile.open(out / "results.tar") as tar:
        names = set(tar.getnames())
    assert f"run/seed-0/{RECOMMENDED}/metrics.json" in names
    assert "run/report/report.json" in names and "run.log" in names
    # every regime's detections, for pairings the report does not make
    with tarfile.open(out / "detections-seed-0.tar.gz") as tar:
        dets = {n for n in tar.getnames() if n.endswith("detections.json")}
    assert f"run/seed-0/{RECOMMENDED}/detections.json" in dets
    assert "run/seed-0/base/detections.json" in dets
    # a second call on the same machine starts a new run (the data is reused)
    again = _run(tmp_path, REGIMES="base local-only", DET_LIMIT_MIB="0")
    assert again.returncode == 0, again.stdout[-3000:]
    report = (out / "report.md").read_text()
    assert RECOMMENDED not in report and " local-only |" in report
    # an archive over the size a returned file may hold is left out, named
    assert not (out / "detections-seed-0.tar.gz").exists()
    assert "detections-seed-0.tar.gz left out" in (out / "summary.txt").read_text()


def test_a_run_cut_before_anything_finished_says_so_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    done = _run(tmp_path, T="1")
    assert done.returncode == 0, done.stdout[-3000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "run exit 124" in summary and "seeds reported: 0" in summary
    assert not (tmp_path / "out" / "report.md").exists()
    assert _left_running(tmp_path) == []


def test_an_unknown_mode_is_refused(tmp_path: Path) -> None:
    done = _run(tmp_path, MODE="everything")
    assert done.returncode == 2
    assert "MODE: recommended or shift, got 'everything'" in done.stdout


def test_the_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0
