"""Resume and ``status`` on a run folder that a crash or a hand has damaged.

A broken newest checkpoint is skipped (logged, naming the file) and its round
repeated; a run never silently restarts from round 0; a checkpoint of another
model is refused at the start; a torn ``rounds.jsonl`` line costs that line
only; ``mammofed-server status`` reads a hostile folder without a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.app import app
from common.errors import CheckpointMismatch
from common.wire.faults import OUTCOME_JSON
from common.wire.federation import FederationConfig
from common.wire.runfolder import (
    CHECKPOINT_DIR,
    ROUNDS_JSONL,
    append_round_row,
    iter_round_rows,
    last_round_row,
)
from server.checkpoints import CheckpointStore
from server.federation import run_federation
from tests.conftest import LocalGrid, make_contexts

SITES = ["site-a", "site-b"]
W = {"w": np.arange(4, dtype=np.float32)}


def _run(cfg: FederationConfig, tmp_path: Path, rounds: int) -> Any:
    cfg = dataclasses.replace(cfg, num_rounds=rounds)
    grid = LocalGrid(app, make_contexts(cfg, tmp_path / "state", SITES))
    return run_federation(grid, cfg, tmp_path / "run")


def _ckpt(tmp_path: Path, rnd: int, ext: str) -> Path:
    return tmp_path / "run" / CHECKPOINT_DIR / f"round-{rnd:05d}.{ext}"


def _edit_meta(path: Path, **changes: Any) -> None:
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


# --- checkpoints ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "field"),
    [
        ("[1, 2]", "not a JSON object"),
        ('{"array_names": ["w"]}', "'round'"),
        ('{"round": "x", "array_names": ["w"]}', "'round'"),
        ('{"round": 0, "array_names": ["w"]}', "'round' is 0"),
        ('{"round": 1, "array_names": 7}', "'array_names'"),
        ('{"round": 1, "config": [1]}', "'config'"),
        ('{"round": 1, "metrics": "x"}', "'metrics'"),
        ('{"round": 1, "array_n', "unreadable"),
    ],
)
def test_malformed_checkpoint_json_is_refused_naming_file_and_field(
    tmp_path: Path, content: str, field: str
) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, W)
    store.paths(1)[1].write_text(content)
    with pytest.raises(CheckpointMismatch, match="round-00001.json") as info:
        store.load(1)
    assert field in str(info.value)


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # truncated: zipfile.BadZipFile before
        lambda b: b"PK\x03\x04" + b"\0" * 20,
        lambda b: b[:100] + bytes(x ^ 0xFF for x in b[100:-100]) + b[-100:],
    ],
)
def test_broken_npz_is_refused_naming_it(tmp_path: Path, damage: Any) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, W)
    npz = store.paths(1)[0]
    npz.write_bytes(damage(npz.read_bytes()))
    with pytest.raises(CheckpointMismatch, match="round-00001.npz"):
        store.load(1)


def test_latest_readable_skips_a_broken_newest_and_never_starts_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(tmp_path)
    assert store.latest_readable() is None
    store.save(0, W)
    store.save(1, W)
    store.paths(1)[0].write_bytes(b"PK\x03\x04 torn")
    with caplog.at_level(logging.WARNING):
        last = store.latest_readable()
    assert last is not None and last.round == 0
    assert "round-00001.npz" in caplog.text
    store.paths(0)[1].write_text("{")
    with pytest.raises(CheckpointMismatch, match="round-00001.npz"):
        store.latest_readable()  # all broken: refused, not "no checkpoint"


# --- resume -----------------------------------------------------------------------
def test_resume_skips_a_truncated_last_checkpoint(
    test_cfg: FederationConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _run(test_cfg, tmp_path, 2)
    npz = _ckpt(tmp_path, 2, "npz")
    npz.write_bytes(npz.read_bytes()[:200])
    with caplog.at_level(logging.WARNING):
        s = _run(test_cfg, tmp_path, 3)
    assert (s.start_round, s.last_round) == (1, 3)
    assert str(npz) in caplog.text
    assert s.outcome["status"] == "completed"
    assert CheckpointStore(npz.parent).load(2).round == 2  # rewritten whole


def test_resume_removes_what_a_killed_write_left_behind(
    test_cfg: FederationConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A process killed mid-write leaves a hidden temporary file as big as a
    checkpoint; the next run of the same folder removes it, and only it."""
    _run(test_cfg, tmp_path, 1)
    folder = _ckpt(tmp_path, 1, "npz").parent
    leftover = folder / ".round-00002.npz.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    keep = folder / "notes.txt"
    keep.write_text("the operator's")
    with caplog.at_level(logging.INFO):
        s = _run(test_cfg, tmp_path, 2)
    assert s.last_round == 2 and not leftover.exists() and keep.exists()
    assert f"removed {leftover}" in caplog.text


def test_resume_does_not_restart_from_round_0_for_an_edited_round(
    test_cfg: FederationConfig, tmp_path: Path
) -> None:
    _run(test_cfg, tmp_path, 2)
    _edit_meta(_ckpt(tmp_path, 2, "json"), round=0)
    s = _run(test_cfg, tmp_path, 3)
    assert s.start_round == 1  # before: 0, rounds 1 and 2 trained again


def test_resume_refuses_a_config_field_that_is_not_an_object(
    test_cfg: FederationConfig, tmp_path: Path
) -> None:
    _run(test_cfg, tmp_path, 1)
    meta = _ckpt(tmp_path, 1, "json")
    cfg = json.loads(meta.read_text())["config"]
    _edit_meta(meta, config={**cfg, "strategy": "personalized"})
    with pytest.raises(CheckpointMismatch, match=r"config\.strategy"):
        _run(test_cfg, tmp_path, 2)


