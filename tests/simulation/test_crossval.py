"""mammofed-sim crossval: patient-level k-fold CV on a tiny synthetic cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.ensemble import load_oof
from common.detector.froc import froc_all
from common.imaging.data import SiteDataset
from common.keys import CLASSES
from simulation.cli import main as sim_main
from simulation.crossval import (
    CV_METRICS_JSON,
    OOF_PREDICTIONS_JSON,
    OOF_STUDENT_JSON,
    make_folds,
)
from simulation.train import TrainConfig
from tests.conftest import make_site_cache, write_train_yaml


def _cv_yaml(tmp_path: Path, caches: list[Path]) -> Path:
    return write_train_yaml(
        tmp_path, caches, out_dir=str(tmp_path / "cv"), n_boot=20,
        test_fraction=0.0, ema_decay=0.9,
    )  # fmt: skip


def test_folds_are_patient_grouped_and_cover_every_image(tmp_path):
    caches = [
        make_site_cache(tmp_path / "siteA", n_patients=4),
        make_site_cache(tmp_path / "siteB", n_patients=3),
    ]
    sites = {c.name: SiteDataset(c, test_fraction=0.0) for c in caches}
    folds = make_folds(sites, 2, seed=0)
    for name, s in sites.items():
        seen: list[int] = []
        for fold in folds:
            tr, val = fold.parts[name]
            tr_p = {s.records[i].patient_id for i in tr}
            val_p = {s.records[i].patient_id for i in val}
            assert tr_p and val_p and not tr_p & val_p
            seen.extend(val)
        box_labeled = [i for i, r in enumerate(s.records) if r.box_labeled]
        assert sorted(seen) == box_labeled  # each image validated exactly once


def test_crossval_cli_writes_metrics_and_is_deterministic(tmp_path, capsys):
    caches = [
        make_site_cache(tmp_path / "siteA", n_patients=4),
        make_site_cache(tmp_path / "siteB", n_patients=2),
    ]
    cfg = _cv_yaml(tmp_path, caches)
    out1, out2 = tmp_path / "r1", tmp_path / "r2"
    argv = ["crossval", "--config", str(cfg), "--folds", "2"]
    assert sim_main([*argv, "--out", str(out1)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["k"] == 2 and set(line["classes"]) == set(CLASSES)

    doc = json.loads((out1 / CV_METRICS_JSON).read_text())
    for key in ("k", "seed", "fold_seed", "config", "classes", "folds", "metrics"):
        assert key in doc
    assert doc["k"] == 2 and doc["n_images"] == 12 and doc["n_patients"] == 6
    for name in CLASSES:
        c = doc["classes"][name]
        for key in ("cpm", "cpm_ci95", "sensitivity_at_fp", "ap", "n_lesions"):
            assert key in c
        assert len(c["fold_cpm"]) == 2
        assert (out1 / f"froc-{name}.png").is_file()
    assert doc["classes"][CLASSES[0]]["n_lesions"] == 6  # one mass per patient
    assert doc["classes"][CLASSES[0]]["cpm"] is not None
    assert doc["config"]["epochs"] == 1
    assert (out1 / "resolved_config.yaml").is_file()

    # out-of-fold predictions: every box-labeled image exactly once
    oof = json.loads((out1 / OOF_PREDICTIONS_JSON).read_text())
    keys = [o["key"] for o in oof]
    expected = sorted(
        f"{c.name}/{r.key}"
        for c in caches
        for r in SiteDataset(c, test_fraction=0.0).records
    )
    assert sorted(keys) == expected and len(set(keys)) == len(keys)

    # no patient in both parts of a fold; per-fold logs
    for f, fd in enumerate(doc["folds"]):
        fdir = out1 / f"fold-{f}"
        assert (fdir / "epochs.jsonl").is_file() and (fdir / "train.log").is_file()
        fold_info = json.loads((fdir / "fold.json").read_text())
        assert fold_info["val_patients"] == fd["val_patients"]
        val_keys = set(fold_info["val_keys"])
        assert {o["key"] for o in oof if o["fold"] == f} == val_keys
    val_sets = [set(fd["val_patients"]) for fd in doc["folds"]]
    assert not val_sets[0] & val_sets[1] and len(val_sets[0] | val_sets[1]) == 6

    assert sim_main([*argv, "--out", str(out2)]) == 0
    doc2 = json.loads((out2 / CV_METRICS_JSON).read_text())
    for name in CLASSES:
        assert doc2["classes"][name]["cpm"] == doc["classes"][name]["cpm"]
        assert doc2["classes"][name]["fold_cpm"] == doc["classes"][name]["fold_cpm"]
    assert doc2["metrics"] == doc["metrics"]

    # with an EMA (ema_decay 0.9 here) the EMA is scored, and the trained
    # weights themselves predict the same images: a paired gain from one run
    student = load_oof(out1 / OOF_STUDENT_JSON)
    assert sorted(im.key for im in student) == expected
    s_cpm = froc_all(student, n_boot=0)
    ema_cpm = froc_all(load_oof(out1 / OOF_PREDICTIONS_JSON), n_boot=0)
    mass = CLASSES[0]  # the tiny cache has no calcification cluster
    assert doc["student_only"][mass]["cpm"] == pytest.approx(s_cpm[mass].cpm)
    gain = doc["ema_gain"][mass]
    assert gain["diff"] == pytest.approx(ema_cpm[mass].cpm - s_cpm[mass].cpm)
    assert gain["ci95"][0] <= gain["diff"] <= gain["ci95"][1]
    assert set(doc["ema_gain"]) == set(CLASSES)
    assert all(set(f["cpm_student"]) == set(CLASSES) for f in doc["folds"])
    # one epoch of a 0.9-decay EMA is not the student: the two arms differ
    scores = {im.key: im.det_scores for im in load_oof(out1 / OOF_PREDICTIONS_JSON)}
    assert any(not np.array_equal(im.det_scores, scores[im.key]) for im in student)

    # a rerun into the same folder resumes the finished folds (no retraining)
    assert sim_main([*argv, "--out", str(out1)]) == 0
    doc3 = json.loads((out1 / CV_METRICS_JSON).read_text())
    assert doc3["metrics"] == doc["metrics"]
    assert doc3["ema_gain"] == doc["ema_gain"]  # the student is restored too
    assert len((out1 / "fold-0" / "epochs.jsonl").read_text().splitlines()) == 1


def test_only_folds_split_work_then_pool_matches_one_run(tmp_path, capsys):
    caches = [make_site_cache(tmp_path / "siteA", n_patients=4)]
    cfg = _cv_yaml(tmp_path, caches)
    argv = ["crossval", "--config", str(cfg), "--folds", "2"]
    one, split = tmp_path / "one", tmp_path / "split"
    assert sim_main([*argv, "--out", str(one)]) == 0
    # two "processes": fold 1 first, then fold 0, then the pooling run
    assert sim_main([*argv, "--out", str(split), "--only-folds", "1"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["partial"] is True and [f["fold"] for f in line["folds"]] == [1]
    assert not (split / CV_METRICS_JSON).exists()
    assert not (split / "fold-0").exists()
    assert sim_main([*argv, "--out", str(split), "--only-folds", "0"]) == 0
    assert sim_main([*argv, "--out", str(split)]) == 0
    a = json.loads((one / CV_METRICS_JSON).read_text())
    b = json.loads((split / CV_METRICS_JSON).read_text())
    assert a["metrics"] == b["metrics"]
    for f in (0, 1):  # the pooling run trained nothing again
        epochs = (split / f"fold-{f}" / "epochs.jsonl").read_text().splitlines()
        assert len(epochs) == 1
    assert sim_main([*argv, "--out", str(split), "--only-folds", "2"]) == 2
    assert "no fold [2]" in capsys.readouterr().err
    # a part run with another recipe (--set, or an edited config) is not pooled
    assert sim_main([*argv, "--out", str(split), "--set", "lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "fold-0: holds a run of a different fold or recipe (recipe.lr differs" in err
    # settings that do not change what a fold trains may differ
    assert sim_main([*argv, "--out", str(split), "--set", "n_boot=7"]) == 0
    # nor does an inference-only model field: the finished folds are re-predicted
    assert (
        sim_main([*argv, "--out", str(split), "--set", "model.breast_mask=true"]) == 0
    )
    assert json.loads((split / CV_METRICS_JSON).read_text())["config"]["model"][
        "breast_mask"
    ]
    for f in (0, 1):
        epochs = (split / f"fold-{f}" / "epochs.jsonl").read_text().splitlines()
        assert len(epochs) == 1
    # a fold.json written before folds recorded their recipe: the fold is checked
    fj = split / "fold-0" / "fold.json"
    old = json.loads(fj.read_text())
    del old["recipe"]
    fj.write_text(json.dumps(old))
    assert sim_main([*argv, "--out", str(split)]) == 0
    assert "recipe" in json.loads(fj.read_text())


def test_crossval_too_many_folds_is_a_clear_error(tmp_path, capsys):
    cache = make_site_cache(tmp_path / "siteA", n_patients=2)
    cfg = _cv_yaml(tmp_path, [cache])
    assert sim_main(["crossval", "--config", str(cfg), "--folds", "3"]) == 2
    assert "siteA" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "arch"),
    [
        ("real/mini-mias-cv.yaml", "small"),
        ("real/mini-mias-native-cv.yaml", "small"),
        ("real/mini-mias.yaml", "small"),
        ("real/mini-mias-cv-gpu.yaml", "resnet18"),
        ("real/mini-mias-gpu.yaml", "resnet18"),
    ],
)
def test_shipped_cv_configs_validate(tmp_path, site_cache, name, arch):
    from common.config import from_mapping, load_yaml

    repo = Path(__file__).resolve().parents[2]
    data = load_yaml(repo / "configs" / name)
    data["caches"] = [str(site_cache)]
    cfg = from_mapping(data, TrainConfig, source=name, base_dir=tmp_path)
    assert cfg.test_fraction == 0.0
    assert cfg.model.arch == arch


@pytest.mark.parametrize(
    "name",
    ["real/mini-mias-native-cv.yaml", "real/mini-mias.yaml",
     "real/mini-mias-cv-gpu.yaml", "real/mini-mias-gpu.yaml"],
)  # fmt: skip
def test_every_mias_config_uses_the_lesion_recipe(name):
    """The CPU recipe's parts (docs/detector.md) are in every shipped variant."""
    from common.config import load_yaml

    repo = Path(__file__).resolve().parents[2]
    ref = load_yaml(repo / "configs" / "real" / "mini-mias-cv.yaml")
    data = load_yaml(repo / "configs" / name)
    assert data["model"]["speck_channel"] == ref["model"]["speck_channel"] is True
    for key in ("paste", "min_box_mm"):
        assert data["augment"][key] == ref["augment"][key], key


