"""Fixtures: the tiny test scenario and one generated copy of it per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulation.phantom import Scenario, generate_scenario, load_scenario
from tests.conftest import REPO

CONFIGS = REPO / "configs" / "simulation"


@pytest.fixture(scope="session")
def test_scenario() -> Scenario:
    """``configs/simulation/test.yaml`` (one or two women per vendor, coarse)."""
    return load_scenario(CONFIGS / "test.yaml")


@pytest.fixture(scope="session")
def demo_scenario() -> Scenario:
    """``configs/simulation/demo.yaml``."""
    return load_scenario(CONFIGS / "demo.yaml")


@pytest.fixture(scope="session")
def generated(
    test_scenario: Scenario, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """All sites of the test scenario, written once per session."""
    out = tmp_path_factory.mktemp("phantom")
    return generate_scenario(test_scenario, out, workers=1, progress=False)
