"""Scenario validation: a site's name is one folder name under the output dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.errors import ConfigError
from simulation.phantom import load_scenario
from simulation.phantom.scenario import SiteSpec
from tests.conftest import REPO

VENDORS = REPO / "configs" / "simulation" / "vendors"


def _scenario(tmp_path: Path, second: str, field: str = "name") -> Path:
    site = {"name": "B", "vendor": "H", field: second}
    p = tmp_path / "bad.yaml"
    p.write_text(
        f"name: x\nseed: 1\nworking_spacing_mm: 0.4\nvendors_dir: {VENDORS}\n"
        f"sites:\n  - {{name: A, vendor: H}}\n  - {json.dumps(site)}\n"
    )
    return p


@pytest.mark.parametrize(
    "bad", ["/tmp/victim", "../up", "a/b", "..", ".", "", "a\\b", " A"]
)
def test_site_name_must_be_a_plain_name(tmp_path: Path, bad: str) -> None:
    # generate_scenario writes ``out_dir / site.name`` and deletes the .dcm
    # files it did not plan there: a path here would reach anywhere.
    p = _scenario(tmp_path, bad)
    with pytest.raises(ConfigError, match=r"bad.yaml: sites\[1\].name: .*plain name"):
        load_scenario(p)
    with pytest.raises(ValueError, match="name: must be a plain name"):
        SiteSpec(name=bad, vendor="H")


def test_site_vendor_must_be_a_plain_name(tmp_path: Path) -> None:
    p = _scenario(tmp_path, "../vendors/H", field="vendor")
    with pytest.raises(ConfigError, match=r"bad.yaml: sites\[1\].vendor: .*plain"):
        load_scenario(p)


def test_plain_site_names_load(tmp_path: Path) -> None:
    scenario = load_scenario(_scenario(tmp_path, "site-B.2"))
    assert [s.name for s in scenario.sites] == ["A", "site-B.2"]


def test_nan_spacing_is_refused(tmp_path: Path) -> None:
    p = _scenario(tmp_path, "B")
    p.write_text(p.read_text().replace("0.4", ".nan"))
    with pytest.raises(ConfigError, match="working_spacing_mm: must be a finite"):
        load_scenario(p)