def test_train_with_empty_test_view_warns_and_writes_no_metrics(tmp_path, caplog):
    cache = make_site_cache(tmp_path / "siteA", n_patients=2)
    cfg = _cv_yaml(tmp_path, [cache])
    with caplog.at_level("WARNING"):
        assert (
            sim_main(["train", "--config", str(cfg), "--out", str(tmp_path / "t")]) == 0
        )
    assert "empty test view" in caplog.text
    assert json.loads((tmp_path / "t" / "metrics.json").read_text()) == {"siteA": None}
    assert (tmp_path / "t" / "final.pt").is_file()


def test_speck_clusters_replace_the_out_of_fold_calcifications(tmp_path, capsys):
    from common.imaging.cache import SiteCache
    from common.imaging.specks import speck_clusters

    cache = make_site_cache(tmp_path / "siteA", n_patients=4)
    cfg = _cv_yaml(tmp_path, [cache])
    argv = [
        "crossval",
        "--config",
        str(cfg),
        "--folds",
        "2",
        "--out",
        str(tmp_path / "o"),
    ]
    argv += ["--set", "model.speck_clusters=true"]
    # a cache ingested without specks: a clear error naming what to do, before
    # any fold trains
    assert sim_main(argv) == 2
    assert "has no specks" in capsys.readouterr().err
    assert not (tmp_path / "o" / "fold-0" / "epochs.jsonl").exists()
    c = SiteCache(cache)
    specks = np.array(
        [[20, 20, 9], [21, 22, 8], [23, 20, 7]]
        + [[5, 5 + 3 * i, 4] for i in range(12)],
        np.float32,
    )
    for k in c.keys():
        np.save(c.specks_path(k), specks)
    assert sim_main(argv) == 0
    want_boxes, want_scores = speck_clusters(specks, 0.4)
    for im in load_oof(tmp_path / "o" / OOF_PREDICTIONS_JSON):
        calc = im.det_labels == CLASSES.index("calcification")
        np.testing.assert_allclose(im.det_boxes[calc], want_boxes, atol=0.01)
        np.testing.assert_allclose(np.sort(im.det_scores[calc]), np.sort(want_scores))
