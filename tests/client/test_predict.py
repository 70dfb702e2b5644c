"""mammofed-client evaluate / predict on synthetic data: stored-space boxes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from client.cli import main as client_main
from client.predict import detections_to_stored, predict_paths, sidecar_options
from common.imaging.geometry import Geometry
from common.imaging.image_io import read_any
from common.keys import FROC_FP_RATES


def test_client_evaluate(tmp_path, site_cache, tiny_checkpoint):
    out = tmp_path / "eval"
    rc = client_main([
        "evaluate", "--checkpoint", str(tiny_checkpoint), "--cache", str(site_cache),
        "--view", "all", "--out", str(out), "--n-boot", "20",
    ])  # fmt: skip
    assert rc == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["n_images"] == 12 and doc["view"] == "all"
    mass = doc["classes"]["mass"]
    assert mass["n_lesions"] == 6 and mass["n_images"] == 12
    assert set(mass["sensitivity_at_fp"]) == {f"{f:g}" for f in FROC_FP_RATES}
    assert len(mass["cpm_ci95"]) == 2
    assert doc["classes"]["calcification"]["cpm"] is None  # no calcification
    assert (out / "froc-mass.png").is_file()
    assert (out / "froc-calcification.png").is_file()
    # a missing checkpoint is a one-line error (exit 2)
    rc = client_main([
        "evaluate", "--checkpoint", str(tmp_path / "x.pt"), "--cache",
        str(site_cache), "--out", str(out),
    ])  # fmt: skip
    assert rc == 2
    # the same model twice, fused: the same figures as the model alone
    both = tmp_path / "eval2"
    rc = client_main([
        "evaluate", "--checkpoint", str(tiny_checkpoint), "--checkpoint",
        str(tiny_checkpoint), "--cache", str(site_cache), "--view", "all",
        "--out", str(both), "--n-boot", "20",
    ])  # fmt: skip
    assert rc == 0
    doc2 = json.loads((both / "metrics.json").read_text())
    assert doc2["classes"]["mass"]["cpm"] == pytest.approx(mass["cpm"], abs=1e-3)
    assert doc2["n_images"] == 12 and (both / "froc-mass.png").is_file()
    assert doc2["checkpoint"].count(str(tiny_checkpoint)) == 2


def _right_breast_png(path: Path, rows: int = 200) -> list[float]:
    """Breast on the RIGHT of the stored image, a bright lesion; its stored box."""
    px = np.zeros((rows, 160), np.uint8)
    px[20 : rows - 20, 60:160] = 120
    px[100:120, 80:100] = 250
    Image.fromarray(px).save(path)
    return [80.0, 100.0, 100.0, 120.0]


def test_model_space_box_maps_back_for_flipped_right_image(tmp_path):
    stored_box = _right_breast_png(tmp_path / "r.png")
    im = read_any(tmp_path / "r.png", working_spacing_mm=0.4, spacing_mm=0.2)
    assert im.meta.laterality == "R" and im.geometry.flip
    model_box = im.geometry.to_model(np.array([stored_box]))[0]
    # the lesion really is there in model space (pixels and geometry agree)
    x0, y0, x1, y1 = np.round(model_box).astype(int)
    assert im.pixels[y0:y1, x0:x1].mean() > 0.9
    # mirrored: model x counts from the crop's right edge (x1 = 160), 0.5 scale
    x0s, y0s, x1s, _ = im.geometry.crop
    assert x1s == 160
    np.testing.assert_allclose(
        model_box, [(160 - 100) / 2, (100 - y0s) / 2, (160 - 80) / 2, (120 - y0s) / 2]
    )
    dets = {
        "boxes": np.array([model_box, [0.0, 0.0, 4.0, 4.0]]),
        "scores": np.array([0.9, 0.005]),
        "labels": np.array([0, 1]),
    }
    out = detections_to_stored(dets, im.geometry, score_floor=0.01)
    assert len(out) == 1 and out[0]["label"] == "mass"
    np.testing.assert_allclose(out[0]["box"], stored_box, atol=1e-3)
    # a hand-made flip: model x=0 is the crop's RIGHT edge in stored space
    g = Geometry((10, 20), (4, 0, 20, 10), True, (10, 16))
    back = detections_to_stored(
        {"boxes": np.array([[0.0, 1, 2, 3]]), "scores": np.array([1.0]),
         "labels": np.array([1])}, g)  # fmt: skip
    assert back[0]["box"] == [18.0, 1.0, 20.0, 3.0]
    assert back[0]["label"] == "calcification"


def test_predict_cli_writes_json_and_overlay(tmp_path, tiny_checkpoint):
    src = tmp_path / "in"
    src.mkdir()
    _right_breast_png(src / "r.png")
    (src / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "pred"
    res = predict_paths(tiny_checkpoint, [src], out, spacing_mm=0.2, device="cpu")
    assert [p.name for p in res.written] == ["r.json"]
    assert len(res.skipped) == 1 and "broken.png" in res.skipped[0][0]
    doc = json.loads((out / "r.json").read_text())
    assert doc["source"].endswith("r.png") and doc["sop_instance_uid"] is None
    assert doc["box_space"] == "stored" and doc["stored_shape"] == [200, 160]
    assert doc["detections"], "untrained tiny model still scores above 0.01"
    for d in doc["detections"]:
        assert d["label"] in ("mass", "calcification") and d["score"] >= 0.01
        xmin, ymin, xmax, ymax = d["box"]
        # inside the breast crop of the stored image (right part, x >= 58)
        assert 0 <= ymin <= ymax <= 200 and 50 <= xmin <= xmax <= 160
    assert (out / "r.overlay.png").read_bytes()[:4] == b"\x89PNG"
    rc = client_main([
        "predict", "--checkpoint", str(tiny_checkpoint), str(src / "r.png"),
        "--out", str(tmp_path / "p2"), "--spacing-mm", "0.2", "--score-floor", "0.5",
        "--device", "cpu",
    ])  # fmt: skip
    assert rc == 0
    doc2 = json.loads((tmp_path / "p2" / "r.json").read_text())
    assert all(d["score"] >= 0.5 for d in doc2["detections"])


@pytest.mark.parametrize("flag", ["--score-floor", "--sr-display-floor"])
@pytest.mark.parametrize("value", ["2", "-0.1", "nan", "high"])
def test_predict_refuses_a_floor_outside_0_1_by_name(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_:
        client_main(["predict", "--checkpoint", "m.pt", str(tmp_path),
                     "--out", str(tmp_path / "o"), flag, value])  # fmt: skip
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and value in err and "Traceback" not in err


def test_predict_batches_a_four_view_exam_like_single_images(tmp_path, tiny_checkpoint):
    # views of different sizes: a batch is padded to its largest image, which
    # must not change the others' findings (they were, before stop 48)
    src = tmp_path / "exam"
    src.mkdir()
    for name, rows in zip("abcde", (200, 330, 260, 200, 400), strict=True):
        _right_breast_png(src / f"{name}.png", rows)
    batched = predict_paths(
        tiny_checkpoint, [src], tmp_path / "b4", spacing_mm=0.2, device="cpu"
    )
    single = predict_paths(
        tiny_checkpoint,
        [src],
        tmp_path / "b1",
        spacing_mm=0.2,
        device="cpu",
        batch_size=1,
    )
    assert [p.name for p in batched.written] == [p.name for p in single.written]
    assert len(batched.written) == 5
    for p1, p4 in zip(single.written, batched.written, strict=True):
        d1 = json.loads(p1.read_text())["detections"]
        d4 = json.loads(p4.read_text())["detections"]
        assert len(d1) == len(d4)
        for x, y in zip(d1, d4, strict=True):
            assert x["label"] == y["label"]
            assert abs(x["score"] - y["score"]) < 1e-4
    assert "score_floor" in (tmp_path / "b4" / "resolved_config.yaml").read_text()


def test_predict_runs_several_checkpoints_together_fused(tmp_path, tiny_checkpoint):
    """Two models on one image: findings fused; a model with itself changes nothing."""
    from common.detector.checkpoint import save_checkpoint
    from common.detector.model import ModelConfig, build_detector
    from common.errors import CheckpointMismatch

    src = tmp_path / "in"
    src.mkdir()
    _right_breast_png(src / "r.png")
    one = predict_paths(tiny_checkpoint, [src], tmp_path / "one", spacing_mm=0.2)
    both = predict_paths(
        [tiny_checkpoint, tiny_checkpoint], [src], tmp_path / "both", spacing_mm=0.2
    )
    d1 = json.loads(one.written[0].read_text())["detections"]
    d2 = json.loads(both.written[0].read_text())["detections"]
    assert len(d1) == len(d2) and d1
    for x, y in zip(d1, d2, strict=True):
        assert x["label"] == y["label"] and abs(x["score"] - y["score"]) < 1e-4
        assert all(abs(a - b) < 1e-3 for a, b in zip(x["box"], y["box"], strict=True))
    # another model: one detection list, its findings from both models
    torch.manual_seed(1)
    cfg = ModelConfig(arch="tiny", working_spacing_mm=0.4)
    other = save_checkpoint(tmp_path / "other.pt", build_detector(cfg), cfg)
    rc = client_main([
        "predict", "--checkpoint", str(tiny_checkpoint), "--checkpoint", str(other),
        str(src / "r.png"), "--out", str(tmp_path / "cli"), "--spacing-mm", "0.2",
        "--device", "cpu",
    ])  # fmt: skip
    assert rc == 0
    doc = json.loads((tmp_path / "cli" / "r.json").read_text())
    assert str(other) in doc["checkpoint"] and str(tiny_checkpoint) in doc["checkpoint"]
    assert doc["detections"]
    # models at other spacings cannot be fused: refused by name
    cfg2 = ModelConfig(arch="tiny", working_spacing_mm=0.2)
    fine = save_checkpoint(tmp_path / "fine.pt", build_detector(cfg2), cfg2)
    with pytest.raises(CheckpointMismatch, match="fine.pt.*0.2 mm"):
        predict_paths([tiny_checkpoint, fine], [src], tmp_path / "x", spacing_mm=0.2)


def test_predict_reads_a_research_sites_images_csv(tmp_path, tiny_checkpoint):
    """``predict`` on a research site folder (``import-mias`` output) takes each
    image's spacing and laterality from its ``images.csv``, as ``ingest`` does,
    so the folder needs no ``--spacing-mm``; a row the table refuses leaves
    its file to the command line (here: none, so it is skipped, named)."""
    site = tmp_path / "site"
    (site / "sub").mkdir(parents=True)
    _right_breast_png(site / "r.png")
    _right_breast_png(site / "sub" / "l.png")
    _right_breast_png(site / "bad.png")
    (site / "images.csv").write_text(
        "image,patient_id,laterality,view,spacing_mm\n"
        "r.png,w1,R,MLO,0.2\n"
        "./sub/l.png,w1,L,MLO,0.4\n"
        "bad.png,w2,R,MLO,abc\n"
    )
    res = predict_paths(tiny_checkpoint, [site], tmp_path / "out", device="cpu")
    assert sorted(Path(p).name for p in res.written) == ["l.json", "r.json"]
    assert [Path(f).name for f, _ in res.skipped] == ["bad.png"]
    assert "spacing" in res.skipped[0][1]
    r = json.loads((tmp_path / "out" / "r.json").read_text())
    sub = json.loads((tmp_path / "out" / "l.json").read_text())
    # each file read with its own row: l.png's breast lies on the right, yet
    # the table's L is what it was read as (inferred, it would be R)
    assert r["laterality"] == "R" and sub["laterality"] == "L"
    opts = sidecar_options([site])
    assert opts(site / "r.png") == {
        "laterality": "R", "view": "MLO", "patient_id": "w1", "spacing_mm": 0.2
    }  # fmt: skip
    assert opts(site / "sub" / "l.png")["spacing_mm"] == 0.4
    assert opts(site / "bad.png") == {} and opts(tmp_path / "elsewhere.png") == {}
    # the command line's spacing still serves a file the table leaves out
    again = predict_paths(
        tiny_checkpoint, [site], tmp_path / "o2", device="cpu", spacing_mm=0.3
    )
    assert len(again.written) == 3 and not again.skipped


def test_predict_names_an_images_csv_it_cannot_use(tmp_path, tiny_checkpoint):
    """A research folder's images.csv without its ``image`` column stops
    predict before any model runs, naming the file; nothing is written."""
    from common.errors import MammofedError

    site = tmp_path / "site"
    site.mkdir()
    _right_breast_png(site / "r.png")
    (site / "images.csv").write_text("picture,spacing_mm\nr.png,0.2\n")
    with pytest.raises(MammofedError, match="images.csv"):
        predict_paths(tiny_checkpoint, [site], tmp_path / "out", device="cpu")
    assert not list((tmp_path / "out").glob("*.json"))
