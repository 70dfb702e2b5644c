"""Project-wide fixtures: the shared real data, the DICOM factory, a tiny model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from common.detector.checkpoint import save_checkpoint
from common.detector.model import ModelConfig, build_detector

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
#: Module name of tests/dicom/factory.py once loaded (see load_dicom_factory).
FACTORY_MODULE = "mammofed_tests_dicom_factory"


def load_dicom_factory() -> ModuleType:
    """Import tests/dicom/factory.py by path (tests run with importlib mode).

    Loaded once, here, when pytest imports this conftest (before any folder's
    conftest), and kept in ``sys.modules`` under :data:`FACTORY_MODULE`, so a
    folder's conftest takes it with ``sys.modules[FACTORY_MODULE]``.
    """
    if FACTORY_MODULE in sys.modules:
        return sys.modules[FACTORY_MODULE]
    path = Path(__file__).resolve().parent / "dicom" / "factory.py"
    spec = importlib.util.spec_from_file_location(FACTORY_MODULE, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[FACTORY_MODULE] = module
    spec.loader.exec_module(module)
    return module


load_dicom_factory()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; tests needing it skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """An untrained ``tiny`` detector at 0.4 mm (seed 0; scores above 0.01)."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch="tiny", working_spacing_mm=0.4)
    return save_checkpoint(tmp_path / "tiny.pt", build_detector(cfg), cfg)
