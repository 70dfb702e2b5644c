"""``mammofed-client predict --format sr`` and the source-orientation overlay."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from PIL import Image

from client.cli import main as client_main
from client.predict import (
    OVERLAY_COLOURS,
    SR_SUFFIX,
    predict_paths,
    stored_display_pixels,
    write_overlay,
)
from common.keys import CALCIFICATION, MASS

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


@pytest.mark.skipif(
    shutil.which("dciodvfy") is None,
    reason="dicom3tools' dciodvfy not installed (apt-get install dicom3tools)",
)
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
