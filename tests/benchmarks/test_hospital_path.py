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
from common.detector.checkpoint import load_checkpoint, save_checkpoint
from common.detector.model import build_detector
from common.keys import CLASSES
from common.wire import runfolder as RF
from tests.client.conftest import SITE, one_site_config, train_one_round

STUDY_CPM = 0.5


TUNED_ARMS = (
    "personalized-dp-tuned",
    "personalized-dp+tuned",
    "personalized-dp+tuned+local",
)


def _fake_study(tmp_path: Path, tuned: bool = False) -> Path:
    """``study/seed-0``: a base model, one personalized round, fixed metrics.

    ``tuned``: the fine-tuned arms too, and personalized-dp trained in another
    run folder that ``run.json`` names (as ``mammofed-sim run --reuse`` leaves it).
    """
    run = tmp_path / "study" / "seed-0"
    trained = tmp_path / "earlier" if tuned else run
    regime = trained / "personalized-dp"
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
    record = RF.StudyRun(
        scenario="fake",
        sites=[SITE],
        regimes=["personalized-dp"],
        working_spacing_mm=mcfg.working_spacing_mm,
        base_sites=[SITE],
    )
    RF.write_record(trained / RF.RUN_JSON, record)
    if tuned:
        reused = {"personalized-dp": str(trained)}
        RF.write_record(run / RF.RUN_JSON, dataclasses.replace(record, reused=reused))
    metrics = {"classes": {c: {"cpm": STUDY_CPM} for c in CLASSES}}
    arms = ("local-only", "personalized-dp", "personalized-dp+local")
    for arm in arms + (TUNED_ARMS if tuned else ()):
        (run / arm).mkdir(parents=True, exist_ok=True)
        (run / arm / "metrics.json").write_text(json.dumps({"sites": {SITE: metrics}}))
    return tmp_path / "study"


@pytest.mark.parametrize("tuned", [False, True])
def test_every_arm_is_scored_against_the_study(tmp_path: Path, tuned: bool) -> None:
    study = _fake_study(tmp_path, tuned)
    # its cache/<site>
    data = (tmp_path / "earlier" if tuned else study / "seed-0") / "personalized-dp"
    rows = hospital_path(study, data, SITE, 0, "personalized-dp", tmp_path / "work")
    scored = [r for r in rows if "arm" in r]
    arms = ("local-only", "personalized-dp", "personalized-dp+local")
    assert {(r["arm"], r["class"]) for r in scored} == {
        (a, c) for a in arms + (TUNED_ARMS if tuned else ()) for c in CLASSES
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
    # the fine-tuned model: train-local from the exported one, at 0.3 x the rate
    assert (tmp_path / "work" / "tuned.pt").is_file() is tuned
    assert ("train-local --init federated" in steps) is tuned
    if tuned:
        ck = load_checkpoint(tmp_path / "work" / "tuned.pt")
        record = ck.extra["local_model"]
        assert record["lr_factor"] == 0.3
        assert record["init"] == str(tmp_path / "work" / "federated.pt")


def test_arms_the_study_did_not_run_are_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A study that ran the three-model recipe but not its pairs (as the
    stop-35 one did) is scored on the arms it has, not refused."""
    study = _fake_study(tmp_path, tuned=True)
    for pair in ("personalized-dp+local", "personalized-dp+tuned"):
        (study / "seed-0" / pair / "metrics.json").unlink()
    data = tmp_path / "earlier" / "personalized-dp"
    rows = hospital_path(study, data, SITE, 0, "personalized-dp", tmp_path / "work")
    assert {r["arm"] for r in rows if "arm" in r} == {
        "local-only",
        "personalized-dp",
        "personalized-dp-tuned",
        "personalized-dp+tuned+local",
    }
    assert (
        "personalized-dp+local: not in the study, arm skipped"
        in capsys.readouterr().out
    )
