"""Mammography CAD SR: content, round trip, validators, right-breast coordinates."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from client.cad_sr import (
    FINDING_CODES,
    HORIZONTAL_SPACING,
    MAMMOGRAPHY_CAD_SR_STORAGE,
    VERTICAL_SPACING,
    build_cad_sr,
    write_cad_sr,
)
from client.predict import detections_to_stored
from common.imaging.dicom import read_dicom
from common.keys import CALCIFICATION, MASS
from tests.conftest import error_lines, needs_dciodvfy, run_tool

needs_dsrdump = pytest.mark.skipif(
    shutil.which("dsrdump") is None,
    reason="DCMTK's dsrdump not installed (apt-get install dcmtk)",
)
#: The one warning DCMTK 3.6.7 prints for every Mammography CAD SR: it does not
#: implement TID 4000, so it checks the IOD's relationship constraints only.
DSRDUMP_TEMPLATE_NOTICE = "W: Check for template constraints not yet supported"

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


def walk(items) -> Iterator[tuple[Dataset, Dataset | None]]:
    """Every content item with its parent (by-value tree, depth first)."""
    stack = [(item, None) for item in items]
    while stack:
        item, parent = stack.pop(0)
        yield item, parent
        stack[0:0] = [(c, item) for c in item.get("ContentSequence", [])]


def name_of(item: Dataset) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return seq[0].CodeValue if seq else ""


def findings(sr: Dataset) -> list[Dataset]:
    """The Single Image Finding CODE items (111059, DCM)."""
    return [i for i, _ in walk(sr.ContentSequence) if name_of(i) == "111059"]


def child(item: Dataset, code_value: str) -> Dataset:
    (found,) = [c for c in item.ContentSequence if name_of(c) == code_value]
    return found


def test_four_view_exam_round_trips(tmp_path, exam):
    srcs = headers(exam)
    sr = build_cad_sr(srcs, DETECTIONS, score_floor=0.4)
    path = write_cad_sr(sr, tmp_path / "cad.sr.dcm")
    back = pydicom.dcmread(path)

    assert back.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (
        back.SOPClassUID
        == MAMMOGRAPHY_CAD_SR_STORAGE
        == "1.2.840.10008.5.1.4.1.1.88.50"
    )
    assert back.Modality == "SR" and back.VerificationFlag == "UNVERIFIED"
    assert back.CompletionFlag == "COMPLETE"
    assert back.ContentTemplateSequence[0].TemplateIdentifier == "4000"
    assert back.ConceptNameCodeSequence[0].CodeValue == "111036"
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
                "ReferringPhysicianName", "StudyID"):  # fmt: skip
        assert back[key].value == srcs[0][key].value, key
    assert back.SeriesInstanceUID != srcs[0].SeriesInstanceUID
    assert back.SOPInstanceUID not in {s.SOPInstanceUID for s in srcs}
    assert back.ContentDate and back.ContentTime and back.Manufacturer
    evidence = back.CurrentRequestedProcedureEvidenceSequence[0]
    refs = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert [r.ReferencedSOPInstanceUID for r in refs] == [
        s.SOPInstanceUID for s in srcs
    ]

    library = back.ContentSequence[1]
    assert name_of(library) == "111028" and len(library.ContentSequence) == 4
    laterality = [child(e, "111027").ConceptCodeSequence[0].CodeValue
                  for e in library.ContentSequence]  # fmt: skip
    assert laterality == ["80248007", "80248007", "73056007", "73056007"]

    expected = [
        (src, d) for src, dets in zip(srcs, DETECTIONS, strict=True) for d in dets
    ]
    sifs = findings(back)
    assert len(sifs) == len(expected) == 4
    for sif, (src, det) in zip(sifs, expected, strict=True):
        code = sif.ConceptCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator) == (
            FINDING_CODES[det["label"]].value,
            FINDING_CODES[det["label"]].scheme_designator,
        )
        certainty = child(sif, "111012").MeasuredValueSequence[0]
        assert float(certainty.NumericValue) == pytest.approx(100 * det["score"])
        intent = child(sif, "111056").ConceptCodeSequence[0].CodeValue
        assert intent == ("111150" if det["score"] >= 0.4 else "111151")
        outline = child(sif, "111041")
        assert outline.GraphicType == "POLYLINE"
        x0, y0, x1, y1 = det["box"]
        np.testing.assert_allclose(
            np.asarray(outline.GraphicData).reshape(-1, 2),
            [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]],
            atol=1e-5,
        )
        (image,) = outline.ContentSequence
        assert image.RelationshipType == "SELECTED FROM"
        ref = image.ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert ref.ReferencedSOPClassUID == src.SOPClassUID
    assert FINDING_CODES[CALCIFICATION].value == "129769006"  # Calcification Cluster
    assert FINDING_CODES[MASS].value == "129793001"  # Mammography breast density
    summary = back.ContentSequence[2]
    assert summary.ConceptCodeSequence[0].CodeValue == "111242"  # with findings


def test_empty_detections_still_say_the_cad_ran(exam):
    sr = build_cad_sr(headers(exam), [[], [], [], []])
    assert findings(sr) == []
    summary, detections, analyses = sr.ContentSequence[2:]
    assert summary.ConceptCodeSequence[0].CodeValue == "111241"  # without findings
    assert "ContentSequence" not in summary
    assert detections.ConceptCodeSequence[0].CodeValue == "111222"  # Succeeded
    assert analyses.ConceptCodeSequence[0].CodeValue == "111225"  # Not Attempted
    performed = detections.ContentSequence[0].ContentSequence
    assert len(performed) == 2
    # every Detection Performed points at the four Image Library entries
    items = performed[0].ContentSequence
    refs = [list(c.ReferencedContentItemIdentifier) for c in items
            if "ReferencedContentItemIdentifier" in c]  # fmt: skip
    assert refs == [[1, 2, k] for k in range(1, 5)]


def test_mixed_studies_raise_naming_the_uids(tmp_path, exam, exam_writer):
    other = exam_writer(tmp_path / "other", study_uid="1.2.3.4.5")
    srcs = headers(exam[:2]) + headers(other[:1])
    with pytest.raises(ValueError, match="2 StudyInstanceUIDs") as err:
        build_cad_sr(srcs, [[], [], []])
    assert "1.2.3.4.5" in str(err.value) and srcs[0].StudyInstanceUID in str(err.value)


def _library_spacing(sr: Dataset) -> list[float]:
    """The first image library entry's (horizontal, vertical) spacing in µm."""
    entry = sr.ContentSequence[1].ContentSequence[0]
    codes_ = (HORIZONTAL_SPACING.value, VERTICAL_SPACING.value)
    return [
        float(c.MeasuredValueSequence[0].NumericValue)
        for c in entry.ContentSequence
        if name_of(c) in codes_
    ]


