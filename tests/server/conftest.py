"""Fixtures for the coordinator tests: the tests' federation config in tmp_path."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from common.wire.federation import FederationConfig, load_federation_config
from tests.conftest import TEST_YAML


@pytest.fixture
def test_cfg(tmp_path: Path) -> FederationConfig:
    """``configs/federation/test.yaml`` writing under ``tmp_path``, short waits."""
    cfg = load_federation_config(TEST_YAML)
    return dataclasses.replace(
        cfg,
        run_dir=tmp_path / "run",
        state_dir=tmp_path / "state",
        participation=dataclasses.replace(cfg.participation, wait_for_nodes_s=0.5),
    )
