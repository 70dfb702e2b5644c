"""``evaluate`` scores the test women of the split the model was trained under.

A hospital has no ``split.csv``: its women are split by the federation's seed.
The checkpoints ``train-local`` and ``export`` write record that split
(``extra["split"]``) and ``evaluate`` scores its test women by default, so no
woman the model was trained on is scored as a test woman.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import client.evaluate as evaluate_mod
import client.local_training as local_mod
from client.cli import main as client_main
from client.detector_trainer import EXTRA_SPLIT, TEST_FRACTION, training_split
from client.evaluate import (
    METRICS_JSON,
    NothingToEvaluate,
    SplitMismatch,
    evaluate_checkpoint,
)
from client.export import export_model
from common.config.loader import config_to_dict
from common.detector.checkpoint import load_checkpoint, save_checkpoint
from common.detector.model import ModelConfig, build_detector
from common.errors import CheckpointMismatch
from common.imaging.data import SiteDataset
from tests.client.conftest import SITE, one_site_config, train_one_round
from tests.conftest import make_site_cache

SEED = 1  # a federation seed other than evaluate's old default (0)
QUIET = ["--n-boot", "0", "--device", "cpu", "--gallery-missed", "0"]
QUIET += ["--gallery-fp", "0"]


def _scored_women(monkeypatch: pytest.MonkeyPatch) -> list[set[str]]:
    """Spy on evaluate: the patient ids of each dataset it scores."""
    seen: list[set[str]] = []
    real = evaluate_mod.detect_dataset

    def spy(model: Any, images: Any, *args: Any, **kw: Any) -> Any:
        seen.append({images[i][1]["patient_id"] for i in range(len(images))})
        return real(model, images, *args, **kw)

    monkeypatch.setattr(evaluate_mod, "detect_dataset", spy)
    return seen


def test_train_local_model_is_scored_on_women_it_never_saw(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = make_site_cache(tmp_path / "cache")  # no split.json: a hospital
    assert not (cache / "split.json").exists()
    site = tmp_path / "site.yaml"
    site.write_text(f"name: site-b\ncache_dir: {cache}\n")
    fed_cfg = dataclasses.replace(one_site_config(tmp_path, max_steps=1), seed=SEED)
    fed = tmp_path / "federation.yaml"
    fed.write_text(yaml.safe_dump(config_to_dict(fed_cfg)))
    cfg = ModelConfig(arch="tiny", working_spacing_mm=0.4)
    torch.manual_seed(7)
    base = save_checkpoint(tmp_path / "base.pt", build_detector(cfg), cfg)
    # the women train-local trains on
    trained: set[str] = set()
    real_pooled = local_mod.Pooled

    def pooled(views: list[Any]) -> Any:
        for v in views:
            trained.update(v.site.records[i].patient_id for i in v.indices)
        return real_pooled(views)

    monkeypatch.setattr(local_mod, "Pooled", pooled)
    out = tmp_path / "local.pt"
    argv = ["train-local", "--site-config", str(site), "--federation", str(fed)]
    assert client_main([*argv, "--init", str(base), "--out", str(out)]) == 0
    assert load_checkpoint(out).extra[EXTRA_SPLIT] == training_split(SEED)
    # the old default split (seed 0) would score a woman trained on
    old = SiteDataset(cache, test_fraction=0.2, seed=0)
    assert {r.patient_id for r in old.records if r.split == "test"} & trained
    scored = _scored_women(monkeypatch)
    ev = ["evaluate", "--checkpoint", str(out), "--cache", str(cache), *QUIET]
    assert client_main([*ev, "--out", str(tmp_path / "eval")]) == 0
    assert scored[-1] and not scored[-1] & trained
    doc = json.loads((tmp_path / "eval" / METRICS_JSON).read_text())
    assert doc["split"] == {
        "seed": SEED, "test_fraction": TEST_FRACTION, "source": "checkpoint",
        "site_split": False,
    }  # fmt: skip
    # the same values given explicitly are fine; another split is refused ...
    assert client_main([*ev, "--out", str(tmp_path / "e1"), "--split-seed", "1"]) == 0
    with pytest.raises(SplitMismatch, match=r"--split-seed 0 \(trained under 1\)"):
        evaluate_checkpoint(out, cache, tmp_path / "e2", split_seed=0, device="cpu")
    rc = client_main([*ev, "--out", str(tmp_path / "e2"), "--split-seed", "0"])
    assert rc == 2
    # ... unless asked for by name (then its test women include trained ones)
    rc = client_main(
        [*ev, "--out", str(tmp_path / "e3"), "--split-seed", "0", "--other-split"]
    )
    assert rc == 0 and scored[-1] & trained


def test_federated_export_is_scored_on_the_sites_test_women(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = dataclasses.replace(one_site_config(tmp_path, max_steps=1), seed=SEED)
    r = train_one_round(tmp_path, cfg)
    ds = r.trainer.dataset
    trained = {ds.records[i].patient_id for i in ds.indices("train")}
    out = export_model(r.ckdir, tmp_path / "m.pt", site=SITE).path
    assert load_checkpoint(out).extra[EXTRA_SPLIT] == training_split(SEED)
    scored = _scored_women(monkeypatch)
    doc = evaluate_checkpoint(
        out, r.cache, tmp_path / "eval", n_boot=0, device="cpu",
        gallery_missed=0, gallery_fp=0,
    )  # fmt: skip
    assert scored[-1] and not scored[-1] & trained
    assert doc["split"]["seed"] == SEED and doc["n_images"] == len(ds.indices("test"))


def test_splits_that_cannot_be_scored_are_refused(
    tmp_path: Path, site_cache: Path
) -> None:
    cfg = ModelConfig(arch="tiny", working_spacing_mm=0.4)
    model = build_detector(cfg)

    def ck(name: str, split: Any) -> Path:
        return save_checkpoint(tmp_path / name, model, cfg, extra={EXTRA_SPLIT: split})

    a, b = ck("a.pt", training_split(1)), ck("b.pt", training_split(2))
    kw: dict[str, Any] = {"n_boot": 0, "device": "cpu"}
    with pytest.raises(SplitMismatch, match=r"b\.pt: field 'extra\.split'.*a\.pt"):
        evaluate_checkpoint([a, b], site_cache, tmp_path / "e", **kw)
    with pytest.raises(SplitMismatch, match=r"--test-fraction 0\.5 \(trained under"):
        evaluate_checkpoint(a, site_cache, tmp_path / "e", test_fraction=0.5, **kw)
    # trained on every woman of a cache without split.json: no test women
    every = ck("all.pt", training_split(1, 0.0))
    with pytest.raises(NothingToEvaluate, match="records test_fraction 0"):
        evaluate_checkpoint(every, site_cache, tmp_path / "e", **kw)
    bad = ck("bad.pt", {"seed": "one", "test_fraction": 0.2})
    with pytest.raises(CheckpointMismatch, match=r"bad\.pt: field 'extra\.split' must"):
        evaluate_checkpoint(bad, site_cache, tmp_path / "e", **kw)
