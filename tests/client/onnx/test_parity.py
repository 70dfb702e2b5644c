"""onnxruntime gives the torch model's detections (stored pixels), within tolerance."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms

from client.export import ExportError
from client.model_card import ModelIntegrityError, card_paths
from client.onnx_export import (
    BOX_TOL_STORED_PX,
    SCORE_TOL,
    HeadGraph,
    OnnxDetector,
    Postprocess,
    compare_detections,
    contract_path,
    export_onnx,
    postprocess,
)
from client.predict import predict_paths
from common.detector.adapt.standardize import HistogramStandardizer
from common.detector.checkpoint import load_model
from common.detector.engine import predict_images
from common.errors import CheckpointMismatch
from common.fileio import sha256_file
from common.keys import CLASSES

FLOOR = 0.05


def flatten_like_head(outs: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """:class:`HeadGraph` outputs in ``FCOSHead``'s layout ``[N, HW, K]``."""
    keys = ("cls_logits", "bbox_regression", "bbox_ctrness")
    flat: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    for i, t in enumerate(outs):
        n, k = t.shape[:2]
        flat[keys[i % 3]].append(t.permute(0, 2, 3, 1).reshape(n, -1, k))
    return {k: torch.cat(v, dim=1) for k, v in flat.items()}


def _torch_records(ck: Path, files: list[Path], out: Path, **kw) -> list[dict]:
    res = predict_paths(
        ck, files, out, score_floor=FLOOR, device="cpu", overlay=False, **kw
    )
    assert not res.skipped, res.skipped
    return [json.loads(p.read_text()) for p in res.written]


def _assert_parity(torch_docs: list[dict], onnx_docs: list[dict]) -> int:
    assert [d["source"] for d in torch_docs] == [d["source"] for d in onnx_docs]
    total = 0
    for t, o in zip(torch_docs, onnx_docs, strict=True):
        assert t["stored_shape"] == o["stored_shape"]
        par = compare_detections(t["detections"], o["detections"])
        assert par.within(BOX_TOL_STORED_PX, SCORE_TOL), (t["source"], par)
        total += par.n_a
    return total


def test_head_graph_is_the_torchvision_head(make_checkpoint):
    """The graph's per-level outputs, re-flattened, equal FCOSHead's exactly."""
    model, _ = load_model(make_checkpoint())
    x = torch.rand(2, 1, 96, 128)
    with torch.no_grad():
        feats = list(model.backbone((x - 0.5) / 0.25).values())
        want = model.head(feats)
        got = flatten_like_head(HeadGraph(model)(x))
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_synthetic_exam_parity(make_checkpoint, write_exam, tmp_path):
    """A four-view exam (both sides: the flip path; four sizes: the padding)."""
    ck = make_checkpoint()
    exp = export_onnx(ck, tmp_path / "out" / "model.onnx")
    files = write_exam()
    want = _torch_records(ck, files, tmp_path / "torch")
    got = OnnxDetector(exp.onnx, threads=2).with_score_floor(FLOOR).predict_files(files)
    assert _assert_parity(want, got) > 40  # the test compares real detections
    right = [d for d in got if d["laterality"] == "R"]
    assert right and all(d["detections"] for d in right)


@pytest.mark.parametrize("speck", [False, True], ids=["plain", "speck-channel"])
def test_model_space_parity_on_odd_sizes(make_checkpoint, tmp_path, speck):
    """Sizes not divisible by 32, one batch: raw model-space outputs agree.

    With the speck channel the top-hat (max-pools) is inside the graph.
    """
    ck = make_checkpoint(score_thresh=0.02, speck_channel=speck)
    exp = export_onnx(ck, tmp_path / "m.onnx")
    model, _ = load_model(ck)
    rng = np.random.default_rng(0)
    ims = [rng.random((150 + 7 * i, 100 + 13 * i)).astype(np.float32) for i in range(3)]
    want = predict_images(model, [torch.from_numpy(x)[None] for x in ims], "cpu")
    got = OnnxDetector(exp.onnx).detect(ims)
    for w, g in zip(want, got, strict=True):
        assert len(w["scores"]) == len(g["scores"]) == 100
        np.testing.assert_array_equal(w["labels"], g["labels"])
        np.testing.assert_allclose(g["scores"], w["scores"], atol=SCORE_TOL)
        np.testing.assert_allclose(g["boxes"], w["boxes"], atol=0.05)


