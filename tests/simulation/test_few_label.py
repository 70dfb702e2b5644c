"""A new site with few labels: few_label_subset, init_checkpoint, and both in CV."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from common.detector.checkpoint import init_from_checkpoint, load_checkpoint
from common.detector.model import ModelConfig
from common.errors import CheckpointMismatch
from simulation.crossval import CV_METRICS_JSON, run_crossval
from simulation.train import (
    TrainConfig,
    few_label_subset,
    train_model,
)
from tests.conftest import make_site_cache


def _fake_site(lesion_women: int, clean_women: int, per_woman: int = 2):
    records = []
    for p in range(lesion_women + clean_women):
        for j in range(per_woman):
            lesion = p < lesion_women and j == 0
            records.append(SimpleNamespace(patient_id=f"W{p:02d}", has_lesion=lesion))
    return SimpleNamespace(records=records)


def test_few_label_subset_keeps_whole_women_in_lesion_proportion():
    site = _fake_site(lesion_women=6, clean_women=14)
    idx = list(range(len(site.records)))
    sub = few_label_subset(site, idx, 5, seed=3)  # type: ignore[arg-type]
    women = {site.records[i].patient_id for i in sub}
    assert len(women) == 5
    # every image of a chosen woman, none of the others, order kept
    assert sub == [i for i in idx if site.records[i].patient_id in women]
    recs = site.records
    with_lesion = {recs[i].patient_id for i in sub if recs[i].has_lesion}
    assert len(with_lesion) == round(5 * 6 / 20)  # 2 of 5, as in the pool (6 of 20)
    assert few_label_subset(site, idx, 5, seed=3) == sub  # type: ignore[arg-type]
    others = {
        tuple(few_label_subset(site, idx, 5, seed=s))  # type: ignore[arg-type]
        for s in range(6)
    }
    assert len(others) > 1  # the seed draws the women
    # a rare lesion class still gets one woman; more women than exist: all
    rare = _fake_site(lesion_women=1, clean_women=19)
    ridx = list(range(len(rare.records)))
    rsub = few_label_subset(rare, ridx, 3, seed=0)  # type: ignore[arg-type]
    assert any(rare.records[i].has_lesion for i in rsub)
    assert few_label_subset(site, idx, 50, seed=0) == idx  # type: ignore[arg-type]


def _cfg(tmp_path: Path, cache: Path, **kw) -> TrainConfig:
    return TrainConfig(
        caches=(cache,),
        out_dir=tmp_path / "out",
        model=ModelConfig(arch="tiny", working_spacing_mm=0.4),
        epochs=1,
        batch_size=2,
        warmup_steps=1,
        n_boot=0,
        device="cpu",
        test_fraction=0.0,
        **kw,
    )


def test_init_checkpoint_starts_from_the_pretrained_weights(
    tmp_path, site_cache, tiny_checkpoint
):
    from common.imaging.data import SiteDataset

    ck = load_checkpoint(tiny_checkpoint)
    # lr 0: training cannot move a parameter, so they must be the checkpoint's
    cfg = _cfg(tmp_path, site_cache, lr=0.0, init_checkpoint=tiny_checkpoint)
    site = SiteDataset(site_cache, test_fraction=0.0)
    torch.manual_seed(123)  # a different random init than the checkpoint's
    model = train_model(
        cfg, [site.view("labeled")], cfg.out_dir, torch.device("cpu")
    ).model
    for name, p in model.named_parameters():
        assert torch.equal(p.detach().cpu(), ck.state_dict[name]), name
    # and without it the same seed gives other weights
    cfg0 = dataclasses.replace(cfg, out_dir=tmp_path / "scratch", init_checkpoint=None)
    torch.manual_seed(123)
    m0 = train_model(
        cfg0, [site.view("labeled")], cfg0.out_dir, torch.device("cpu")
    ).model
    assert any(
        not torch.equal(p.detach().cpu(), ck.state_dict[n])
        for n, p in m0.named_parameters()
    )


def test_init_checkpoint_refuses_another_structure(tiny_checkpoint):
    from common.detector.model import build_detector

    other = ModelConfig(arch="tiny", working_spacing_mm=0.2)
    with pytest.raises(CheckpointMismatch, match="working_spacing_mm"):
        init_from_checkpoint(build_detector(other), other, tiny_checkpoint)


def test_crossval_with_few_labels_trains_on_that_many_women(tmp_path, tiny_checkpoint):
    cache = make_site_cache(tmp_path / "siteA", n_patients=8)
    cfg = _cfg(tmp_path, cache, labeled_patients=2, init_checkpoint=tiny_checkpoint)
    doc = run_crossval(cfg, k=2)
    for fd in doc["folds"]:
        assert fd["n_train_patients"] == 2 and fd["n_train_images"] == 4
        assert fd["n_val_patients"] == 4  # the held-out fold stays whole
    assert doc["n_images"] == 16
    saved = json.loads((cfg.out_dir / CV_METRICS_JSON).read_text())
    assert saved["config"]["labeled_patients"] == 2
    assert saved["config"]["init_checkpoint"] == str(tiny_checkpoint)
    # the out-of-fold file is self-contained (ground truth included) and an
    # older file with detections only still loads, with the caches' truth
    from simulation.crossval import OOF_PREDICTIONS_JSON, load_oof_images

    path = cfg.out_dir / OOF_PREDICTIONS_JSON
    rows = json.loads(path.read_text())
    assert len(rows) == 16 and {"gt_boxes", "spacing_mm", "fold"} <= set(rows[0])
    new = load_oof_images(cfg)
    legacy = [
        {"key": r["key"], "fold": r["fold"], "boxes": r["det_boxes"]}
        | {"scores": r["det_scores"], "labels": r["det_labels"]}
        for r in rows
    ]
    path.write_text(json.dumps(legacy))
    old = load_oof_images(cfg)
    assert [i.to_json() for i in old] == [i.to_json() for i in new]


def test_mias_fewlabel_benchmark_pairs_arms_on_the_same_images(
    tmp_path, tiny_checkpoint, monkeypatch, capsys
):
    import yaml

    from benchmarks.mias_fewlabel import main as bench_main
    from common.detector.froc import froc_all
    from simulation.crossval import load_oof_images

    cache = make_site_cache(tmp_path / "siteA", n_patients=6)
    cfg = _cfg(tmp_path, cache, labeled_patients=2)
    doc = {
        "caches": [str(cache)],
        "out_dir": str(tmp_path / "cv" / "cv-fewlabel-scratch"),
        "model": {"arch": "tiny", "working_spacing_mm": 0.4},
        "labeled_patients": 2,
        "epochs": 1,
        "batch_size": 2,
        "warmup_steps": 1,
        "device": "cpu",
        "test_fraction": 0.0,
    }
    (tmp_path / "fl.yaml").write_text(yaml.safe_dump(doc))
    results = tmp_path / "results"
    monkeypatch.setenv("MAMMOFED_BENCH_RESULTS", str(results))
    argv = ["--config", str(tmp_path / "fl.yaml"), "--folds", "2", "--n-boot", "20"]
    argv += ["--arm", f"pre={tiny_checkpoint}", "--results", str(results)]
    assert bench_main(argv) == 0
    text = (results / "mias_fewlabel.jsonl").read_text()
    lines = [json.loads(x) for x in text.splitlines()]
    figures = {x["figure"]: x for x in lines}
    for cls in ("mass", "calcification"):
        assert {f"scratch-cpm-{cls}", f"pre-cpm-{cls}"} <= set(figures)
        assert f"pre-minus-scratch-cpm-{cls}" in figures
        assert (results / f"mias_fewlabel_froc-{cls}.png").is_file()
    pre = tmp_path / "cv" / "cv-fewlabel-pre"
    assert (pre / CV_METRICS_JSON).is_file()
    saved = json.loads((pre / CV_METRICS_JSON).read_text())
    assert saved["config"]["init_checkpoint"] == str(tiny_checkpoint)
    # the OOF images re-scored give the pooled CPM the CV wrote; the paired
    # difference is the difference of the two arms' CPMs
    scfg = dataclasses.replace(cfg, out_dir=tmp_path / "cv" / "cv-fewlabel-scratch")
    pcfg = dataclasses.replace(scfg, out_dir=pre)
    s_cpm = froc_all(load_oof_images(scfg), n_boot=0)["mass"].cpm
    p_cpm = froc_all(load_oof_images(pcfg), n_boot=0)["mass"].cpm
    assert figures["scratch-cpm-mass"]["value"] == pytest.approx(s_cpm, abs=1e-9)
    diff = figures["pre-minus-scratch-cpm-mass"]["value"]
    assert diff == pytest.approx(p_cpm - s_cpm, abs=1e-9)
    assert figures["pre-cpm-mass"]["context"]["train_images_per_fold"] == [4, 4]


def test_command_line_overrides_are_validated_like_the_yaml(tmp_path, site_cache):
    from argparse import Namespace

    from common.errors import ConfigError
    from simulation.commands.train import apply_overrides

    cfg = _cfg(tmp_path, site_cache)

    def flags(**kw):
        base = dict(
            out=None, epochs=None, device=None, init_checkpoint=None,
            labeled_patients=None, settings=[],
        )  # fmt: skip
        return Namespace(**{**base, **kw})

    assert apply_overrides(cfg, flags()) == cfg
    got = apply_overrides(cfg, flags(epochs=3, labeled_patients=2, out=tmp_path / "o"))
    assert (got.epochs, got.labeled_patients, got.out_dir) == (3, 2, tmp_path / "o")
    assert got.model == cfg.model and got.caches == cfg.caches
    with pytest.raises(ConfigError, match=r"command-line flags: epochs: must be >= 1"):
        apply_overrides(cfg, flags(epochs=0))
    with pytest.raises(ConfigError, match=r"labeled_patients: must be >= 1, got 0"):
        apply_overrides(cfg, flags(labeled_patients=0))
    # --set: any field, validated like the file; the named flags win
    got = apply_overrides(
        cfg, flags(settings=["augment.paste_p=0.25", "epochs=4"], epochs=3)
    )
    assert (got.augment.paste_p, got.epochs) == (0.25, 3)
    assert got.model == cfg.model
    with pytest.raises(ConfigError, match=r"--set: augment.paste_p: must be <= 1"):
        apply_overrides(cfg, flags(settings=["augment.paste_p=2"]))
    with pytest.raises(ConfigError, match=r"--set: augment.pastep: unknown key"):
        apply_overrides(cfg, flags(settings=["augment.pastep=0.5"]))
