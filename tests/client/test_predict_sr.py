"""``mammofed-client predict --format sr``, the source-orientation overlay, and
hostile inputs (a broken image in an exam, a UID that is a path)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from PIL import Image

from benchmarks import synthetic
from client import predict as predict_mod
from client.cli import main as client_main
from client.predict import (
    OVERLAY_COLOURS,
    SR_SUFFIX,
    predict_paths,
    stored_display_pixels,
    write_overlay,
)
from common.errors import RefusedImage
from common.keys import CALCIFICATION, MASS
from tests.conftest import needs_dciodvfy

RED = OVERLAY_COLOURS[MASS]


def test_overlay_is_drawn_on_the_source_in_its_own_orientation(tmp_path, exam):
    rcc = exam[2]  # right breast: breast and marker in the stored image's right half
    mx0, my0, mx1, my1 = rcc.marker_box
    box = [mx0 - 4.0, my0 - 4.0, mx1 + 4.0, my1 + 4.0]
    dets = [
        {"label": MASS, "score": 0.9, "box": box},
        {"label": CALCIFICATION, "score": 0.1, "box": [2.0, 2.0, 10.0, 10.0]},
    ]
    png = write_overlay(rcc.path, dets, tmp_path / "o.png", 0.3)
    img = Image.open(png)
    rgb = np.asarray(img.convert("RGB"))
    assert rgb.shape[:2] == (128, 96), "stored grid, not the cropped model space"
    assert img.info["mammofed-downsample"] == "1"
    # the outline's top edge, at the box's stored coordinates, is red
    assert tuple(rgb[int(box[1]), int((box[0] + box[2]) / 2)]) == RED
    assert tuple(rgb[int(box[3]) - 1, int(box[0])]) == RED
    # inside the box (the marker) is grey, not painted
    r, g, b = rgb[my0 + 1, mx0 + 1]
    assert r == g == b and r > 200
    # the breast stays on the right: no flip into model orientation
    grey = rgb[..., 1].astype(float)
    assert grey[:, 48:].mean() > 3 * grey[:, :48].mean()
    # below the floor: not drawn
    assert not (rgb[2:10, 2:10] == (0, 255, 255)).all(axis=-1).any()


def test_overlay_downsamples_large_images(tmp_path, exam):
    grey, factor = stored_display_pixels(exam[0].path, max_side=50)
    assert factor == 3 and grey.shape == (43, 32) and grey.dtype == np.uint8
    box = [30.0, 60.0, 60.0, 90.0]  # stored space
    png = write_overlay(
        exam[0].path, [{"label": MASS, "score": 1.0, "box": box}], tmp_path / "s.png",
        0.0, max_side=50,
    )  # fmt: skip
    rgb = np.asarray(Image.open(png).convert("RGB"))
    assert rgb.shape[:2] == (43, 32)
    assert tuple(rgb[20, 15]) == RED  # y0 / 3 = 20, x in [10, 20)
    with pytest.raises(ValueError, match="max_side"):
        stored_display_pixels(exam[0].path, max_side=0)


def _png(path) -> None:
    """A 200x160 research image, breast on the left."""
    px = np.zeros((200, 160), np.uint8)
    yy, xx = np.mgrid[:200, :160]
    px[((yy - 100) / 80) ** 2 + (xx / 100) ** 2 <= 1] = 120
    Image.fromarray(px).save(path)


def test_predict_format_sr_writes_one_sr_per_exam(
    tmp_path, exam, exam_writer, tiny_checkpoint, caplog
):
    second = exam_writer(tmp_path / "exam2", patient_id="P002")[:2]
    src = tmp_path / "in"
    src.mkdir()
    for im in [*exam, *second]:
        shutil.copy(im.path, src / f"{im.path.parent.name}-{im.path.name}")
    _png(src / "research.png")
    out = tmp_path / "pred"
    with caplog.at_level(logging.WARNING, logger="client.predict"):
        res = predict_paths(
            tiny_checkpoint, [src], out, spacing_mm=0.2, device="cpu",
            output_format="sr",
        )  # fmt: skip
    assert len(res.written) == 7 and res.skipped == []
    # the PNG cannot have an SR: logged skip naming the file, its JSON is kept
    assert len(res.sr_skipped) == 1 and res.sr_skipped[0][0].endswith("research.png")
    assert "research.png" in caplog.text and (out / "research.json").exists()
    studies = {pydicom.dcmread(im.path).StudyInstanceUID for im in [exam[0], second[0]]}
    assert {p.name for p in res.sr_written} == {f"{u}{SR_SUFFIX}" for u in studies}

    # the JSON contract is unchanged, and the SR carries the same detections
    sr = pydicom.dcmread(
        out / f"{pydicom.dcmread(exam[0].path).StudyInstanceUID}.sr.dcm"
    )
    by_uid = {}
    for im in exam:
        doc = json.loads((out / f"exam-{im.path.stem}.json").read_text())
        assert doc["box_space"] == "stored" and doc["stored_shape"] == [128, 96]
        assert set(doc) >= {"source", "sop_instance_uid", "laterality", "detections"}
        by_uid[doc["sop_instance_uid"]] = [
            d for d in doc["detections"] if d["box"][0] < d["box"][2]
            and d["box"][1] < d["box"][3]
        ]  # fmt: skip
    outlines = []
    stack = list(sr.ContentSequence)
    while stack:
        item = stack.pop()
        stack.extend(item.get("ContentSequence", []))
        name = item.get("ConceptNameCodeSequence")
        if item.get("ValueType") == "SCOORD" and name[0].CodeValue == "111041":
            uid = (
                item.ContentSequence[0]
                .ReferencedSOPSequence[0]
                .ReferencedSOPInstanceUID
            )
            xy = np.asarray(item.GraphicData).reshape(-1, 2)
            outlines.append((uid, [xy[0, 0], xy[0, 1], xy[2, 0], xy[2, 1]]))
    assert len(outlines) == sum(len(v) for v in by_uid.values()) > 0
    for uid, box in outlines:
        assert any(np.allclose(box, d["box"], atol=1e-3) for d in by_uid[uid])

    # CLI: DICOM only -> exit 0; a PNG in the inputs -> exit 1 (no SR for it)
    rc = client_main([
        "predict", "--checkpoint", str(tiny_checkpoint), str(exam[0].path),
        "--out", str(tmp_path / "cli"), "--format", "sr", "--device", "cpu",
        "--no-overlay",
    ])  # fmt: skip
    assert rc == 0 and len(list((tmp_path / "cli").glob(f"*{SR_SUFFIX}"))) == 1
    rc = client_main([
        "predict", "--checkpoint", str(tiny_checkpoint), str(src / "research.png"),
        "--out", str(tmp_path / "cli2"), "--format", "sr", "--device", "cpu",
        "--spacing-mm", "0.2", "--no-overlay",
    ])  # fmt: skip
    assert rc == 1 and (tmp_path / "cli2" / "research.json").exists()
    assert list((tmp_path / "cli2").glob(f"*{SR_SUFFIX}")) == []


def test_predict_refuses_an_unknown_format(tmp_path, tiny_checkpoint):
    with pytest.raises(ValueError, match="valid formats: json, sr"):
        predict_paths(tiny_checkpoint, [], tmp_path, output_format="xml")


@needs_dciodvfy
def test_sr_for_a_real_vendor_file_passes_dciodvfy(
    tmp_path, shared_data, tiny_checkpoint
):
    # Siemens stereotactic image, JPEG Lossless, ISO_IR 192 (common/dicom docs)
    src = shared_data / "dicom" / "fo-dicom" / "OutOfBoundsOverlay.dcm"
    if not src.is_file():
        pytest.skip(f"{src} not in the shared data")
    out = tmp_path / "pred"
    rc = client_main([
        "predict", "--checkpoint", str(tiny_checkpoint), str(src), "--out", str(out),
        "--format", "sr", "--device", "cpu", "--no-overlay",
    ])  # fmt: skip
    assert rc == 0
    header = pydicom.dcmread(src, stop_before_pixels=True)
    (path,) = out.glob(f"*{SR_SUFFIX}")
    assert path.name == f"{header.StudyInstanceUID}{SR_SUFFIX}"
    sr = pydicom.dcmread(path)
    assert sr.PatientID == header.PatientID and sr.SpecificCharacterSet == "ISO_IR 192"
    res = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    text = res.stdout + res.stderr
    assert "MammographyCADSR" in text
    assert [ln for ln in text.splitlines() if ln.startswith("Error")] == [], text


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("modality-lut-without-descriptor", "LUTDescriptor absent"),
        ("modality-lut-12-bit-entries", "LUTDescriptor=[4096, 0, 12]"),
        ("rows-3-bytes", "Rows=b'\\x80\\x00\\x00'"),
    ],
)
def test_one_broken_image_does_not_stop_the_exam(
    tmp_path, exam, tiny_checkpoint, kind, needle
):
    """A header value pydicom cannot use: that image is a skip with its reason;
    the three others get their JSON and the study its SR."""
    bad = synthetic.break_header(exam[3].path, kind)
    res = predict_paths(
        tiny_checkpoint, [im.path for im in exam], tmp_path / "pred",
        device="cpu", output_format="sr", overlay=False,
    )  # fmt: skip
    assert [p.stem for p in res.written] == [im.path.stem for im in exam[:3]]
    [(skipped, reason)] = res.skipped
    assert skipped == str(bad) and str(bad) in reason and needle in reason
    study = pydicom.dcmread(exam[0].path).StudyInstanceUID
    assert [p.name for p in res.sr_written] == [f"{study}{SR_SUFFIX}"]
    refs = pydicom.dcmread(res.sr_written[0]).CurrentRequestedProcedureEvidenceSequence
    cited = {
        sop.ReferencedSOPInstanceUID
        for series in refs[0].ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert cited == {pydicom.dcmread(im.path).SOPInstanceUID for im in exam[:3]}


@pytest.mark.parametrize("uid", ["../../escaped", "1.2/3", "/abs/x"])
def test_sr_is_never_written_outside_out(
    tmp_path, exam, exam_writer, tiny_checkpoint, uid, caplog, monkeypatch
):
    """A StudyInstanceUID that is no UID: logged skip naming file, field and
    value; no file outside OUT; the normal exam next to it still gets its SR.
    With the UID check off, the path check alone keeps the SR inside OUT.
    (The absolute UID points into ``tmp_path``: a regression must not write
    to ``/abs``.)"""
    if uid.startswith("/"):
        uid = f"{tmp_path}{uid}"
    bad = exam_writer(tmp_path / "bad")[0].path
    ds = pydicom.dcmread(bad)
    ds.StudyInstanceUID = uid
    ds.save_as(bad, enforce_file_format=True)
    study = pydicom.dcmread(exam[0].path).StudyInstanceUID
    inputs = [im.path for im in exam] + [bad]
    for run, uid_check in (("checked", True), ("unchecked", False)):
        if not uid_check:
            monkeypatch.setattr("client.predict.is_valid_uid", lambda value: True)
        out = tmp_path / run / "a" / "b" / "out"
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="client.predict"):
            res = predict_paths(
                tiny_checkpoint, inputs, out, device="cpu", output_format="sr",
                overlay=False,
            )  # fmt: skip
        assert len(res.written) == 5 and res.skipped == []
        assert [p.name for p in res.sr_written] == [f"{study}{SR_SUFFIX}"]
        assert res.sr_written[0].parent == out
        [(where, why)] = res.sr_skipped
        if uid_check:
            assert where == str(bad)
            assert f"StudyInstanceUID={uid!r} is not a valid DICOM UID" in why
        else:
            assert str(bad) in where and "would resolve outside" in why
        assert str(bad) in caplog.text and uid in caplog.text
    srs = set(tmp_path.rglob(f"*{SR_SUFFIX}"))
    assert srs == {
        tmp_path / r / "a/b/out" / f"{study}{SR_SUFFIX}"
        for r in ("checked", "unchecked")
    }


def test_any_error_reading_one_file_goes_to_on_unreadable(exam, monkeypatch):
    """An error ``read_any`` lets through (not RefusedImage/ValueError) costs that
    file only: on_unreadable gets a RefusedImage naming the file and the error;
    MemoryError and a missing on_unreadable still propagate."""
    real = predict_mod.read_any
    bad, oom = exam[1].path, exam[2].path

    def read_any(path, **options):
        if path == bad:
            raise RuntimeError("decoder state corrupt")
        if path == oom:
            raise MemoryError
        return real(path, **options)

    def detect(pixels):
        return [
            {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0)}
            for _ in pixels
        ]

    monkeypatch.setattr(predict_mod, "read_any", read_any)
    files = [exam[0].path, bad, exam[3].path]
    unreadable = []
    got = predict_mod.detect_files(
        detect, files, score_floor=0.0, working_spacing_mm=0.4,
        on_unreadable=lambda f, exc: unreadable.append((f, exc)),
    )  # fmt: skip
    assert [f for f, _, _ in got] == [exam[0].path, exam[3].path]
    [(f, exc)] = unreadable
    assert f == bad and isinstance(exc, RefusedImage) and exc.path == str(bad)
    assert exc.reason == "cannot be read: RuntimeError: decoder state corrupt"
    assert isinstance(exc.__cause__, RuntimeError)
    with pytest.raises(RuntimeError, match="decoder state corrupt"):
        list(predict_mod.detect_files(detect, files, score_floor=0.0,
                                      working_spacing_mm=0.4))  # fmt: skip
    with pytest.raises(MemoryError):
        list(predict_mod.detect_files(
            detect, [oom], score_floor=0.0, working_spacing_mm=0.4,
            on_unreadable=lambda f, exc: None,
        ))  # fmt: skip
