"""Two ONNX members run as one: the torch pair's fused findings, within tolerance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.synthetic import spread_model
from client.commands import export_onnx as export_onnx_cmd
from client.export import ExportError
from client.onnx_ensemble import (
    ENSEMBLE_FORMAT,
    OnnxEnsemble,
    ensemble_member_path,
    export_onnx_ensemble,
)
from client.onnx_export import OnnxDetector
from common.detector.checkpoint import save_checkpoint
from common.detector.model import ModelConfig
from common.errors import ConfigError
from tests.client.onnx.test_parity import FLOOR, _assert_parity, _torch_records


def _pair(tmp_path: Path, spacing_b: float = 0.4) -> list[Path]:
    """Two different tiny models (seeds 0 and 1)."""
    out = []
    for seed, spacing in ((0, 0.4), (1, spacing_b)):
        cfg = ModelConfig(arch="tiny", working_spacing_mm=spacing)
        out.append(
            save_checkpoint(tmp_path / f"m{seed}.pt", spread_model(cfg, seed=seed), cfg)
        )
    return out


def test_pair_parity_with_torch_fusion(write_exam, tmp_path: Path) -> None:
    """The manifest's runner gives ``predict --checkpoint A --checkpoint B``'s
    fused detections in stored pixels, and differs from either member alone."""
    cks = _pair(tmp_path)
    manifest = export_onnx_ensemble(cks, tmp_path / "out" / "site.ensemble.json")
    doc = json.loads(manifest.read_text())
    assert doc["format"] == ENSEMBLE_FORMAT and len(doc["members"]) == 2
    assert doc["working_spacing_mm"] == 0.4 and "reach_mm" in doc["fusion"]
    files = write_exam()
    want = _torch_records(cks, files, tmp_path / "torch")
    ens = OnnxEnsemble(manifest, threads=2).with_score_floor(FLOOR)
    got = ens.predict_files(files)
    assert _assert_parity(want, got) > 40  # real detections compared
    # fusion is not a member: member 0 alone gives other findings
    alone = OnnxDetector(ensemble_member_path(manifest, 0)).with_score_floor(FLOOR)
    one = alone.predict_files(files[:1])[0]["detections"]
    par = [d["score"] for d in got[0]["detections"]]
    assert sorted(par) != sorted(d["score"] for d in one)


def test_manifest_refuses_changed_or_missing_members(tmp_path: Path) -> None:
    cks = _pair(tmp_path)
    manifest = export_onnx_ensemble(cks, tmp_path / "site.ensemble.json")
    OnnxEnsemble(manifest)  # intact: loads
    member = ensemble_member_path(manifest, 1)
    data = member.read_bytes()
    member.write_bytes(data + b"\0")
    with pytest.raises(
        ExportError, match=r"members\[1\]: site\.m1\.onnx does not match"
    ):
        OnnxEnsemble(manifest)
    member.write_bytes(data)
    doc = json.loads(manifest.read_text())
    doc_members = json.loads(manifest.read_text())["members"]
    doc["members"][0]["onnx"] = "../elsewhere.onnx"
    manifest.write_text(json.dumps(doc))
    with pytest.raises(ExportError, match="not a file beside the manifest"):
        OnnxEnsemble(manifest)
    doc["members"] = [1, 2]  # not member records: malformed
    manifest.write_text(json.dumps(doc))
    with pytest.raises(ExportError, match="malformed manifest field"):
        OnnxEnsemble(manifest)
    doc["members"] = doc_members[:1]
    manifest.write_text(json.dumps(doc))
    with pytest.raises(ExportError, match="at least two"):
        OnnxEnsemble(manifest)
    manifest.write_text(json.dumps({"format": "other/1"}))
    with pytest.raises(ExportError, match="field 'format'"):
        OnnxEnsemble(manifest)


def test_export_refuses_mixed_spacings_and_bad_names(tmp_path: Path) -> None:
    cks = _pair(tmp_path, spacing_b=0.2)
    with pytest.raises(ExportError, match="working_spacing_mm 0.2 differs"):
        export_onnx_ensemble(cks, tmp_path / "x.ensemble.json")
    assert not (tmp_path / "x.ensemble.json").exists()
    assert not list(tmp_path.glob("x.m*"))  # refused before any member is written
    with pytest.raises(ExportError, match="ending in .ensemble.json"):
        export_onnx_ensemble(cks, tmp_path / "x.onnx")
    with pytest.raises(ExportError, match="at least two checkpoints"):
        export_onnx_ensemble(cks[:1], tmp_path / "y.ensemble.json")


def test_cli_exports_a_pair_and_refuses_eval(tmp_path: Path) -> None:
    import argparse

    cks = _pair(tmp_path)
    parser = argparse.ArgumentParser()
    export_onnx_cmd.add_arguments(parser)
    out = tmp_path / "cli.ensemble.json"
    argv = ["--checkpoint", str(cks[0]), "--checkpoint", str(cks[1]), "--out", str(out)]
    assert export_onnx_cmd.run(parser.parse_args(argv)) == 0
    ens = OnnxEnsemble(out)
    assert len(ens.members) == 2
    rng = np.random.default_rng(0)
    dets = ens.detect([rng.random((160, 128)).astype(np.float32)])
    assert len(dets) == 1 and set(dets[0]) == {"boxes", "scores", "labels"}
    with pytest.raises(ConfigError, match="--eval"):
        export_onnx_cmd.run(parser.parse_args([*argv, "--eval", str(tmp_path)]))
