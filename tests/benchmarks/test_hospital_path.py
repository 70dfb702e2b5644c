"""benchmarks.hospital_path: a site's own commands scored beside the study's figures."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from benchmarks.hospital_path import hospital_path
from client.detector_trainer import detector_options
from common.config.loader import config_to_dict
from common.detector.checkpoint import save_checkpoint
from common.detector.model import build_detector
from common.keys import CLASSES
from tests.client.conftest import SITE, one_site_config, train_one_round

STUDY_CPM = 0.5


def _fake_study(tmp_path: Path) -> Path:
    """``study/seed-0``: a base model, one personalized round, fixed metrics."""
    run = tmp_path / "study" / "seed-0"
    regime = run / "personalized-dp"
    cfg = dataclasses.replace(
        one_site_config(regime, paste=True), run_dir=regime / "server"
    )
    train_one_round(regime, cfg)
    (regime / "site-state").symlink_to(regime / "state")
    (run / "configs").mkdir(parents=True)
    (run / "configs" / "federation.yaml").write_text(
        yaml.safe_dump(config_to_dict(cfg))
    )
    mcfg = detector_options(cfg, "test").model_config()
    save_checkpoint(run / "base" / "model.pt", build_detector(mcfg), mcfg)
    metrics = {"classes": {c: {"cpm": STUDY_CPM} for c in CLASSES}}
    for arm in ("local-only", "personalized-dp", "personalized-dp+local"):
        (run / arm).mkdir(parents=True, exist_ok=True)
        (run / arm / "metrics.json").write_text(json.dumps({"sites": {SITE: metrics}}))
    return tmp_path / "study"


def test_the_three_arms_are_scored_against_the_study(tmp_path: Path) -> None:
    study = _fake_study(tmp_path)
    data = study / "seed-0" / "personalized-dp"  # its cache/<site>
    rows = hospital_path(study, data, SITE, 0, "personalized-dp", tmp_path / "work")
    scored = [r for r in rows if "arm" in r]
    assert {(r["arm"], r["class"]) for r in scored} == {
        (a, c)
        for a in ("local-only", "personalized-dp", "personalized-dp+local")
        for c in CLASSES
    }
    for r in scored:
        assert r["cpm_study"] == STUDY_CPM
        if r["class"] == "calcification":  # the tiny site has masses only
            assert r["cpm_hospital"] is None and r["abs_diff"] is None
        else:
            assert r["cpm_hospital"] is not None
            assert r["abs_diff"] == pytest.approx(abs(r["cpm_hospital"] - STUDY_CPM))
    steps = {r["step"] for r in rows if "step" in r}
    assert {"train-local", "export", "evaluate personalized-dp+local"} <= steps
    assert (tmp_path / "work" / "local.pt").is_file()
    assert (tmp_path / "work" / "federated.pt").is_file()
