"""The ``-select`` regimes end to end: each site chooses; the study scores that."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from client.selection import BASE, NAMES, SELECTION_JSON, Selection
from common.wire import runfolder as RF
from common.wire.federation import SELECTED_MODEL
from simulation import regimes as R
from simulation.report import load_detections, write_report
from simulation.run import RunRequest, run_study

REPO = Path(__file__).resolve().parents[2]
FEDERATION = REPO / "configs" / "federation" / "sim-test.yaml"
VENDORS = REPO / "configs" / "simulation" / "vendors"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/simulation/test.yaml cut to two sites: A (one training woman)
    and B (three labeled training women, so one is held out to choose)."""
    out = tmp_path_factory.mktemp("select")
    doc = yaml.safe_load((REPO / "configs" / "simulation" / "test.yaml").read_text())
    doc["vendors_dir"] = str(VENDORS)
    doc["sites"] = [
        {"name": "A", "vendor": "H", "role": "base", "women": 2,
         "labeled_fraction": 1.0, "test_fraction": 0.5},
        {"name": "B", "vendor": "V2", "role": "few-shot", "women": 4,
         "labeled_fraction": 1.0, "test_fraction": 0.25},
    ]  # fmt: skip
    scenario = out / "scenario.yaml"
    scenario.write_text(yaml.safe_dump(doc))
    req = RunRequest(
        scenario=scenario,
        federation=FEDERATION,
        out=out / "run",
        regimes=(R.BASE, R.PERSONALIZED_SELECT),
        data=out / "data",
        workers=1,
        n_boot=10,
    )
    return run_study(req)


def _choice(study: Path, site: str) -> Selection:
    path = study / R.PERSONALIZED_SELECT / RF.SITE_STATE_DIR / site / SELECTION_JSON
    return Selection.read(path)


@pytest.mark.slow
def test_every_site_records_its_choice_for_the_last_round(study: Path) -> None:
    for site in ("A", "B"):
        sel = _choice(study, site)
        assert sel.round == 1 and sel.choice in NAMES
    # A has one labeled training woman: nobody to validate on, base kept
    a = _choice(study, "A")
    assert a.choice == BASE and a.validation["women"] == 0 and not a.scores
    # B held one woman out and scored every candidate the run can build
    b = _choice(study, "B")
    assert b.validation["women"] >= 1
    assert {"base", "global", "personalized", "base-tuned", "global-tuned"} <= set(
        b.scores
    )
    rows = [
        json.loads(x)
        for x in (study / R.PERSONALIZED_SELECT / RF.ROUNDS_JSONL)
        .read_text()
        .splitlines()
    ]
    sent = {r["site"]: r.get(SELECTED_MODEL) for r in rows}
    assert sent == {"A": NAMES.index(a.choice), "B": NAMES.index(b.choice)}


@pytest.mark.slow
def test_a_site_that_keeps_the_base_is_scored_as_the_base(study: Path) -> None:
    """A kept base, so its test detections are the base regime's, image for image."""
    chosen = load_detections(study / R.PERSONALIZED_SELECT / RF.DETECTIONS_JSON)
    base = load_detections(study / R.BASE / RF.DETECTIONS_JSON)
    assert chosen["A"] and len(chosen["A"]) == len(base["A"])
    for got, want in zip(chosen["A"], base["A"], strict=True):
        assert got.key == want.key
        np.testing.assert_allclose(got.det_scores, want.det_scores, rtol=1e-5)
        np.testing.assert_allclose(got.det_boxes, want.det_boxes, rtol=1e-5)


@pytest.mark.slow
def test_report_shows_what_each_site_chose(study: Path, tmp_path: Path) -> None:
    md = write_report([study], tmp_path / "report").read_text()
    assert "## Site choices (validation women)" in md
    assert f"| {R.PERSONALIZED_SELECT} | 0 | A | base | 1 | 0 (0) |" in md
    b = _choice(study, "B").choice
    assert f"· chose {b}" in md
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert {r["site"]: r["choice"] for r in data["choices"]} == {"A": "base", "B": b}
