"""Fixtures for the ONNX export tests: checkpoints with spread-out scores, DICOMs.

The whole folder is skipped where onnx or onnxruntime is not installed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.synthetic import spread_model, write_mammo
from common.detector.checkpoint import save_checkpoint
from common.detector.model import ModelConfig

pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx)")
pytest.importorskip(
    "onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)"
)


@pytest.fixture(autouse=True)
def _two_threads():
    """Two torch threads for each test here (one elsewhere)."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def make_checkpoint(tmp_path: Path) -> Callable[..., Path]:
    """``make_checkpoint(name, extra=None, **model_cfg) -> .pt path`` (spread head)."""

    def _make(name: str = "tiny.pt", extra: dict[str, Any] | None = None, **kw: Any):
        cfg = ModelConfig(**{"arch": "tiny", "working_spacing_mm": 0.4, **kw})
        return save_checkpoint(tmp_path / name, spread_model(cfg), cfg, extra=extra)

    return _make


@pytest.fixture
def write_exam(tmp_path: Path) -> Callable[..., list[Path]]:
    """``write_exam(folder) -> 4 DICOM paths``: L/R CC/MLO of different sizes."""

    def _write(folder: str = "exam") -> list[Path]:
        d = tmp_path / folder
        d.mkdir(exist_ok=True)
        views = [
            ("L", "CC", 320, 256),
            ("R", "CC", 320, 256),
            ("L", "MLO", 352, 240),
            ("R", "MLO", 300, 272),
        ]
        paths = []
        for lat, view, rows, cols in views:
            p = d / f"{lat}{view}.dcm"
            side = "left" if lat == "L" else "right"
            write_mammo(
                p, rows=rows, cols=cols, side=side, image_laterality=lat,
                view_position=view, pixel_spacing=(0.1, 0.1),
            )  # fmt: skip
            paths.append(p)
        return paths

    return _write
