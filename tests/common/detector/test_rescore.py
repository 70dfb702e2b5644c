"""The second stage: mining by the hit rule, learning, re-scoring, its file."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from common.config import load_config
from common.detector.engine import predict_images
from common.detector.froc import (
    DUPLICATE,
    HIT,
    IGNORED,
    FrocImage,
    froc_class,
    match_image,
    match_image_lesions,
)
from common.detector.model import ModelConfig, build_detector
from common.detector.rescore import (
    RESCORER_FILE,
    PatchSet,
    RescoreConfig,
    RescoredDetector,
    Rescorer,
    collect_patches,
    jitter_boxes,
    load_rescorer,
    mine_image,
    rescore_detections,
    save_rescorer,
    train_rescorer,
)
from common.errors import (
    CheckpointMismatch,
    ConfigError,
    MammofedError,
    UnsafeCheckpoint,
)
from simulation.crossval import CV_METRICS_JSON, run_crossval
from simulation.train import DETECTOR_METRICS_JSON, TrainConfig, run_training
from tests.conftest import make_site_cache, write_train_yaml

SP = 0.4  # mm per pixel of the synthetic images
SIZE = 96
HALF = 8  # half side of a candidate box (px)
#: A small, quick re-scorer for the synthetic task.
QUICK = RescoreConfig(
    enabled=True,
    features="patch",
    patch=32,
    min_crop_mm=6.4,
    jitter_per_lesion=3,
    epochs=4,
    samples_per_epoch=384,
    batch_size=32,
    width=8,
)


# --- mining: exactly the hit rule -------------------------------------------


def _hand_image() -> FrocImage:
    return FrocImage(
        key="hand",
        spacing_mm=0.5,
        gt_boxes=[[10, 10, 30, 30], [60, 60, 70, 70]],
        gt_labels=[0, 1],
        ignore_boxes=[[80, 0, 100, 20]],
        det_boxes=[
            [10, 10, 30, 30],  # 0 mass on the mass: hit
            [12, 10, 32, 30],  # 1 mass on the mass again: duplicate
            [40, 80, 50, 90],  # 2 mass far away: false positive
            [85, 5, 95, 15],  # 3 mass in the ignore box: ignored
            [12, 12, 28, 28],  # 4 calcification on the mass: wrong class, FP
            [60, 60, 70, 70],  # 5 calcification on the calcification: hit
            [0, 40, 8, 48],  # 6 mass far away: false positive
        ],
        det_scores=[0.9, 0.8, 0.7, 0.6, 0.5, 0.3, 0.2],
        det_labels=[0, 0, 0, 0, 1, 1, 0],
    )


def test_mining_labels_candidates_by_the_hit_rule():
    idx, tgt = mine_image(_hand_image(), 100)
    assert idx.tolist() == [0, 2, 4, 5, 6]  # duplicate and ignored left out
    assert tgt.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    # the cap keeps the top-scoring candidates of every class together
    idx, tgt = mine_image(_hand_image(), 3)
    assert idx.tolist() == [0, 2] and tgt.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="max_candidates"):
        mine_image(_hand_image(), 0)


def test_mining_an_image_without_lesions_or_detections():
    im = FrocImage(
        key="normal", spacing_mm=0.4, det_boxes=[[0, 0, 9, 9]], det_scores=[0.5],
        det_labels=[1],
    )  # fmt: skip
    idx, tgt = mine_image(im, 10)
    assert idx.tolist() == [0] and tgt.tolist() == [0.0]
    idx, tgt = mine_image(FrocImage(key="empty", spacing_mm=0.4), 10)
    assert len(idx) == len(tgt) == 0


@pytest.mark.parametrize("seed", range(5))
def test_mining_agrees_with_the_evaluation_on_random_images(seed):
    rng = np.random.default_rng(seed)

    def boxes(n: int) -> np.ndarray:
        xy = rng.uniform(0, 80, (n, 2))
        wh = rng.uniform(4, 30, (n, 2))
        return np.concatenate([xy, xy + wh], axis=1)

    n_gt, n_det = int(rng.integers(0, 4)), int(rng.integers(1, 40))
    im = FrocImage(
        key=f"r{seed}",
        spacing_mm=float(rng.uniform(0.1, 0.6)),
        gt_boxes=boxes(n_gt),
        gt_labels=rng.integers(0, 2, n_gt),
        ignore_boxes=boxes(1),
        det_boxes=boxes(n_det),
        det_scores=rng.choice([0.2, 0.4, 0.6, 0.8], n_det),  # ties too
        det_labels=rng.integers(0, 2, n_det),
    )
    expect = np.full(n_det, -1)
    for label in (0, 1):
        where = np.nonzero(im.det_labels == label)[0]
        expect[where] = match_image_lesions(im, label)[1]
    idx, tgt = mine_image(im, n_det)
    assert np.array_equal(tgt, (expect[idx] == HIT).astype(np.float32))
    left_out = np.setdiff1d(np.arange(n_det), idx)
    assert np.isin(expect[left_out], (DUPLICATE, IGNORED)).all()
    assert np.all(np.diff(im.det_scores[idx]) <= 0)  # by decreasing score


def test_jittered_lesion_boxes_still_hit_their_lesion():
    gt = np.array([[10.0, 20.0, 40.0, 35.0], [50.0, 50.0, 53.0, 54.0]])
    jit = jitter_boxes(gt, 25, np.random.default_rng(0))
    assert jit.shape == (50, 4)
    assert not np.allclose(jit[:25], gt[0])  # really jittered
    for j, box in enumerate(jit):
        im = FrocImage(
            key="j", spacing_mm=0.1, gt_boxes=gt[j // 25][None], gt_labels=[0],
            det_boxes=box[None], det_scores=[0.5], det_labels=[0],
        )  # fmt: skip
        assert match_image(im, 0)[1].tolist() == [HIT]


# --- a synthetic task: lesions are blobs, false positives a texture ---------


def _task(seed: int, n_images: int):
    """Images with one bright blob (lesion) and two striped patches (FPs).

    The detections rank the FPs above the lesion in most images.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    images, frocs = [], []
    for i in range(n_images):
        px = 0.2 + 0.05 * rng.standard_normal((SIZE, SIZE))
        centres = rng.permutation([(20, 20), (20, 70), (70, 20), (70, 70)])[:3]
        centres = centres + rng.integers(-4, 5, (3, 2))
        (lx, ly), fps = centres[0], centres[1:]
        px += 0.5 * np.exp(-((xx - lx) ** 2 + (yy - ly) ** 2) / (2 * 4.0**2))
        for fx, fy in fps:
            region = (abs(xx - fx) <= 6) & (abs(yy - fy) <= 6)
            px[region] += np.where(xx[region] % 2 == 0, 0.5, 0.0)
        images.append(torch.from_numpy(np.clip(px, 0, 1).astype(np.float32))[None])
        boxes = [[x - HALF, y - HALF, x + HALF, y + HALF] for x, y in centres]
        frocs.append(
            FrocImage(
                key=f"s{seed}-{i}",
                spacing_mm=SP,
                gt_boxes=[boxes[0]],
                gt_labels=[0],
                det_boxes=boxes,
                det_scores=[rng.uniform(0.2, 0.5), *rng.uniform(0.4, 0.9, 2)],
                det_labels=[0, 0, 0],
            )
        )
    return images, frocs


