"""Fixtures for the DICOM reader tests: a writer of synthetic mammograms."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


def _load_factory() -> ModuleType:
    """tests/dicom/factory.py, loaded once by the project-wide conftest."""
    return sys.modules["mammofed_tests_dicom_factory"]  # tests/conftest.py


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