def test_resume_refuses_a_checkpoint_of_another_model(
    test_cfg: FederationConfig, tmp_path: Path
) -> None:
    _run(test_cfg, tmp_path, 1)
    trainer = dataclasses.replace(
        test_cfg.trainer, options={**test_cfg.trainer.options, "channels": 4}
    )
    other = dataclasses.replace(test_cfg, trainer=trainer)
    # before: every site failed every round and the run ended degraded
    with pytest.raises(CheckpointMismatch, match="round-00001.npz.*shape"):
        _run(other, tmp_path, 2)


def test_crash_after_a_round_is_recorded_loses_no_row(
    test_cfg: FederationConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save = CheckpointStore.save

    def crash_at_2(self: CheckpointStore, rnd: int, *a: Any, **k: Any) -> Path:
        path = save(self, rnd, *a, **k)
        if rnd == 2:
            raise KeyboardInterrupt("server killed")
        return path

    monkeypatch.setattr(CheckpointStore, "save", crash_at_2)
    with pytest.raises(KeyboardInterrupt):
        _run(test_cfg, tmp_path, 3)
    monkeypatch.setattr(CheckpointStore, "save", save)
    s = _run(test_cfg, tmp_path, 3)
    assert s.outcome["rounds_missing"] == [] and s.outcome["status"] == "completed"


def test_torn_rounds_jsonl_line_costs_that_line_only(
    test_cfg: FederationConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _run(test_cfg, tmp_path, 1)
    jsonl = tmp_path / "run" / ROUNDS_JSONL
    with jsonl.open("a") as fh:
        fh.write('{"round": 2, "status": "aggr')  # the crash hit mid-line
    with caplog.at_level(logging.WARNING):
        s = _run(test_cfg, tmp_path, 2)  # before: JSONDecodeError at the end
    assert s.outcome["status"] == "completed"
    assert f"{jsonl} line 2" in caplog.text
    lines = jsonl.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["round"] == 2


def test_round_rows_skip_what_is_not_a_row(tmp_path: Path) -> None:
    path = tmp_path / ROUNDS_JSONL
    path.write_bytes(
        b'{"round": 1}\n\xff\xfe\n[1]\n{"round": NaN}\n{"round": "2"}\n\n{"round": 3'
    )
    append_round_row(path, {"round": 4})
    assert [r["round"] for r in iter_round_rows(path)] == [1, 4]
    assert last_round_row(path) == {"round": 4}
    assert last_round_row(tmp_path / "absent") is None


def test_last_round_row_reads_only_the_tail(tmp_path: Path) -> None:
    path = tmp_path / ROUNDS_JSONL
    path.write_bytes(b"\xff" * 5000 + b'\n{"round": 7}\n{"round": 8, "x": "')
    assert last_round_row(path, max_bytes=100) == {"round": 7}
    path.write_bytes(b'{"round": 1}\n{"round": 2, "x": "' + b"y" * 500 + b'"}\n')
    assert last_round_row(path, max_bytes=100) is None  # a longer line is cut


# --- mammofed-server status --------------------------------------------------------
@pytest.fixture
def status(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    import server.launch

    monkeypatch.setattr(server.launch, "list_runs", lambda home: [])

    def call(run_dir: Path) -> tuple[int, str, str]:
        from server.cli import main

        code = main(["status", "--insecure", "--run-dir", str(run_dir)])
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


def test_status_of_a_missing_run_dir_is_an_error_and_creates_nothing(
    tmp_path: Path, status: Any
) -> None:
    code, _, err = status(tmp_path / "typo")
    assert code == 2 and "typo" in err and "does not exist" in err
    assert not (tmp_path / "typo").exists()


def test_status_of_a_hostile_run_dir_reports_without_a_traceback(
    tmp_path: Path, status: Any, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    (run / CHECKPOINT_DIR).mkdir(parents=True)
    row = {"round": 3, "status": "aggregated", "train_aggregated": {"loss": 0.5}}
    (run / ROUNDS_JSONL).write_bytes(
        json.dumps(row).encode() + b'\n{"round": 4}\n\xff\n{"round": 5, "st'
    )
    (run / OUTCOME_JSON).write_text('{"status": "degraded", "faults": {"a": 1}}')
    code, out, _ = status(run)
    assert code == 0
    assert "last round 4 None" in out and "outcome" not in out
    assert f"{run / OUTCOME_JSON}: field 'rounds_without_update'" in caplog.text
    (run / OUTCOME_JSON).write_text(
        '{"status": "degraded", "rounds_without_update": [2], "faults": {"a": 1}}'
    )
    assert status(run)[0] == 0
    (run / ROUNDS_JSONL).write_text('{"round": 1, "status": "' + "x" * 10**5 + '"}\n')
    code, out, _ = status(run)
    assert code == 0 and len(out) < 5000


def test_following_a_run_survives_a_half_written_last_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``mammofed-server run`` follows rounds.jsonl while the server appends to
    it: a half-written last line is skipped, not a crash of the follower."""
    from server import launch

    row = {"round": 1, "status": "aggregated", "train": {}, "evaluate": {}}
    (tmp_path / "rounds.jsonl").write_text(json.dumps(row) + '\n{"round": 2, "sta')
    monkeypatch.setattr(
        launch, "run_status", lambda *a, **k: {"status": "finished:completed"}
    )
    with caplog.at_level(logging.INFO):
        status = launch.follow_run(7, tmp_path, timeout_s=5, poll_s=0.01)
    assert status == "finished:completed"
    assert "run 7 round 1 aggregated" in caplog.text
