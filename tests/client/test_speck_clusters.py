"""``model.speck_clusters`` through ingest, evaluate, predict and the export."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from client.evaluate import evaluate_checkpoint
from client.export import CheckpointMismatch, ExportError, load_detectors
from client.ingest import ingest_site
from client.onnx_export import export_onnx
from client.predict import predict_paths
from common.config.site import SiteConfig
from common.detector.checkpoint import save_checkpoint
from common.detector.model import ModelConfig, build_detector
from common.errors import MammofedError
from tests.common.imaging.test_specks import CLUSTER, _mammogram

WIDTH = 300  # _mammogram's width (stored pixels)


def _site(root: Path) -> Path:
    """Two women, one film each with the cluster (right breast), labeled."""
    root.mkdir(parents=True)
    rows, ann = [], []
    for i in range(2):
        name = f"w{i}.png"
        _mammogram(root / name, right=True, seed=i)
        rows.append([name, f"W{i}", "R", "MLO", "0.2"])
        xs = [WIDTH - 1 - x for x, _ in CLUSTER]
        ys = [y for _, y in CLUSTER]
        ann.append(
            [name, "calcification", min(xs) - 3, min(ys) - 3, max(xs) + 4, max(ys) + 4]
        )
    for path, head, body in (
        (
            root / "images.csv",
            ["image", "patient_id", "laterality", "view", "spacing_mm"],
            rows,
        ),
        (
            root / "annotations.csv",
            ["image", "finding", "xmin", "ymin", "xmax", "ymax"],
            ann,
        ),
    ):
        with path.open("w", newline="") as fh:
            csv.writer(fh).writerows([head, *body])
    return root


def _checkpoint(path: Path, *, specks: bool) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="tiny", working_spacing_mm=0.4, speck_clusters=specks)
    return save_checkpoint(path, build_detector(cfg), cfg)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return _site(tmp_path / "site")


def test_evaluate_scores_the_speck_clusters(tmp_path, site):
    cache = tmp_path / "cache"
    ingest_site(site, cache, SiteConfig(specks=True, default_spacing_mm=0.2), workers=1)
    ck = _checkpoint(tmp_path / "m.pt", specks=True)
    doc = evaluate_checkpoint(ck, cache, tmp_path / "eval", view="all", n_boot=10)
    calc = doc["classes"]["calcification"]
    assert calc["n_lesions"] == 2
    # both clusters found first: sensitivity 1 at the lowest false-positive rate
    assert calc["cpm"] == pytest.approx(1.0)
    plain = evaluate_checkpoint(
        _checkpoint(tmp_path / "p.pt", specks=False), cache, tmp_path / "e2",
        view="all", n_boot=10,
    )  # fmt: skip
    assert plain["classes"]["calcification"]["cpm"] < 1.0  # an untrained network
    # a cache ingested without specks: refused, saying what to do
    bare = tmp_path / "bare"
    ingest_site(site, bare, SiteConfig(default_spacing_mm=0.2), workers=1)
    with pytest.raises(MammofedError, match="has no specks.*'specks: true'"):
        evaluate_checkpoint(ck, bare, tmp_path / "e3", view="all", n_boot=10)


def test_predict_reports_the_cluster_in_the_files_pixels(tmp_path, site):
    ck = _checkpoint(tmp_path / "m.pt", specks=True)
    out = tmp_path / "pred"
    res = predict_paths(ck, [site / "w0.png"], out, spacing_mm=0.2, overlay=False)
    doc = json.loads(res.written[0].read_text())
    calcs = [d for d in doc["detections"] if d["label"] == "calcification"]
    assert calcs, doc["detections"][:3]
    best = max(calcs, key=lambda d: d["score"])
    x0, y0, x1, y1 = best["box"]
    xs = [WIDTH - 1 - x for x, _ in CLUSTER]  # stored: the breast is on the right
    ys = [y for _, y in CLUSTER]
    assert x0 <= np.mean(xs) <= x1 and y0 <= np.mean(ys) <= y1


def test_models_run_together_agree_and_the_export_refuses(tmp_path):
    a = _checkpoint(tmp_path / "a.pt", specks=True)
    b = _checkpoint(tmp_path / "b.pt", specks=False)
    with pytest.raises(CheckpointMismatch, match="speck_clusters"):
        load_detectors([a, b], torch.device("cpu"))
    with pytest.raises(ExportError, match="speck_clusters"):
        export_onnx(a, tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()


def test_crossval_repredicts_with_it():
    from simulation.crossval import INFERENCE_ONLY_MODEL_FIELDS

    # inference only: a finished fold is re-predicted, not retrained
    assert "speck_clusters" in INFERENCE_ONLY_MODEL_FIELDS
    assert replace(ModelConfig(), speck_clusters=True).speck_clusters


def test_a_federation_can_ask_for_it_in_its_trainer_options():
    from client.detector_trainer import DetectorOptions
    from common.detector.model.initial import detector_model_config

    assert detector_model_config({"speck_clusters": True}).speck_clusters
    assert not detector_model_config({}).speck_clusters
    assert DetectorOptions(speck_clusters=True).model_config().speck_clusters
