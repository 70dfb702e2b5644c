"""Fixtures for the DICOM reader tests: a writer of synthetic mammograms."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from benchmarks import synthetic


@pytest.fixture(scope="session")
def factory() -> ModuleType:
    """:mod:`benchmarks.synthetic` (constants such as ``MARKER``, ``CT_IMAGE``)."""
    return synthetic


@pytest.fixture
def write_mammo(tmp_path: Path) -> Callable[..., tuple[Path, Any]]:
    """``write_mammo(name="x.dcm", **options) -> (path, Phantom)`` in ``tmp_path``."""

    def _write(name: str = "img.dcm", **kwargs: Any) -> tuple[Path, Any]:
        path = tmp_path / name
        return path, synthetic.write_mammo(path, **kwargs)

    return _write
