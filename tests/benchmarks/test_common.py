"""benchmarks.common.emit writes one JSON line per figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.common import emit


def test_emit_appends_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    emit("demo", "speed", 3, "img/s", results_dir=tmp_path, workers=2, path=tmp_path)
    emit("demo", "speed", 4.5, "img/s", results_dir=tmp_path, workers=1)
    lines = (tmp_path / "demo.jsonl").read_text().splitlines()
    assert len(lines) == 2
    rec = json.loads(lines[0])
    assert rec["figure"] == "speed" and rec["value"] == 3.0 and rec["unit"] == "img/s"
    assert rec["context"] == {"workers": 2, "path": str(tmp_path)}
    assert {"torch", "cpu_count", "python", "host"} <= set(rec["machine"])
    assert json.loads(capsys.readouterr().out.splitlines()[1])["value"] == 4.5


def test_an_undefined_figure_is_written_as_strict_json_null(tmp_path: Path) -> None:
    """NaN (e.g. the share of a gap of 0) is not JSON: other readers reject it."""
    emit("demo", "share", float("nan"), "fraction", results_dir=tmp_path,
         ci=[float("-inf"), 0.5])  # fmt: skip
    line = (tmp_path / "demo.jsonl").read_text().splitlines()[0]

    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON constant {token}")

    rec = json.loads(line, parse_constant=refuse)
    assert rec["value"] is None and rec["context"]["ci"] == [None, 0.5]