def _auc(scores: np.ndarray, targets: np.ndarray) -> float:
    pos, neg = scores[targets == 1], scores[targets == 0]
    return float(
        (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    )


@pytest.fixture(scope="module")
def patches() -> PatchSet:
    images, frocs = _task(0, 24)
    ps = collect_patches(images, frocs, QUICK)
    assert ps.n_candidates_hit == 24 and ps.n_candidates_fp == 48
    assert ps.n_jittered == 24 * QUICK.jitter_per_lesion
    return ps


@pytest.fixture(scope="module")
def trained(patches: PatchSet) -> Rescorer:
    return train_rescorer(patches, QUICK, SP)


def _held_out_auc(rescorer: Rescorer) -> float:
    images, frocs = _task(1, 16)
    probs, targets = [], []
    with torch.no_grad():
        for im, f in zip(images, frocs, strict=True):
            box = torch.as_tensor(f.det_boxes).float()
            probs.extend(rescorer(im, box, torch.zeros(3).long()).tolist())
            targets.extend([1, 0, 0])
    return _auc(np.array(probs), np.array(targets))


def test_a_quickly_trained_rescorer_ranks_lesions_above_false_positives(
    trained, patches
):
    assert _held_out_auc(trained) > 0.8
    # control: the same start taught the opposite labels ranks the other way,
    # so the ranking is learned, not the luck of the initialisation
    swapped = dataclasses.replace(patches, targets=1 - patches.targets)
    assert _held_out_auc(train_rescorer(swapped, QUICK, SP)) < 0.2


def test_rescoring_raises_cpm_on_held_out_images(trained):
    images, frocs = _task(2, 16)
    dets = [
        {"boxes": f.det_boxes, "scores": f.det_scores, "labels": f.det_labels}
        for f in frocs
    ]
    new = rescore_detections(trained, images, dets)
    after = [
        FrocImage(
            key=f.key,
            spacing_mm=SP,
            gt_boxes=f.gt_boxes,
            gt_labels=f.gt_labels,
            det_boxes=d["boxes"],
            det_scores=d["scores"],
            det_labels=d["labels"],
        )
        for f, d in zip(frocs, new, strict=True)
    ]
    before = froc_class(frocs, 0).cpm
    assert before < 0.8  # the task is hard for the first stage
    assert froc_class(after, 0).cpm > before + 0.1
    for d in new:  # sorted high to low, the boxes are the detector's
        assert np.all(np.diff(d["scores"]) <= 0) and len(d["boxes"]) == 3


def test_training_is_deterministic_and_needs_both_kinds(trained, patches):
    images, frocs = _task(0, 24)
    assert torch.equal(collect_patches(images, frocs, QUICK).context, patches.context)
    again = train_rescorer(patches, QUICK, SP)
    for a, b in zip(
        trained.net.state_dict().values(), again.net.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    no_fp = [FrocImage(key=f.key, spacing_mm=SP, gt_boxes=f.gt_boxes,
                       gt_labels=f.gt_labels) for f in frocs]  # fmt: skip
    with pytest.raises(MammofedError, match="nothing to learn from"):
        train_rescorer(collect_patches(images, no_fp, QUICK), QUICK, SP)
    with pytest.raises(ValueError, match="no pixels for image 1"):
        collect_patches(images[:1], frocs[:2], QUICK)


# --- the detector-feature variant and the wrapper ---------------------------


@pytest.fixture(scope="module")
def tiny_detector() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector(ModelConfig(arch="tiny", working_spacing_mm=SP)).eval()


def test_detector_features_learn_and_wrap_the_detector(tiny_detector, tmp_path):
    cfg = dataclasses.replace(QUICK, features="detector")
    images, frocs = _task(0, 24)
    r = train_rescorer(
        collect_patches(images, frocs, cfg), cfg, SP, detector=tiny_detector
    )
    assert r.extractor is not None and r.detector_sha256
    assert _held_out_auc(r) > 0.8  # a head on (here untrained) detector features
    before = [p.detach().clone() for p in tiny_detector.parameters()]
    wrapped = RescoredDetector(tiny_detector, r).eval()
    out = wrapped(images[:2])
    plain = predict_images(tiny_detector, images[:2], amp=False)
    expect = rescore_detections(r, images[:2], plain)
    for o, e in zip(out, expect, strict=True):
        assert np.allclose(o["scores"].numpy(), e["scores"], atol=1e-6)
        assert np.allclose(o["boxes"].numpy(), e["boxes"], atol=1e-4)
    # the detector's weights are untouched, and training mode is refused
    for a, b in zip(before, tiny_detector.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="inference-only"):
        wrapped.train()(images[:1])
    # saved and reloaded with its detector: the same probabilities
    path = save_rescorer(tmp_path / "r.pt", r)
    again = load_rescorer(path, tiny_detector)
    box = torch.as_tensor(frocs[0].det_boxes).float()
    assert torch.equal(r(images[0], box, torch.zeros(3).long()),
                       again(images[0], box, torch.zeros(3).long()))  # fmt: skip
    with pytest.raises(ValueError, match="needs it"):
        load_rescorer(path)
    torch.manual_seed(1)
    other = build_detector(ModelConfig(arch="tiny", working_spacing_mm=SP))
    with pytest.raises(CheckpointMismatch, match=r"r\.pt.*detector_sha256"):
        load_rescorer(path, other)
    with pytest.raises(ValueError, match="another detector"):
        RescoredDetector(other, again)


# --- the file: reloads exactly, refuses what it must ------------------------


def test_a_saved_rescorer_reloads_to_identical_outputs(trained, tmp_path):
    path = save_rescorer(tmp_path / RESCORER_FILE, trained)
    again = load_rescorer(path)
    assert again.cfg == trained.cfg and again.spacing_mm == SP
    images, frocs = _task(3, 4)
    for im, f in zip(images, frocs, strict=True):
        box = torch.as_tensor(f.det_boxes).float()
        lab = torch.tensor([0, 1, 0])
        assert torch.equal(trained(im, box, lab), again(im, box, lab))


class _Payload:
    """Unpickling this calls ``Path(marker).touch()``: stands for any command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _tampered(trained, tmp_path: Path, **changes) -> Path:
    good = save_rescorer(tmp_path / "good.pt", trained)
    payload = torch.load(good, weights_only=True)
    for key, value in changes.items():
        if key == "state_dict":
            payload["state_dict"].update(value)
        else:
            payload[key] = value
    p = tmp_path / "bad.pt"
    torch.save(payload, p)
    return p


def test_a_crafted_pickle_is_refused_without_running(trained, tmp_path):
    marker = tmp_path / "PWNED"
    p = _tampered(trained, tmp_path, stats={"note": _Payload(marker)})
    with pytest.raises(UnsafeCheckpoint, match=r"bad\.pt: refused"):
        load_rescorer(p)
    assert not marker.exists()


def test_corrupt_and_foreign_files_are_refused_naming_the_file(trained, tmp_path):
    good = save_rescorer(tmp_path / "good.pt", trained)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointMismatch, match=r"cut\.pt: not a readable"):
        load_rescorer(cut)
    with pytest.raises(CheckpointMismatch, match=r"nope\.pt: .*does not exist"):
        load_rescorer(tmp_path / "nope.pt")
    cases = {
        r"field 'format'": {"format": "mammofed-detector/1"},
        r"field 'classes'": {"classes": ["mass"]},
        r"config\.patch: must be >= 16": {"config": {"patch": 3}},
        r"field 'spacing_mm'": {"spacing_mm": -1.0},
        r"non-finite values in 'head\.0\.bias'": {
            "state_dict": {"head.0.bias": torch.full((32,), float("nan"))}
        },
        r"does not fit": {"state_dict": {"head.0.bias": torch.zeros(5)}},
        r"unexpected \['extra'\]": {"state_dict": {"extra": torch.zeros(1)}},
    }
    for message, change in cases.items():
        with pytest.raises(CheckpointMismatch, match=rf"bad\.pt.*{message}"):
            load_rescorer(_tampered(trained, tmp_path, **change))


# --- configuration and the training runs ------------------------------------


def test_only_the_chosen_classes_are_rescored(trained):
    images, frocs = _task(2, 4)
    dets = [
        {"boxes": f.det_boxes, "scores": f.det_scores, "labels": np.array([0, 1, 1])}
        for f in frocs
    ]
    both = rescore_detections(trained, images, dets)
    cfg = trained.cfg
    try:
        trained.cfg = dataclasses.replace(cfg, classes=("mass",))
        mass_only = rescore_detections(trained, images, dets)
    finally:
        trained.cfg = cfg

    def by_box(d):
        return {
            tuple(np.round(b, 3)): (int(lab), float(sc))
            for b, sc, lab in zip(d["boxes"], d["scores"], d["labels"], strict=True)
        }

    changed = 0
    for d, b, m in zip(dets, both, mass_only, strict=True):
        old, new_all, new_mass = by_box(d), by_box(b), by_box(m)
        for box, (label, score) in new_mass.items():
            if label == 0:  # re-scored as with every class
                assert score == pytest.approx(new_all[box][1])
            else:  # the detector's score, untouched
                assert score == pytest.approx(old[box][1])
                changed += new_all[box][1] != pytest.approx(score)
        assert np.all(np.diff(m["scores"]) <= 0)
    assert changed > 0  # the calcifications would have moved
    with pytest.raises(ValueError, match="classes: give one or more"):
        RescoreConfig(classes=("cyst",))


def test_the_rescore_section_is_validated_with_its_key(tmp_path, site_cache):
    p = write_train_yaml(tmp_path, [site_cache], rescore={"enabled": True, "patch": 8})
    with pytest.raises(ConfigError, match=r"train\.yaml: rescore\.patch"):
        load_config(p, TrainConfig)
    p = write_train_yaml(tmp_path, [site_cache], rescore={"features": "pixels"})
    with pytest.raises(ConfigError, match=r"rescore\.features"):
        load_config(p, TrainConfig)
    cfg = load_config(write_train_yaml(tmp_path, [site_cache]), TrainConfig)
    assert cfg.rescore.enabled is False  # off unless asked for


_RUN_RESCORE = {"enabled": True, "epochs": 1, "samples_per_epoch": 64,
                "batch_size": 16, "patch": 32}  # fmt: skip


def test_train_trains_and_applies_the_rescorer(tmp_path, site_cache):
    p = write_train_yaml(tmp_path, [site_cache], rescore=_RUN_RESCORE)
    results = run_training(load_config(p, TrainConfig))
    run = tmp_path / "run"
    assert (run / RESCORER_FILE).is_file()
    detector_only = json.loads((run / DETECTOR_METRICS_JSON).read_text())
    assert set(detector_only) == set(results) == {"siteA"}
    assert yaml.safe_load((run / "resolved_config.yaml").read_text())["rescore"][
        "enabled"
    ]


def test_crossval_trains_a_rescorer_per_fold_and_reuses_it(tmp_path, caplog):
    cache = make_site_cache(tmp_path / "siteA", n_patients=4)
    p = write_train_yaml(
        tmp_path, [cache], out_dir=str(tmp_path / "cv"), n_boot=10,
        test_fraction=0.0, rescore=_RUN_RESCORE,
    )  # fmt: skip
    cfg = load_config(p, TrainConfig)
    doc = run_crossval(cfg, k=2)
    for f in range(2):
        assert (tmp_path / "cv" / f"fold-{f}" / RESCORER_FILE).is_file()
        assert set(doc["folds"][f]["cpm_detector"]) == {"mass", "calcification"}
    assert doc["detector_only"]["mass"]["n_lesions"] == 4
    assert set(doc["rescore_gain"]["mass"]) == {"diff", "ci95"}
    assert "ema_gain" not in doc  # no EMA, no second arm
    assert not (tmp_path / "cv" / "oof_predictions-student.json").exists()
    # the detector alone's out-of-fold images are kept, and score as reported
    from benchmarks.ensemble import load_oof
    from common.detector.froc import froc_all
    from simulation.crossval import OOF_DETECTOR_JSON

    alone = load_oof(tmp_path / "cv" / OOF_DETECTOR_JSON)
    assert len(alone) == doc["n_images"]
    cpm = froc_all(alone, n_boot=0)["mass"].cpm
    assert cpm == pytest.approx(doc["detector_only"]["mass"]["cpm"])
    with caplog.at_level(logging.INFO, logger="common.detector.rescore"):
        again = run_crossval(cfg, k=2)
    assert "reusing" in caplog.text
    saved = json.loads((tmp_path / "cv" / CV_METRICS_JSON).read_text())
    assert again["metrics"] == doc["metrics"] == saved["metrics"]
