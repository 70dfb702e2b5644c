"""Fixtures for the DICOM reader tests: a writer of synthetic mammograms."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


def _load_factory() -> ModuleType:
    """Import tests/dicom/factory.py by path (tests run with importlib mode)."""
    name = "mammofed_tests_dicom_factory"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).with_name("factory.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def factory() -> ModuleType:
    """The factory module (constants such as ``MARKER``, ``CT_IMAGE``)."""
    return _load_factory()


@pytest.fixture
def write_mammo(tmp_path: Path, factory: ModuleType) -> Callable[..., tuple[Path, Any]]:
    """``write_mammo(name="x.dcm", **options) -> (path, Phantom)`` in ``tmp_path``."""

    def _write(name: str = "img.dcm", **kwargs: Any) -> tuple[Path, Any]:
        path = tmp_path / name
        ph = factory.write_mammo(path, **kwargs)
        return path, ph

    return _write
