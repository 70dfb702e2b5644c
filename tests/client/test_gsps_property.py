"""Property test: whatever display attributes a source header carries, the
presentation state builds and writes, or the builder refuses it with a
ValueError; and the marks are the findings above the floor, boxes unchanged."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from client.gsps import build_exam_gsps, write_gsps
from common.keys import CALCIFICATION, MASS

TEXT = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=12)
NUMBERISH = st.one_of(
    TEXT,
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.integers(-(2**40), 2**40).map(str),
)


def source(rows: int, cols: int, attrs: dict[str, str | None]) -> Dataset:
    """A header whose ``attrs`` are raw text, as a file from outside gives them
    (pydicom converts a raw element when it is read, warning on a bad value)."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Rows, ds.Columns = rows, cols
    for keyword, text in attrs.items():
        if text is None:
            continue
        tag = Tag(tag_for_keyword(keyword))
        raw = text.encode("latin-1")
        raw += b" " * (len(raw) % 2)
        ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)
    return ds


@st.composite
def detection(draw: st.DrawFn, rows: int, cols: int) -> dict[str, object]:
    x0 = draw(st.floats(0, cols))
    y0 = draw(st.floats(0, rows))
    return {
        "label": draw(st.sampled_from([MASS, CALCIFICATION])),
        "score": draw(st.floats(0, 1)),
        "box": [x0, y0, draw(st.floats(x0, cols)), draw(st.floats(y0, rows))],
    }


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_any_display_header_gives_a_state_or_a_value_error(
    tmp_path: Path, data: st.DataObject
) -> None:
    rows, cols = data.draw(st.integers(1, 5000)), data.draw(st.integers(1, 5000))
    attrs: dict[str, str | None] = {
        k: data.draw(st.one_of(st.none(), NUMBERISH))
        for k in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept")
    }
    attrs["PhotometricInterpretation"] = data.draw(
        st.one_of(st.none(), st.sampled_from(["MONOCHROME1", "MONOCHROME2"]), TEXT)
    )
    attrs["PixelAspectRatio"] = data.draw(
        st.one_of(st.none(), st.lists(NUMBERISH, min_size=1, max_size=3).map("\\".join))
    )
    attrs["ImageLaterality"] = data.draw(st.one_of(st.none(), TEXT))
    attrs["RescaleType"] = data.draw(st.one_of(st.none(), TEXT))
    src = source(rows, cols, attrs)
    dets = data.draw(st.lists(detection(rows, cols), max_size=5))
    floor = data.draw(st.floats(0, 1))
    (ps,) = build_exam_gsps([src], [dets], score_floor=floor)
    path = write_gsps(ps, tmp_path / "p.pr.dcm")
    back = pydicom.dcmread(path)
    assert back.PresentationLUTShape in ("IDENTITY", "INVERSE")
    assert back.Laterality in ("", "L", "R")
    (voi,) = back.SoftcopyVOILUTSequence
    assert float(voi.WindowWidth) >= 1  # never a zero or negative window
    # every decimal string written fits DS (16 characters at most)
    for keyword in ("WindowCenter", "WindowWidth"):
        assert len(str(voi[keyword].value)) <= 16, voi[keyword]
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        if keyword in back:
            assert len(str(back[keyword].value)) <= 16, back[keyword]
    drawn = [
        list(g.GraphicData)
        for item in back.GraphicAnnotationSequence
        for g in item.get("GraphicObjectSequence", [])
    ]
    want = [
        d["box"]
        for d in dets
        if d["score"] >= floor  # type: ignore[operator]
        and d["box"][2] > d["box"][0]  # type: ignore[index]
        and d["box"][3] > d["box"][1]  # type: ignore[index]
    ]
    assert len(drawn) == len(want)


#: Header attributes both derived objects read or copy, and raw values seen
#: from modalities or made up to hurt (too long, wrong VR, several values...).
KEYWORDS = (
    "ImageLaterality", "Laterality", "ViewPosition", "PatientOrientation",
    "ContentDate", "ContentTime", "StudyDate", "StudyTime", "PixelSpacing",
    "ImagerPixelSpacing", "PatientName", "PatientID", "AccessionNumber", "StudyID",
    "SpecificCharacterSet", "PixelAspectRatio", "WindowCenter", "WindowWidth",
    "BitsStored", "PixelRepresentation", "PatientBirthDate", "PatientSex",
    "ReferringPhysicianName", "IssuerOfPatientID", "PhotometricInterpretation",
    "RescaleSlope", "VOILUTFunction",
)  # fmt: skip
RAW = st.one_of(
    st.sampled_from(["INF", "nan", "-1", "1e400", "\\\\", "1\\2\\3", "L", "R",
                     "MLO", "20250101", "12:30", "ISO_IR 192", ".", "1.5", "X" * 70]),
    st.binary(max_size=12).map(lambda b: b.decode("latin-1")),
)  # fmt: skip


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_any_header_gives_both_objects_or_a_value_error(
    tmp_path: Path, data: st.DataObject
) -> None:
    """Whatever raw values these header attributes hold, the CAD SR and the
    presentation state are built and written, or refused with a ValueError."""
    from client.cad_sr import build_cad_sr, write_cad_sr

    keys = data.draw(st.lists(st.sampled_from(KEYWORDS), unique=True, max_size=8))
    src = source(100, 80, {k: data.draw(RAW) for k in keys})
    dets = [[{"label": MASS, "score": 0.5, "box": [1.0, 1.0, 5.0, 5.0]}]]
    try:
        write_cad_sr(build_cad_sr([src], dets), tmp_path / "x.sr.dcm")
    except ValueError:
        pass
    try:
        (ps,) = build_exam_gsps([src], dets)
    except ValueError:
        return
    back = pydicom.dcmread(write_gsps(ps, tmp_path / "x.pr.dcm"))
    assert len(back.GraphicAnnotationSequence) == 2  # the mass and the INFO line
