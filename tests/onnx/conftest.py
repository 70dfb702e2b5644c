"""Fixtures for the ONNX export tests: checkpoints with spread-out scores, DICOMs."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from common.detector.checkpoint import save_checkpoint
from common.detector.model import ModelConfig, build_detector

pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx)")
pytest.importorskip(
    "onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)"
)

TESTS = Path(__file__).resolve().parents[1]


def load_by_path(name: str, path: Path) -> ModuleType:
    """Import a test helper module by file path (tests run in importlib mode)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def dicom_factory() -> ModuleType:
    """tests/dicom/factory.py (synthetic mammograms written with pydicom)."""
    return load_by_path("mammofed_tests_dicom_factory", TESTS / "dicom" / "factory.py")


def spread_model(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """A random detector whose head gives well spread scores.

    At torchvision's initialisation every location scores about 0.07 (prior
    bias, tiny weights), so the ranking of candidates is a matter of 1e-6;
    larger head weights give scores spread over (0, 1), like a trained model,
    so that both runtimes keep the same candidates.
    """
    torch.manual_seed(seed)
    model = build_detector(cfg)
    with torch.no_grad():
        for name, p in model.head.named_parameters():
            if p.dim() == 4:
                p.normal_(0.0, 0.1)
            elif name.endswith("cls_logits.bias"):
                p.fill_(-1.0)
    return model.eval()


@pytest.fixture(autouse=True)
def _two_threads():
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
    factory = dicom_factory()

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
            factory.write_mammo(
                p, rows=rows, cols=cols, side=side, image_laterality=lat,
                view_position=view, pixel_spacing=(0.1, 0.1),
            )  # fmt: skip
            paths.append(p)
        return paths

    return _write