def test_the_library_states_only_a_plausible_spacing(exam):
    srcs = headers(exam[:1])
    for k in ("PixelSpacing", "ImagerPixelSpacing"):
        if k in srcs[0]:
            delattr(srcs[0], k)
    srcs[0].PixelSpacing = [0.07, 0.065]
    assert _library_spacing(build_cad_sr(srcs, [[]])) == pytest.approx([65.0, 70.0])
    # a spacing the reader treats as absent (a vendor's 53.96 mm) is left out,
    # and ImagerPixelSpacing stands in for it where that one is plausible
    srcs[0].PixelSpacing = [53.96, 53.96]
    assert _library_spacing(build_cad_sr(srcs, [[]])) == []
    srcs[0].ImagerPixelSpacing = [0.1, 0.1]
    assert _library_spacing(build_cad_sr(srcs, [[]])) == pytest.approx([100.0, 100.0])


@pytest.mark.parametrize("keyword", ["PatientID", "IssuerOfPatientID"])
def test_one_study_naming_two_patients_is_refused_without_quoting_them(exam, keyword):
    srcs = headers(exam)
    setattr(srcs[2], keyword, "OTHER-PATIENT-77")
    with pytest.raises(ValueError, match=f"{keyword} of source") as err:
        build_cad_sr(srcs, [[], [], [], []])
    assert srcs[2].SOPInstanceUID in str(err.value)
    assert "OTHER-PATIENT-77" not in str(err.value)
    pid = str(srcs[0].get("PatientID", ""))
    assert pid and pid not in str(err.value)


@pytest.mark.parametrize(
    ("det", "match"),
    [
        ({"label": "cyst", "score": 0.5, "box": [1, 1, 2, 2]}, "label='cyst'"),
        ({"label": MASS, "score": 1.5, "box": [1, 1, 2, 2]}, r"score=1\.5"),
        (
            {"label": MASS, "score": 0.5, "box": [1, 1, 97, 2]},
            "inside the stored image",
        ),
        ({"label": MASS, "score": 0.5, "box": [5, 1, 2, 2]}, "inside the stored image"),
        ({"label": MASS, "score": 0.5, "box": [1, 2]}, r"not \[xmin"),
    ],
)
def test_bad_detections_raise(exam, det, match):
    with pytest.raises(ValueError, match=match):
        build_cad_sr(headers(exam[:1]), [[det]])


