"""Grayscale Softcopy Presentation States: content, display settings, validators
(dicom3tools' dciodvfy, DCMTK's dcmpschk and dcmp2pgm), predict's ``--format gsps``
and hostile inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from client.cli import main as client_main
from client.gsps import (
    GSPS_STORAGE,
    GSPS_SUFFIX,
    LAYERS,
    build_exam_gsps,
    write_gsps,
)
from client.predict import predict_paths
from common.keys import CALCIFICATION, MASS
from tests.conftest import error_lines, needs_dciodvfy, run_tool

needs_dcmtk = pytest.mark.skipif(
    shutil.which("dcmpschk") is None or shutil.which("dcmp2pgm") is None,
    reason="DCMTK's dcmpschk / dcmp2pgm not installed (apt-get install dcmtk)",
)

#: Detections for the four views (LCC, LMLO, RCC, RMLO), stored space.
DETECTIONS = [
    [
        {"label": MASS, "score": 0.91, "box": [10.0, 20.5, 30.25, 40.0]},
        {"label": CALCIFICATION, "score": 0.12, "box": [1.0, 2.0, 3.0, 4.5]},
    ],
    [],
    [{"label": CALCIFICATION, "score": 0.5, "box": [50.0, 60.0, 70.0, 80.0]}],
    [{"label": MASS, "score": 0.3, "box": [60.0, 0.0, 96.0, 128.0]}],
]


def headers(exam) -> list[Dataset]:
    return [pydicom.dcmread(im.path, stop_before_pixels=True) for im in exam]


def marks(ps: Dataset) -> dict[str, list[tuple[list[float], str]]]:
    """``{layer: [(graphic data, text)]}`` of the drawn findings."""
    out: dict[str, list[tuple[list[float], str]]] = {}
    for item in ps.GraphicAnnotationSequence:
        graphics = item.get("GraphicObjectSequence", [])
        texts = [t.UnformattedTextValue for t in item.TextObjectSequence]
        for g, t in zip(graphics, texts, strict=False):
            out.setdefault(item.GraphicLayer, []).append(([*g.GraphicData], t))
    return out


def info_text(ps: Dataset) -> str:
    (item,) = [
        i for i in ps.GraphicAnnotationSequence if i.GraphicLayer.endswith("INFO")
    ]
    return item.TextObjectSequence[0].UnformattedTextValue


def closed(box: list[float]) -> list[float]:
    x0, y0, x1, y1 = box
    return [x0, y0, x1, y0, x1, y1, x0, y1, x0, y0]


def test_one_state_per_image_with_its_findings_above_the_floor(tmp_path, exam):
    srcs = headers(exam)
    states = build_exam_gsps(srcs, DETECTIONS, score_floor=0.3)
    assert len(states) == 4
    assert len({ps.SeriesInstanceUID for ps in states}) == 1
    assert [ps.InstanceNumber for ps in states] == [1, 2, 3, 4]
    for ps, src, dets in zip(states, srcs, DETECTIONS, strict=True):
        path = write_gsps(ps, tmp_path / f"{ps.SOPInstanceUID}{GSPS_SUFFIX}")
        back = pydicom.dcmread(path)
        assert back.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert back.SOPClassUID == GSPS_STORAGE == "1.2.840.10008.5.1.4.1.1.11.1"
        assert back.Modality == "PR" and back.ContentLabel == "MAMMOFED_CAD"
        assert back.StudyInstanceUID == src.StudyInstanceUID
        assert back.SeriesInstanceUID != src.SeriesInstanceUID
        for key in ("PatientName", "PatientID", "PatientBirthDate",
                    "PatientSex", "StudyDate", "AccessionNumber"):  # fmt: skip
            assert back[key].value == src[key].value, key
        assert back.Laterality == src.ImageLaterality
        (series,) = back.ReferencedSeriesSequence
        assert series.SeriesInstanceUID == src.SeriesInstanceUID
        (ref,) = series.ReferencedImageSequence
        assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
        for item in back.GraphicAnnotationSequence:  # every mark is on its image
            (r,) = item.ReferencedImageSequence
            assert r.ReferencedSOPInstanceUID == src.SOPInstanceUID
        (area,) = back.DisplayedAreaSelectionSequence
        assert list(area.DisplayedAreaBottomRightHandCorner) == [96, 128]
        # drawn: the findings at or above the floor, boxes unchanged (stored space)
        want: dict[str, list[tuple[list[float], str]]] = {}
        for d in dets:
            if d["score"] >= 0.3:
                layer = "MAMMOFED MASS" if d["label"] == MASS else "MAMMOFED CALC"
                text = f"{d['label']} {100 * d['score']:.0f}%"
                want.setdefault(layer, []).append((closed(d["box"]), text))
        got = marks(back)
        assert got.keys() == want.keys()
        for layer in want:
            assert [t for _, t in got[layer]] == [t for _, t in want[layer]]
            for (g, _), (w, _) in zip(got[layer], want[layer], strict=True):
                np.testing.assert_allclose(g, w, rtol=1e-6)
        n = sum(len(v) for v in want.values())
        assert f": {n} finding" in info_text(back) and "30%" in info_text(back)
        declared = {item.GraphicLayer for item in back.GraphicLayerSequence}
        assert declared == set(LAYERS)
        assert {i.GraphicLayer for i in back.GraphicAnnotationSequence} <= declared
        # the source's display: MONOCHROME2 and its window
        assert back.PresentationLUTShape == "IDENTITY"
        (voi,) = back.SoftcopyVOILUTSequence
        assert float(voi.WindowCenter) == float(src.WindowCenter)
        assert float(voi.WindowWidth) == float(src.WindowWidth)


def test_uid_seed_gives_the_same_uids(exam):
    a = build_exam_gsps(headers(exam), DETECTIONS, uid_seed=["s", "m"])
    b = build_exam_gsps(headers(exam), DETECTIONS, uid_seed=["s", "m"])
    c = build_exam_gsps(headers(exam), DETECTIONS, uid_seed=["s", "other"])
    assert [x.SOPInstanceUID for x in a] == [x.SOPInstanceUID for x in b]
    assert a[0].SeriesInstanceUID == b[0].SeriesInstanceUID != c[0].SeriesInstanceUID
    assert len({x.SOPInstanceUID for x in a}) == 4


def test_display_settings_follow_the_source(exam):
    src = headers(exam[:1])[0]
    # MONOCHROME1 (low values white), a rescale, a VOI LUT instead of a window
    src.PhotometricInterpretation = "MONOCHROME1"
    src.RescaleSlope, src.RescaleIntercept = "2", "-10"
    del src.WindowCenter, src.WindowWidth
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 16]
    lut.LUTData = [0, 100, 200, 65535]
    lut.LUTExplanation = "vendor curve"
    src.VOILUTSequence = DicomSequence([lut])
    src.PixelAspectRatio = [2, 1]
    (ps,) = build_exam_gsps([src], [[]])
    assert ps.PresentationLUTShape == "INVERSE"
    assert (float(ps.RescaleSlope), float(ps.RescaleIntercept)) == (2.0, -10.0)
    assert ps.RescaleType == "US"
    (voi,) = ps.SoftcopyVOILUTSequence
    assert "WindowCenter" not in voi
    assert list(voi.VOILUTSequence[0].LUTData) == [0, 100, 200, 65535]
    assert list(ps.DisplayedAreaSelectionSequence[0].PresentationPixelAspectRatio) == [
        2,
        1,
    ]
    assert ": 0 findings" in info_text(ps)
    # a LUT whose descriptor does not match its data is not copied, as a VOI
    # or as a Modality LUT (the rescale is used instead)
    lut.LUTDescriptor = [5, 0, 16]
    src.ModalityLUTSequence = DicomSequence([lut])
    (ps,) = build_exam_gsps([src], [[]])
    assert "VOILUTSequence" not in ps.SoftcopyVOILUTSequence[0]
    assert "ModalityLUTSequence" not in ps and float(ps.RescaleSlope) == 2.0
    lut.LUTDescriptor = [4, 0, 16]
    (ps,) = build_exam_gsps([src], [[]])
    assert list(ps.ModalityLUTSequence[0].LUTData) == [0, 100, 200, 65535]
    del src.ModalityLUTSequence
    # no window and no LUT (a FOR PROCESSING image): its Bits Stored range
    del src.VOILUTSequence
    src.BitsStored = 14
    (ps,) = build_exam_gsps([src], [[]])
    (voi,) = ps.SoftcopyVOILUTSequence
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (8192.0, 16384.0)


@pytest.mark.parametrize(
    ("det", "match"),
    [
        ({"label": "cyst", "score": 0.5, "box": [1, 1, 2, 2]}, "label='cyst'"),
        ({"label": MASS, "score": float("nan"), "box": [1, 1, 2, 2]}, "score=nan"),
        ({"label": MASS, "score": 0.5, "box": [1, 1, 97, 2]}, "inside the stored"),
        ({"label": MASS, "score": 0.5, "box": "1,1,2,2"}, r"not \[xmin"),
    ],
)
def test_hostile_detections_are_refused_naming_them(exam, det, match):
    with pytest.raises(ValueError, match=match):
        build_exam_gsps(headers(exam[:1]), [[det]])


def test_hostile_sources_are_refused(exam, exam_writer, tmp_path):
    srcs = headers(exam)
    other = headers(exam_writer(tmp_path / "other", patient_id="P9")[:1])
    with pytest.raises(ValueError, match="one presentation state covers one study"):
        build_exam_gsps([srcs[0], other[0]], [[], []])
    with pytest.raises(ValueError, match="same image"):
        build_exam_gsps([srcs[0], srcs[0]], [[], []])
    with pytest.raises(ValueError, match="4 sources but 1 detection lists"):
        build_exam_gsps(srcs, [[]])
    with pytest.raises(ValueError, match="score_floor"):
        build_exam_gsps(srcs[:1], [[]], score_floor=1.5)
    del srcs[1].SOPInstanceUID
    with pytest.raises(ValueError, match="lacks SOPInstanceUID"):
        build_exam_gsps(srcs, [[], [], [], []])
    with pytest.raises(ValueError, match="not a Grayscale Softcopy"):
        write_gsps(Dataset(), tmp_path / "x.pr.dcm")


def _written(tmp_path: Path, exam, dets=DETECTIONS) -> list[Path]:
    return [
        write_gsps(ps, tmp_path / f"{ps.SOPInstanceUID}{GSPS_SUFFIX}")
        for ps in build_exam_gsps(headers(exam), dets)
    ]


@needs_dciodvfy
@pytest.mark.parametrize("empty", [False, True], ids=["findings", "no-findings"])
def test_dciodvfy_accepts_the_states(tmp_path, exam, empty):
    for path in _written(tmp_path, exam, [[], [], [], []] if empty else DETECTIONS):
        res = run_tool("dciodvfy", str(path))
        out = res.stdout + res.stderr
        assert "GrayscaleSoftcopyPresentationState" in out, out
        assert [
            ln for ln in out.splitlines() if ln.startswith(("Error", "Warning"))
        ] == [], out


@needs_dciodvfy
def test_dciodvfy_catches_a_broken_state(tmp_path, exam):
    (ps, *_) = build_exam_gsps(headers(exam), DETECTIONS)
    del ps.PresentationLUTShape
    path = write_gsps(ps, tmp_path / "bad.pr.dcm")
    out = run_tool("dciodvfy", str(path))
    assert "PresentationLUTShape" in out.stdout + out.stderr


@needs_dcmtk
def test_dcmtk_checks_and_applies_the_states(tmp_path, exam):
    """dcmpschk passes every state; dcmp2pgm renders each image through it.

    The MONOCHROME1 copy of an image (pixels inverted, the same window) shown
    through its own state looks as the MONOCHROME2 original does through its:
    DCMTK applied the window and the INVERSE presentation LUT we wrote.
    """
    paths = _written(tmp_path, exam)
    for path in paths:
        res = run_tool("dcmpschk", str(path))
        assert "Test passed" in res.stdout + res.stderr, res.stdout + res.stderr
    bad = pydicom.dcmread(paths[0])
    del bad.PresentationLUTShape
    bad.save_as(tmp_path / "bad.dcm")
    res = run_tool("dcmpschk", str(tmp_path / "bad.dcm"))
    assert "Test failed" in res.stdout + res.stderr

    src = exam[0].path
    ds = pydicom.dcmread(src)
    top = 2 ** int(ds.BitsStored) - 1
    inverted = tmp_path / "mono1.dcm"
    ds.PixelData = (top - ds.pixel_array.astype(np.int32)).astype(np.uint16).tobytes()
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.WindowCenter = top - float(ds.WindowCenter)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(inverted, enforce_file_format=True)
    rendered = []
    for image in (src, inverted):
        head = pydicom.dcmread(image, stop_before_pixels=True)
        (ps,) = build_exam_gsps([head], [[]])
        state = write_gsps(ps, tmp_path / f"{image.stem}{GSPS_SUFFIX}")
        pgm = tmp_path / f"{image.stem}.pgm"
        res = run_tool("dcmp2pgm", "-p", str(state), str(image), str(pgm))
        assert res.returncode == 0 and pgm.exists(), res.stdout + res.stderr
        rendered.append(_read_pgm(pgm))
    a, b = rendered
    assert a.shape == (128, 96) and a.std() > 10  # an image, not a flat field
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def _read_pgm(path: Path) -> np.ndarray:
    """A binary (P5) 8-bit PGM as uint8[H, W]."""
    data = path.read_bytes()
    parts = data.split(maxsplit=4)
    assert parts[0] == b"P5" and int(parts[3]) == 255, parts[:4]
    w, h = int(parts[1]), int(parts[2])
    return np.frombuffer(parts[4][: w * h], np.uint8).reshape(h, w)


def test_predict_format_gsps_draws_the_json_boxes(tmp_path, exam, tiny_checkpoint):
    src = tmp_path / "in"
    src.mkdir()
    for im in exam:
        shutil.copy(im.path, src / im.path.name)
    (src / "notes.png").write_bytes(b"not an image")  # unreadable: a logged skip
    out = tmp_path / "pred"
    code = client_main(
        ["predict", "--checkpoint", str(tiny_checkpoint), "--out", str(out),
         "--device", "cpu", "--format", "sr+gsps", "--sr-display-floor", "0",
         str(src)]
    )  # fmt: skip
    assert code == 1  # the unreadable file
    states = sorted(out.glob(f"*{GSPS_SUFFIX}"))
    assert len(states) == 4 and len(list(out.glob("*.sr.dcm"))) == 1
    by_sop = {}
    for im in exam:
        doc = json.loads((out / f"{im.path.stem}.json").read_text())
        by_sop[doc["sop_instance_uid"]] = doc["detections"]
    for path in states:
        ps = pydicom.dcmread(path)
        sop = ps.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
        dets = by_sop[sop.ReferencedSOPInstanceUID]
        drawn = [g for layer in marks(ps).values() for g, _ in layer]
        # the floor at 0: every finding with an outline drawn (an untrained
        # model's zero-area boxes are left out with a warning, as in the SR)
        want = sorted(
            closed(d["box"])
            for d in dets
            if d["box"][2] > d["box"][0] and d["box"][3] > d["box"][1]
        )
        assert len(drawn) == len(want) > 0
        for g, w in zip(sorted(drawn), want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5)


def test_predict_gsps_skips_a_research_image_naming_it(tmp_path, tiny_checkpoint):
    from PIL import Image

    px = np.zeros((200, 160), np.uint8)
    px[40:160, :100] = 120
    Image.fromarray(px).save(tmp_path / "research.png")
    res = predict_paths(
        tiny_checkpoint, [tmp_path / "research.png"], tmp_path / "out",
        spacing_mm=0.2, device="cpu", output_format="gsps",
    )  # fmt: skip
    assert len(res.written) == 1 and res.gsps_written == [] and res.sr_skipped == []
    [(where, why)] = res.gsps_skipped
    assert where.endswith("research.png") and "only reference DICOM" in why


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_hostile_display_attributes_fall_back_to_safe_values(tmp_path, exam):
    """Values a modality should not send: no crash, and a state dciodvfy accepts."""
    src = headers(exam[:1])[0]
    with pydicom.config.disable_value_validation():
        src.WindowCenter = "nan"
        src.WindowWidth = "0"
        src.BitsStored = 40
        src.PixelAspectRatio = ["0", "-1"]
        src.RescaleSlope, src.RescaleIntercept = "inf", "0"
        src.RescaleType = "H U!"
        src.ImageLaterality = "../x"
        bad = Dataset()
        bad.LUTExplanation = "no descriptor, no data"
        src.VOILUTSequence = DicomSequence([bad])
    (ps,) = build_exam_gsps([src], [[]])
    (voi,) = ps.SoftcopyVOILUTSequence
    # no usable window or LUT: the 16-bit range (Bits Stored clamped)
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (32768.0, 65536.0)
    assert "RescaleSlope" not in ps  # an infinite slope is no Modality LUT
    assert list(ps.DisplayedAreaSelectionSequence[0].PresentationPixelAspectRatio) == [
        1,
        1,
    ]
    assert ps.Laterality == ""
    if shutil.which("dciodvfy") is not None:
        path = write_gsps(ps, tmp_path / "h.pr.dcm")
        res = run_tool("dciodvfy", str(path))
        out = res.stdout + res.stderr
        assert error_lines(out) == [], out


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_window_pydicom_could_not_convert_is_not_read_by_its_first_character(exam):
    """A raw DS that stays text ("2048x") must not become 2.0 (its first digit)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    src = headers(exam[:1])[0]
    for tag, text in ((Tag(0x0028, 0x1050), b"2048x "), (Tag(0x0028, 0x1051), b"4096")):
        src[tag] = RawDataElement(tag, "DS", len(text), text, 0, False, True)
    (ps,) = build_exam_gsps([src], [[]])
    (voi,) = ps.SoftcopyVOILUTSequence
    # no usable centre: the Bits Stored range, not a centre of 2
    assert float(voi.WindowCenter) == 2 ** (int(src.BitsStored) - 1)
    # an aspect ratio past IS's range is not copied (the state would not write)
    tag = Tag(0x0028, 0x0034)
    text = b"1099511627776\\1 "
    src[tag] = RawDataElement(tag, "IS", len(text), text, 0, False, True)
    (ps,) = build_exam_gsps([src], [[]])
    ratio = ps.DisplayedAreaSelectionSequence[0].PresentationPixelAspectRatio
    assert list(ratio) == [1, 1]  # from the square pixel spacing