def test_runner_findings_do_not_depend_on_the_batch(make_checkpoint, tmp_path):
    """An image alone and beside a larger one: the same findings.

    Padding it to the larger image's size would change its scores (the head's
    GroupNorm sees the padded map), so the runner batches by padded size.
    """
    exp = export_onnx(make_checkpoint(score_thresh=0.02), tmp_path / "m.onnx")
    runner = OnnxDetector(exp.onnx)
    rng = np.random.default_rng(1)
    small = rng.random((150, 100)).astype(np.float32)
    large = rng.random((260, 230)).astype(np.float32)
    same = rng.random((140, 97)).astype(np.float32)  # pads to small's 160 x 128
    alone = runner.detect([small])[0]
    batched = runner.detect([large, small, same])
    for got, want in ((batched[1], alone), (batched[2], runner.detect([same])[0])):
        order_g, order_w = np.lexsort(got["boxes"].T), np.lexsort(want["boxes"].T)
        np.testing.assert_array_equal(got["labels"][order_g], want["labels"][order_w])
        np.testing.assert_allclose(
            got["scores"][order_g], want["scores"][order_w], atol=1e-6
        )
        np.testing.assert_allclose(
            got["boxes"][order_g], want["boxes"][order_w], atol=1e-3
        )
    assert len(batched[0]["scores"]) > 0


def test_breast_mask_travels_in_the_contract(make_checkpoint, write_exam, tmp_path):
    """The mask at inference, in torch and onnxruntime alike; it drops something."""
    files = write_exam()
    plain = make_checkpoint("plain.pt")
    masked = make_checkpoint("mask.pt", breast_mask=True)
    exp = export_onnx(masked, tmp_path / "mask.onnx")
    assert json.loads(exp.contract.read_text())["postprocessing"]["breast_mask"]
    got = OnnxDetector(exp.onnx).with_score_floor(FLOOR).predict_files(files)
    _assert_parity(_torch_records(masked, files, tmp_path / "t"), got)
    unmasked = _torch_records(plain, files, tmp_path / "p")
    kept = sum(len(d["detections"]) for d in got)
    assert 0 < kept < sum(len(d["detections"]) for d in unmasked)
    # a reader of format 1 must not skip the step: the masked contract is format 2
    doc = json.loads(exp.contract.read_text())
    assert doc["format"] == "mammofed-onnx-contract/2"
    assert json.loads(card_paths(exp.onnx)[0].read_text())["model"]["breast_mask"]
    # a contract whose format and step disagree is refused by name (card re-signed)
    doc["format"] = "mammofed-onnx-contract/1"
    exp.contract.write_text(json.dumps(doc))
    card_json = card_paths(exp.onnx)[0]
    card = json.loads(card_json.read_text())
    for f in card["files"]:
        if f["name"] == exp.contract.name:
            f["sha256"] = sha256_file(exp.contract)
            f["bytes"] = exp.contract.stat().st_size
    card_json.write_text(json.dumps(card))
    with pytest.raises(ExportError, match=r"postprocessing\.breast_mask is True"):
        OnnxDetector(exp.onnx)


def test_standardizer_travels_in_the_contract(make_checkpoint, write_exam, tmp_path):
    """A site standardizer in the checkpoint is applied by both runtimes alike."""
    std = HistogramStandardizer((5.0, 50.0, 95.0), (0.3, 0.5, 0.7), (0.1, 0.6, 0.9),
                                0.05, 3)  # fmt: skip
    ck = make_checkpoint(extra={"standardizer": std.to_dict()})
    exp = export_onnx(ck, tmp_path / "std.onnx")
    contract = json.loads(exp.contract.read_text())
    assert contract["preprocessing"]["standardizer"]["landmarks"] == [0.3, 0.5, 0.7]
    files = write_exam()
    det = OnnxDetector(exp.onnx).with_score_floor(FLOOR)
    _assert_parity(_torch_records(ck, files, tmp_path / "t"), det.predict_files(files))
    # the standardizer matters: without it the detections differ
    plain = make_checkpoint("plain.pt")
    other = _torch_records(plain, files, tmp_path / "p")
    assert other[0]["detections"] != det.predict_files(files[:1])[0]["detections"]