def test_bad_inputs_raise(exam):
    srcs = headers(exam)
    with pytest.raises(ValueError, match="4 sources but 3 detection lists"):
        build_cad_sr(srcs, [[], [], []])
    with pytest.raises(ValueError, match="same image"):
        build_cad_sr([srcs[0], srcs[0]], [[], []])
    with pytest.raises(ValueError, match="at least one source"):
        build_cad_sr([], [])
    del srcs[1].SeriesInstanceUID
    with pytest.raises(ValueError, match="source 1 .* lacks SeriesInstanceUID"):
        build_cad_sr(srcs, [[], [], [], []])


def test_zero_area_box_is_left_out_with_a_warning(exam, caplog):
    det = {"label": MASS, "score": 0.5, "box": [0.0, 75.9, 0.0, 77.0]}
    with caplog.at_level(logging.WARNING, logger="client.cad_sr"):
        sr = build_cad_sr(headers(exam[:1]), [[det]])
    assert findings(sr) == []
    assert "zero width or height" in caplog.text and exam[0].path.exists()


def test_right_breast_boxes_stay_in_its_own_orientation(exam):
    rcc = exam[2]
    assert rcc.laterality == "R"
    image = read_dicom(rcc.path, working_spacing_mm=0.2)
    g = image.geometry
    assert g.flip, "the reader mirrors a right breast into model space"
    # a model-space box, mapped back by hand: model x runs from the crop's RIGHT edge
    model_box = np.array([[2.0, 30.0, 6.0, 33.0]])
    x0c, y0c, x1c, _ = g.crop
    sx, sy = g.scale
    manual = [x1c - 6.0 / sx, y0c + 30.0 / sy, x1c - 2.0 / sx, y0c + 33.0 / sy]
    dets = detections_to_stored(
        {"boxes": model_box, "scores": np.array([0.8]), "labels": np.array([0])}, g
    )
    np.testing.assert_allclose(dets[0]["box"], manual, atol=1e-3)
    # the phantom's marker, seen by the model, comes back onto the stored marker
    marker_model = g.to_model(np.array([rcc.marker_box], dtype=float))
    marker = detections_to_stored(
        {"boxes": marker_model, "scores": np.array([0.9]), "labels": np.array([1])}, g
    )
    sr = build_cad_sr(headers([rcc]), [dets + marker])
    boxes = {}
    for sif in findings(sr):
        xy = np.asarray(child(sif, "111041").GraphicData).reshape(-1, 2)
        code = sif.ConceptCodeSequence[0].CodeValue
        boxes[code] = [xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max()]
    np.testing.assert_allclose(boxes["129793001"], manual, atol=1e-3)  # the mass
    np.testing.assert_allclose(boxes["129769006"], rcc.marker_box, atol=1e-3)
    stored = pydicom.dcmread(rcc.path).pixel_array
    mx0, my0, mx1, my1 = rcc.marker_box
    assert mx0 > stored.shape[1] / 2, "right breast: the marker is in the right half"
    assert stored[my0:my1, mx0:mx1].min() > np.median(stored[stored > 0])


@needs_dciodvfy
@pytest.mark.parametrize("empty", [False, True], ids=["findings", "no-findings"])
def test_dciodvfy_accepts_the_sr(tmp_path, exam, empty):
    dets = [[], [], [], []] if empty else DETECTIONS
    path = write_cad_sr(build_cad_sr(headers(exam), dets), tmp_path / "cad.sr.dcm")
    res = run_tool("dciodvfy", str(path))
    out = res.stdout + res.stderr
    assert "MammographyCADSR" in out, out
    assert error_lines(out) == [], out
    # dicom3tools 1.00~20220618 reports no warnings either
    assert [ln for ln in out.splitlines() if ln.startswith("Warning")] == [], out


