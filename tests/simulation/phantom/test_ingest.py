"""Every written file ingests through the client's ingest with the right facts."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest

from simulation.phantom import Scenario, plan_site

ingest = pytest.importorskip("client.ingest")
site_cfg = pytest.importorskip("common.config.site")


@pytest.mark.parametrize("site", ["A", "B", "C", "D", "E"])
def test_every_file_ingests(
    test_scenario: Scenario, generated: dict[str, Path], tmp_path: Path, site: str
) -> None:
    spec = test_scenario.site(site)
    vendor = test_scenario.vendor_of(spec)
    cfg = dataclasses.replace(
        site_cfg.SiteConfig(), working_spacing_mm=test_scenario.working_spacing_mm
    )
    result = ingest.ingest_site(generated[site], tmp_path / "cache", cfg, workers=1)
    plans = {p.relpath: p for p in plan_site(test_scenario, spec)}
    assert result.skipped == []
    assert result.annotation_skips == []
    assert {e.source for e in result.entries} == set(plans)
    for e in result.entries:
        p = plans[e.source]
        assert e.meta.laterality == p.laterality
        assert e.meta.view == p.view
        assert e.meta.patient_id == p.patient_id
        assert e.meta.stored_spacing_mm == pytest.approx(
            test_scenario.stored_pitch_mm(vendor), rel=1e-6
        )
        assert e.geometry.flip == (p.laterality == "R")
    ann = json.loads((tmp_path / "cache" / "annotations.json").read_text())
    with open(tmp_path / "cache" / "manifest.csv", newline="") as fh:
        source_of = {r["key"]: r["source"] for r in csv.DictReader(fh)}
    n_boxes = 0
    for key, a in ann.items():
        p = plans[source_of[key]]
        assert a["labeled"] == p.labeled
        n_boxes += len(a["boxes"])
        geo = next(e.geometry for e in result.entries if e.key == key)
        h, w = geo.model_shape
        for x0, y0, x1, y1 in a["boxes"]:
            assert -1 <= x0 < x1 <= w + 1 and -1 <= y0 < y1 <= h + 1
    with open(generated[site] / "annotations.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["finding"] != "none"]
    assert n_boxes == len(rows)