def test_real_vendor_dicom_parity(shared_data, make_checkpoint, tmp_path):
    """Siemens JPEG Lossless and NEMA J2K film: same detections in both runtimes."""
    files = [
        shared_data / "dicom" / "fo-dicom" / "OutOfBoundsOverlay.dcm",
        shared_data / "dicom" / "nema-wg04" / "MG1_J2KI.dcm",
    ]
    files = [f for f in files if f.is_file()]
    if not files:
        pytest.skip("no readable vendor DICOM under shared/data/dicom")
    ck = make_checkpoint()
    exp = export_onnx(ck, tmp_path / "real.onnx")
    want = _torch_records(ck, files, tmp_path / "t", default_spacing_mm=0.05)
    got = (
        OnnxDetector(exp.onnx)
        .with_score_floor(FLOOR)
        .predict_files(files, default_spacing_mm=0.05)
    )
    assert _assert_parity(want, got) > 0
    assert all(d["box_space"] == "stored" for d in got)
    rows, cols = got[0]["stored_shape"]
    for d in got[0]["detections"]:
        x0, y0, x1, y1 = d["box"]
        assert 0 <= x0 <= x1 <= cols and 0 <= y0 <= y1 <= rows  # clipped: may be flat


def test_floor_above_every_score_gives_nothing(make_checkpoint, write_exam, tmp_path):
    """Negative case: no candidate above the floor -> no detection in either."""
    ck = make_checkpoint()
    exp = export_onnx(ck, tmp_path / "m.onnx")
    files = write_exam()[:2]
    res = predict_paths(ck, files, tmp_path / "t", score_floor=0.9999, overlay=False)
    torch_docs = [json.loads(p.read_text()) for p in res.written]
    onnx_docs = OnnxDetector(exp.onnx).with_score_floor(0.9999).predict_files(files)
    assert all(not d["detections"] for d in torch_docs + onnx_docs)


def test_numpy_nms_matches_torchvision():
    """Per-class NMS of the post-processing keeps what torchvision keeps."""
    rng = np.random.default_rng(1)
    xy = rng.random((300, 2)).astype(np.float32) * 100
    wh = rng.random((300, 2)).astype(np.float32) * 30 + 1
    boxes = np.concatenate([xy, xy + wh], 1)
    scores = rng.random(300).astype(np.float32)
    labels = rng.integers(0, len(CLASSES), 300)
    want = batched_nms(
        torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels), 0.5
    ).numpy()
    # one level, one cell per box is awkward: call the NMS through postprocess's rule
    from client.onnx_export import nms

    keep = []
    for c in np.unique(labels):
        sel = np.nonzero(labels == c)[0]
        keep.extend(sel[nms(boxes[sel], scores[sel], 0.5)])
    keep = np.asarray(keep)[np.argsort(-scores[keep], kind="stable")]
    np.testing.assert_array_equal(keep, want)
    assert 0 < len(keep) < 300


def test_postprocess_rejects_wrong_outputs():
    post = Postprocess(0.05, 10, 0.6, 5)
    with pytest.raises(ValueError, match="3 outputs per level"):
        postprocess(
            [np.zeros((1, 2, 4, 4), np.float32)] * 4, (32, 32), [(32, 32)], post
        )


def test_tampered_onnx_is_refused(make_checkpoint, tmp_path):
    """A graph or contract changed after export (hash mismatch) is refused."""
    exp = export_onnx(make_checkpoint(), tmp_path / "m.onnx")
    OnnxDetector(exp.onnx)  # intact: loads
    raw = exp.onnx.read_bytes()
    exp.onnx.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(ModelIntegrityError, match=r"m\.onnx: SHA-256 .* differs"):
        OnnxDetector(exp.onnx)
    exp.onnx.write_bytes(raw)
    contract = json.loads(exp.contract.read_text())
    contract["postprocessing"]["score_thresh"] = 0.9
    exp.contract.write_text(json.dumps(contract))
    with pytest.raises(ModelIntegrityError, match=r"contract\.json: SHA-256"):
        OnnxDetector(exp.onnx)
    card_paths(exp.onnx)[0].unlink()
    with pytest.raises(ModelIntegrityError, match="model card does not exist"):
        OnnxDetector(exp.onnx)
    assert contract_path(exp.onnx).is_file()


def test_export_refuses_bad_inputs(make_checkpoint, tmp_path):
    ck = make_checkpoint()
    with pytest.raises(ExportError, match=r"must name a file ending in \.onnx"):
        export_onnx(ck, tmp_path / "m.pt")
    with pytest.raises(ExportError, match="opset: must be in"):
        export_onnx(ck, tmp_path / "m.onnx", opset=9)
    with pytest.raises(CheckpointMismatch, match="does not exist"):
        export_onnx(tmp_path / "none.pt", tmp_path / "m.onnx")
    # flip TTA fuses a mirrored view: neither graph nor contract reproduce it
    tta = make_checkpoint("tta.pt", tta_flip=True)
    with pytest.raises(ExportError, match=r"tta\.pt: field 'model_config\.tta_flip'"):
        export_onnx(tta, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