@needs_dciodvfy
def test_invalid_source_dates_and_ids_do_not_make_the_sr_invalid(
    tmp_path, exam, caplog
):
    """A strict archive rejects a whole SR for one bad value: none is copied.

    Dates with dashes, several values in a one-valued date, a time with
    colons, Study ID and Accession Number longer than SH's 16 characters
    (all seen from real modalities) are written empty or left out, with a
    warning naming them; dciodvfy (dicom3tools) finds no error.
    """
    srcs = headers(exam)
    for ds in srcs:
        with pydicom.config.disable_value_validation():
            ds.StudyDate = "2020-01-31"
            ds.ContentDate = ["20200131", "20200201"]
            ds.StudyTime = "12:30:00"
            ds.StudyID = "X" * 40
            ds.AccessionNumber = "A" * 30
    with caplog.at_level("WARNING", logger="client.cad_sr"):
        sr = build_cad_sr(srcs, DETECTIONS)
    path = write_cad_sr(sr, tmp_path / "cad.sr.dcm")
    out = run_tool("dciodvfy", str(path))
    assert error_lines(out.stdout + out.stderr) == [], out.stdout + out.stderr
    back = pydicom.dcmread(path)
    assert (back.StudyDate, back.StudyTime, back.StudyID, back.AccessionNumber) == (
        "",
        "",
        "",
        "",
    )
    dates = [i.Date for i, _ in walk(back.ContentSequence) if "Date" in i]
    assert dates and set(dates) == {"20200131"}  # ContentDate's first value
    times = [i for i, _ in walk(back.ContentSequence) if "Time" in i]
    # the exam's valid ContentTime stays; the StudyTime with colons is left out
    assert {i.ConceptNameCodeSequence[0].CodeMeaning for i in times} == {"Content Time"}
    for keyword in ("StudyDate", "StudyTime", "StudyID", "AccessionNumber"):
        assert keyword in caplog.text


@needs_dciodvfy
def test_dciodvfy_catches_a_broken_sr(tmp_path, exam):
    sr = build_cad_sr(headers(exam), DETECTIONS)
    del sr.CompletionFlag
    path = write_cad_sr(sr, tmp_path / "bad.sr.dcm")
    res = run_tool("dciodvfy", str(path))
    out = res.stdout + res.stderr
    assert any("CompletionFlag" in ln for ln in error_lines(out)), out


@needs_dsrdump
@pytest.mark.parametrize("empty", [False, True], ids=["findings", "no-findings"])
def test_dsrdump_parses_the_sr(tmp_path, exam, empty):
    dets = [[], [], [], []] if empty else DETECTIONS
    path = write_cad_sr(build_cad_sr(headers(exam), dets), tmp_path / "cad.sr.dcm")
    res = run_tool("dsrdump", str(path))
    assert res.returncode == 0, res.stderr
    problems = [ln for ln in res.stderr.splitlines() if ln != DSRDUMP_TEMPLATE_NOTICE]
    assert problems == [], res.stderr
    assert "Mammography CAD SR Document" in res.stdout
    n = 0 if empty else 4
    assert res.stdout.count('"Single Image Finding"') == n
    assert res.stdout.count("Calcification Cluster") == (0 if empty else 2) + 1
    assert res.stdout.count('"Image Library"') == 1


@needs_dsrdump
def test_dsrdump_refuses_a_wrong_relationship(tmp_path, exam):
    sr = build_cad_sr(headers(exam), DETECTIONS)
    outline = child(findings(sr)[0], "111041")
    outline.ContentSequence[0].RelationshipType = "CONTAINS"  # must be SELECTED FROM
    path = write_cad_sr(sr, tmp_path / "bad.sr.dcm")
    res = run_tool("dsrdump", str(path))
    assert res.returncode != 0
    assert "Invalid by-value Relationship" in res.stderr


def test_a_uid_seed_gives_the_same_sr_uids_for_the_same_exam(exam):
    srcs = headers(exam)
    seeded = [build_cad_sr(srcs, DETECTIONS, uid_seed=["s", "m"]) for _ in range(2)]
    uids = {(sr.SOPInstanceUID, sr.SeriesInstanceUID) for sr in seeded}
    assert len(uids) == 1
    (sop, series) = uids.pop()
    assert sop != series and seeded[0].file_meta.MediaStorageSOPInstanceUID == sop
    other = build_cad_sr(srcs, DETECTIONS, uid_seed=["s", "another model"])
    assert other.SOPInstanceUID != sop
    unseeded = {build_cad_sr(srcs, DETECTIONS).SOPInstanceUID for _ in range(2)}
    assert len(unseeded) == 2 and sop not in unseeded
