"""The phantom writes each woman's BI-RADS density; ingest stores it per image."""

from __future__ import annotations

import csv
import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np

from client.ingest import ingest_site
from common.config.site import SiteConfig
from common.imaging.image import BIRADS_DENSITIES, DENSITY_COLUMNS, DENSITY_CSV
from simulation.phantom import Scenario, plan_site
from simulation.phantom.generate import woman_spec


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_density_csv_lists_every_image_with_its_womans_density(
    test_scenario: Scenario, generated: dict[str, Path]
) -> None:
    for site in test_scenario.sites:
        path = generated[site.name] / DENSITY_CSV
        with open(path, newline="") as fh:
            assert tuple(next(csv.reader(fh))) == DENSITY_COLUMNS
        written = {r["image"]: r["density"] for r in _rows(path)}
        plans = plan_site(test_scenario, site)
        assert set(written) == {p.relpath for p in plans}
        for p in plans:
            # the anatomy the image was rendered from, drawn again
            assert (
                written[p.relpath]
                == woman_spec(test_scenario, site.name, p.woman).density
            )
        per_woman = Counter((p.woman, written[p.relpath]) for p in plans)
        assert all(n == 4 for n in per_woman.values())  # one density per woman
        assert set(written.values()) <= set(BIRADS_DENSITIES)


def test_density_follows_the_scenario_probabilities(test_scenario: Scenario) -> None:
    # all women dense: every density drawn is "d"
    anatomy = dataclasses.replace(
        test_scenario.anatomy, density_probs=(0.0, 0.0, 0.0, 1.0)
    )
    dense = dataclasses.replace(test_scenario, anatomy=anatomy)
    site = dense.sites[0].name
    assert {woman_spec(dense, site, w).density for w in range(20)} == {"d"}
    drawn = [woman_spec(test_scenario, site, w).density for w in range(200)]
    freq = np.array([drawn.count(d) for d in BIRADS_DENSITIES]) / len(drawn)
    assert np.abs(freq - np.asarray(test_scenario.anatomy.density_probs)).max() < 0.1


def test_ingest_stores_the_phantom_density(
    test_scenario: Scenario, generated: dict[str, Path], tmp_path: Path
) -> None:
    site = test_scenario.sites[0]
    cfg = dataclasses.replace(
        SiteConfig(), working_spacing_mm=test_scenario.working_spacing_mm
    )
    res = ingest_site(generated[site.name], tmp_path / "cache", cfg, workers=1)
    assert res.annotation_skips == []
    written = {
        r["image"]: r["density"] for r in _rows(generated[site.name] / DENSITY_CSV)
    }
    assert {e.source: e.meta.density for e in res.entries} == written
