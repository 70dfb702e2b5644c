"""ExamScorer: stored-space detections, refusals, model reload on file change."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
import torch

from client.dicom_node.scoring import ExamScorer
from common.detector.checkpoint import save_checkpoint
from common.detector.model import ModelConfig, build_detector
from common.errors import MammofedError


def test_scores_exam_in_stored_space_and_reloads(
    tmp_path: Path, tiny_checkpoint: Path, kit: SimpleNamespace
) -> None:
    files = kit.write_exam(tmp_path / "exam")
    broken = tmp_path / "exam" / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    scorer = ExamScorer(tiny_checkpoint, score_floor=0.0, device="cpu")
    res = scorer.score([*files, broken])
    assert [s.path for s in res.scored] == files
    assert [p for p, _ in res.refused] == [broken] and res.refused[0][1]
    for s in res.scored:
        ds = pydicom.dcmread(s.path, stop_before_pixels=True)
        assert s.sop_instance_uid == ds.SOPInstanceUID
        assert s.detections, "an untrained model at floor 0 detects something"
        for d in s.detections:
            x0, y0, x1, y1 = d["box"]
            assert 0 <= x0 <= x1 <= ds.Columns and 0 <= y0 <= y1 <= ds.Rows
            assert d["label"] in ("mass", "calcification")
    first = scorer.model_sha256
    assert len(first) == 64
    # a new export replaces the model file: the next exam uses it
    torch.manual_seed(1)
    cfg = ModelConfig(arch="tiny", working_spacing_mm=0.4)
    save_checkpoint(tiny_checkpoint, build_detector(cfg), cfg)
    st = tiny_checkpoint.stat()
    os.utime(tiny_checkpoint, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    scorer.score(files[:1])
    assert scorer.model_sha256 != first


def test_missing_model_raises(tmp_path: Path, kit: SimpleNamespace) -> None:
    scorer = ExamScorer(tmp_path / "none.pt", score_floor=0.3, device="cpu")
    with pytest.raises(MammofedError, match="none.pt: model checkpoint unreadable"):
        scorer.score(kit.write_exam(tmp_path / "exam")[:1])


def test_bad_floor_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="1.5"):
        ExamScorer(tmp_path / "m.pt", score_floor=1.5)