def test_a_value_pydicom_cannot_convert_is_logged_and_not_used(exam, caplog):
    """An IS of "INF" makes pydicom raise OverflowError when it is read."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    src = headers(exam[:1])[0]
    tag = Tag(0x0028, 0x0034)  # PixelAspectRatio
    src[tag] = RawDataElement(tag, "IS", 6, b"INF\\1 ", 0, False, True)
    with caplog.at_level("WARNING", logger="client.gsps"):
        (ps,) = build_exam_gsps([src], [[]])
    ratio = ps.DisplayedAreaSelectionSequence[0].PresentationPixelAspectRatio
    assert list(ratio) == [1, 1]
    assert "PixelAspectRatio" in caplog.text and src.SOPInstanceUID in caplog.text


def test_a_bits_stored_of_several_values_does_not_stop_the_state(exam):
    """A US element of four bytes reads as two values: the first is used."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    src = headers(exam[:1])[0]
    del src.WindowCenter, src.WindowWidth
    tag = Tag(0x0028, 0x0101)  # BitsStored
    src[tag] = RawDataElement(tag, "US", 4, b"\x0c\x00\x10\x00", 0, False, True)
    (ps,) = build_exam_gsps([src], [[]])
    (voi,) = ps.SoftcopyVOILUTSequence
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (2048.0, 4096.0)


def test_an_unknown_character_set_is_replaced_by_utf8_in_both_objects(
    tmp_path, exam, caplog
):
    """A source's Specific Character Set with control characters would make the
    derived objects unwritable: they are written in UTF-8, the names kept."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    from client.cad_sr import build_cad_sr, write_cad_sr

    src = headers(exam[:1])[0]
    tag = Tag(0x0008, 0x0005)
    src[tag] = RawDataElement(tag, "CS", 2, b"\x00\x01", 0, False, True)
    src.PatientName = "Müller^Zoë"
    with caplog.at_level("WARNING", logger="client.dicom_derived"):
        sr = build_cad_sr([src], [[]])
        (ps,) = build_exam_gsps([src], [[]])
    assert "SpecificCharacterSet" in caplog.text
    for ds, path in ((sr, tmp_path / "a.sr.dcm"), (ps, tmp_path / "a.pr.dcm")):
        writer = write_cad_sr if path.name.endswith(".sr.dcm") else write_gsps
        back = pydicom.dcmread(writer(ds, path))
        assert back.SpecificCharacterSet == "ISO_IR 192"
        assert str(back.PatientName) == "Müller^Zoë"
