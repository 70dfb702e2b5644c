"""annotations.csv / COCO parsing, broken rows, mapping to model space."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.config.site import SiteConfig
from common.errors import AnnotationError
from common.imaging.annotations import (
    match_annotations,
    read_annotations_csv,
    read_coco_json,
    read_site_annotations,
)
from common.imaging.geometry import Geometry

MAP = SiteConfig(findings={"masse": "mass"}).finding_kind


def _csv(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "annotations.csv"
    p.write_text("image,finding,xmin,ymin,xmax,ymax\n" + body)
    return p


def test_good_rows_weak_and_normal(tmp_path: Path) -> None:
    p = _csv(
        tmp_path,
        "a.dcm,mass,1,2,10,20\n"
        "a.dcm,CALC,3,4,5,6\n"
        "./sub\\b.dcm,none,,,,\n"
        "c.dcm,Masse,,,,\n"
        "1.2.3.4,ARCH,0,0,4,4\n",
    )
    s = read_annotations_csv(p, MAP)
    assert s.skipped == []
    assert set(s.images) == {"a.dcm", "sub/b.dcm", "c.dcm", "1.2.3.4"}
    a = s.images["a.dcm"]
    assert [f.kind for f in a.findings] == ["mass", "calcification"]
    assert a.findings[0].box == (1.0, 2.0, 10.0, 20.0) and a.findings[0].row == 2
    assert s.images["sub/b.dcm"].normal and not s.images["sub/b.dcm"].weak
    assert s.images["c.dcm"].weak  # image-level label kept
    assert s.images["1.2.3.4"].findings[0].kind == "ignore"


@pytest.mark.parametrize(
    ("row", "field", "value"),
    [
        ("a.dcm,mass,x,2,10,20", "xmin", "x"),
        ("a.dcm,mass,1,2,nan,20", "xmax", "nan"),
        ("a.dcm,mass,10,2,10,20", "xmin", "10"),
        ("a.dcm,mass,1,30,10,20", "ymin", "30"),
        ("a.dcm,tumour,1,2,10,20", "finding", "tumour"),
        ("a.dcm,,1,2,10,20", "finding", ""),
        ("a.dcm,mass,1,2,,20", "xmax", ""),
        ("a.dcm,none,1,2,10,20", "finding", "none"),
        (",mass,1,2,10,20", "image", ""),
    ],
)
def test_broken_row_is_skipped_naming_row_field_value(
    tmp_path: Path, row: str, field: str, value: str, caplog: pytest.LogCaptureFixture
) -> None:
    p = _csv(tmp_path, "ok.dcm,mass,1,2,3,4\n" + row + "\n")
    s = read_annotations_csv(p, MAP)
    assert list(s.images) == ["ok.dcm"]  # the good row is kept
    sk = s.skipped[0]
    assert (sk.file, sk.row, sk.field, sk.value) == (str(p), 3, field, value)
    assert str(p) in caplog.text and "row 3" in caplog.text
    # a.dcm had no other row: it is left unlabeled, and the log says why
    assert [(k.field, k.value) for k in s.skipped[1:]] == (
        [("image", "a.dcm")] if row.startswith("a.dcm") else []
    )


@pytest.mark.parametrize("fmt", ["csv", "coco"])
def test_a_skipped_row_beside_none_or_lesions_claims_no_more_than_is_known(
    tmp_path: Path, fmt: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A skipped row may have been a lesion: beside a 'none' row the image is
    not normal (unlabeled), beside a kept lesion the image gets no box
    supervision (weak), so the lost lesion is never learned as background."""
    if fmt == "csv":
        p = _csv(
            tmp_path,
            "n.dcm,none,,,,\n"
            "n.dcm,mass,1,2,nan,20\n"  # row 3: skipped
            "l.dcm,mass,1,2,10,20\n"
            "l.dcm,tumour,30,30,40,40\n"  # row 5: skipped
            "ok.dcm,none,,,,\n",
        )
        s = read_annotations_csv(p, MAP)
        rows = {"n.dcm": 3, "l.dcm": 5}
    else:
        p = _coco(
            tmp_path,
            [
                {"id": 1, "file_name": "n.dcm"},
                {"id": 2, "file_name": "l.dcm"},
                {"id": 3, "file_name": "ok.dcm"},
            ],
            [
                {"image_id": 1, "category_id": 5},  # none
                {"image_id": 1, "category_id": 1, "bbox": [1, 1, 0, 5]},  # skipped
                {"image_id": 2, "category_id": 1, "bbox": [1, 2, 9, 18]},
                {"image_id": 2, "category_id": 7, "bbox": [30, 30, 10, 10]},  # skipped
                {"image_id": 3, "category_id": 5},
            ],
            [
                {"id": 1, "name": "mass"},
                {"id": 5, "name": "none"},
                {"id": 7, "name": "tumour"},
            ],
        )
        s = read_coco_json(p, MAP)
        rows = {"n.dcm": 1, "l.dcm": 3}
    assert "n.dcm" not in s.images  # not normal: unlabeled
    assert s.images["ok.dcm"].normal
    said = {k.value: k for k in s.skipped if k.field == "image"}
    assert set(said) == {"n.dcm", "l.dcm"}
    assert "left unlabeled" in said["n.dcm"].reason
    assert "weak" in said["l.dcm"].reason
    assert {v: k.row for v, k in said.items()} == rows
    geom = Geometry.identity((64, 64))
    targets, _ = match_annotations(
        s, [(k, k, None, geom) for k in ("n.dcm", "l.dcm", "ok.dcm")]
    )
    assert not targets["n.dcm"].labeled
    lesion = targets["l.dcm"]
    assert lesion.labeled and lesion.weak and lesion.has_lesion
    assert len(lesion.boxes) == 1  # the readable lesion is still there
    assert targets["ok.dcm"].labeled and not targets["ok.dcm"].weak


def test_missing_column_raises(tmp_path: Path) -> None:
    p = tmp_path / "annotations.csv"
    p.write_text("image,label,xmin,ymin,xmax,ymax\na,mass,1,2,3,4\n")
    with pytest.raises(AnnotationError, match="finding"):
        read_annotations_csv(p, MAP)


def test_coco_input(tmp_path: Path) -> None:
    coco = {
        "images": [
            {"id": 1, "file_name": "a.dcm"},
            {"id": 2, "file_name": "b.dcm"},
            {"id": 3, "file_name": "c.dcm"},
        ],
        "categories": [{"id": 7, "name": "mass"}, {"id": 8, "name": "CALC"}],
        "annotations": [
            {"image_id": 1, "category_id": 7, "bbox": [10, 20, 5, 6]},
            {"image_id": 2, "category_id": 8},
            {"image_id": 1, "category_id": 7, "bbox": [1, 1, 0, 5]},
            {"image_id": 9, "category_id": 7, "bbox": [1, 1, 2, 2]},
        ],
    }
    p = tmp_path / "annotations.json"
    p.write_text(json.dumps(coco))
    s = read_coco_json(p, MAP)
    assert s.images["a.dcm"].findings[0].box == (10.0, 20.0, 15.0, 26.0)
    assert s.images["b.dcm"].weak
    assert s.images["c.dcm"].normal  # listed without annotations
    assert s.images["a.dcm"].weak  # its second mass was skipped: no box supervision
    assert {sk.field for sk in s.skipped} == {"bbox", "image_id", "image"}
    assert read_site_annotations(tmp_path, MAP) is not None
    (tmp_path / "annotations.json").write_text("{not json")
    with pytest.raises(AnnotationError):
        read_site_annotations(tmp_path, MAP)


def test_match_maps_to_model_space_and_flags_unknown(tmp_path: Path) -> None:
    p = _csv(
        tmp_path,
        "a.png,mass,20,10,40,30\n"
        "a.png,ignore,0,0,10,10\n"
        "1.2.3,calcification,5,5,9,9\n"
        "b.png,mass,500,500,600,600\n"
        "nobody.png,mass,1,1,2,2\n",
    )
    s = read_annotations_csv(p, MAP)
    geom = Geometry((100, 80), (0, 0, 60, 100), True, (50, 30))  # crop, flip, scale 0.5
    entries = [
        ("ka", "a.png", None, geom),
        ("kb", "b.png", None, Geometry.identity((100, 80))),
        ("kc", "c.dcm", "1.2.3", Geometry.identity((100, 80))),
        ("kd", "d.png", None, Geometry.identity((100, 80))),
    ]
    targets, skips = match_annotations(s, entries)
    a = targets["ka"]
    np.testing.assert_allclose(a.boxes, [[10.0, 5.0, 20.0, 15.0]])  # (60-40)/2 ...
    np.testing.assert_allclose(a.boxes, geom.to_model(np.asarray(a.boxes_stored)))
    np.testing.assert_allclose(a.ignore, [[25.0, 0.0, 30.0, 5.0]])
    assert a.labels == [0] and a.labeled and a.has_lesion and not a.weak
    assert targets["kc"].labels == [1]  # matched by SOPInstanceUID
    # box outside the image: dropped with a reason, image no longer box-supervised
    assert targets["kb"].boxes == [] and targets["kb"].weak
    assert not targets["kd"].labeled
    reasons = {sk.field: sk for sk in skips}
    assert reasons["image"].value == "nobody.png" and reasons["image"].row == 6
    assert "outside" in reasons["box"].reason
    none_targets, none_skips = match_annotations(None, entries)
    assert not any(t.labeled for t in none_targets.values()) and none_skips == []


# --- hostile / ambiguous input ------------------------------------------------


def _coco(tmp_path: Path, images: list, anns: list, cats: list | None = None) -> Path:
    cats = [{"id": 1, "name": "mass"}] if cats is None else cats
    p = tmp_path / "annotations.json"
    p.write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats})
    )
    return p


def test_coco_image_whose_annotations_were_skipped_is_not_normal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    p = _coco(
        tmp_path,
        [
            {"id": 1, "file_name": "a.dcm"},
            {"id": 2, "file_name": "b.dcm"},
            {"id": 3, "file_name": "c.dcm"},
            {"id": 4, "file_name": "d.dcm"},
        ],
        [
            {"image_id": 1, "category_id": 7, "bbox": [10, 10, 50, 50]},
            {"image_id": 3, "category_id": 1, "bbox": [1, 1, 0, 5]},
            {"image_id": "4", "category_id": 1, "bbox": [1, 1, 5, 5]},  # "4" != 4
        ],
        [{"id": 7, "name": "MASSE_UNMAPPED"}, {"id": 1, "name": "mass"}],
    )
    s = read_coco_json(p, MAP)
    assert list(s.images) == ["b.dcm"]  # a, c, d: unlabeled, not normal
    assert s.images["b.dcm"].normal  # listed without annotations: still normal
    left = {sk.value: sk for sk in s.skipped if sk.field == "image"}
    assert set(left) == {"a.dcm", "c.dcm", "d.dcm"}
    assert "not marked normal" in left["a.dcm"].reason and left["a.dcm"].row == 0
    assert "a.dcm" in caplog.text
    targets, _ = match_annotations(
        s, [("ka", "a.dcm", None, Geometry.identity((9, 9)))]
    )
    assert not targets["ka"].labeled


@pytest.mark.parametrize(
    ("images", "anns", "field", "value"),
    [
        ([{"id": [1], "file_name": "a.dcm"}], [], "images", "[1]"),
        ([{"id": True, "file_name": "a.dcm"}], [], "images", "True"),
        ([{"id": 1, "file_name": ["a"]}], [], "images", "['a']"),
        ([], [{"image_id": [1], "category_id": 1}], "image_id", "[1]"),
        ([], [{"image_id": 9, "category_id": {}}], "category_id", "{}"),
        ([], [{"image_id": 9, "category_id": True}], "category_id", "True"),
        ([], [{"image_id": 9, "category_id": 1, "bbox": [True, 1, 5, 5]}], "bbox", ""),
        (
            [],
            [{"image_id": 9, "category_id": 1, "bbox": [1e308, 1, 1e308, 5]}],
            "bbox",
            "",
        ),
    ],
)
def test_coco_wrong_types_are_skipped_naming_them(
    tmp_path: Path, images: list, anns: list, field: str, value: str
) -> None:
    good = {"id": 9, "file_name": "ok.dcm"}
    p = _coco(tmp_path, [good, *images], [{"image_id": 9, "category_id": 1}, *anns])
    s = read_coco_json(p, MAP)
    assert s.images["ok.dcm"].findings[0].kind == "mass"  # the rest is kept
    sk = next(sk for sk in s.skipped if sk.field == field)
    assert sk.file == str(p) and value in sk.value
    assert all(f.box is None for a in s.images.values() for f in a.findings)


def test_coco_integer_too_large_for_float_is_skipped(tmp_path: Path) -> None:
    p = tmp_path / "annotations.json"
    big = "1" + "0" * 400
    p.write_text(
        '{"images":[{"id":1,"file_name":"a.dcm"}],"categories":[{"id":1,"name":"mass"}],'
        '"annotations":[{"image_id":1,"category_id":1,"bbox":[0,0,' + big + ",5]}]}"
    )
    s = read_coco_json(p, MAP)
    assert "a.dcm" not in s.images  # not normal either
    assert [sk.field for sk in s.skipped] == ["bbox", "image"]
    assert big in s.skipped[0].value


def test_deeply_nested_json_is_an_annotation_error(tmp_path: Path) -> None:
    p = tmp_path / "annotations.json"
    n = 200_000
    p.write_text(
        '{"images":' + "[" * n + "]" * n + ',"annotations":[],"categories":[]}'
    )
    with pytest.raises(AnnotationError, match=str(p)):
        read_coco_json(p, MAP)


def test_coco_repeated_image_id_skips_the_second_entry(tmp_path: Path) -> None:
    p = _coco(
        tmp_path,
        [{"id": 1, "file_name": "a.dcm"}, {"id": 1, "file_name": "b.dcm"}],
        [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 5, 5]}],
    )
    s = read_coco_json(p, MAP)
    assert list(s.images) == ["a.dcm"]  # the lesion stays on the first file
    (sk,) = s.skipped
    assert (sk.row, sk.field) == (1, "images") and "b.dcm" in sk.value
    assert "repeated" in sk.reason


def test_coco_repeated_category_id_refuses_the_file(tmp_path: Path) -> None:
    images = [{"id": 1, "file_name": "a.dcm"}]
    anns = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 5, 5]}]
    cats = [{"id": 1, "name": "mass"}, {"id": 1, "name": "calcification"}]
    p = _coco(tmp_path, images, anns, cats)
    with pytest.raises(
        AnnotationError, match=r"category id 1 .*'mass'.*'calcification'"
    ):
        read_coco_json(p, MAP)
    same = _coco(tmp_path, images, anns, [cats[0], cats[0]])  # harmless repeat
    assert read_coco_json(same, MAP).images["a.dcm"].findings[0].kind == "mass"


def test_csv_field_over_the_limit_is_an_annotation_error(tmp_path: Path) -> None:
    p = _csv(
        tmp_path, "a.dcm,mass,1,1,5,5\n" + '"' + "x" * 200_000 + '",mass,1,1,5,5\n'
    )
    with pytest.raises(AnnotationError, match=r"annotations\.csv.*line 3"):
        read_annotations_csv(p, MAP)


def test_csv_repeated_column_is_an_annotation_error(tmp_path: Path) -> None:
    p = tmp_path / "annotations.csv"
    p.write_text("image,finding,xmin,ymin,xmax,ymax,xmin\na.dcm,mass,1,1,5,5,0\n")
    with pytest.raises(AnnotationError, match="'xmin' twice"):
        read_annotations_csv(p, MAP)
    p.write_text("image,finding,xmin,ymin,xmax,ymax,,\na.dcm,mass,1,1,5,5,,\n")
    assert read_annotations_csv(p, MAP).images["a.dcm"].findings  # empty names: ok


def test_broken_annotation_file_fails_ingest_with_a_report(tmp_path: Path) -> None:
    from client.ingest import ingest_site
    from common.errors import MammofedError

    site, cache = tmp_path / "site", tmp_path / "cache"
    site.mkdir()
    n = 200_000
    (site / "annotations.json").write_text("[" * n + "]" * n)
    with pytest.raises(MammofedError, match="annotations.json"):
        ingest_site(site, cache, SiteConfig(), workers=1)
    report = json.loads((cache / "ingest_report.json").read_text())
    assert report["status"] == "failed" and "annotations.json" in report["error"]


def test_box_clipping_tolerance_warning_and_refusal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    p = _csv(
        tmp_path,
        "a.png,mass,-1e9,-1e9,79.5,99.5\n"  # almost all outside: refused
        "b.png,mass,70,90,4000,4000\n"  # idem
        "c.png,mass,-1,-1.5,81,101\n"  # overhang <= 2 px: rounding, silent
        "d.png,calcification,60,80,90,105\n"  # 10 px over, 47% outside: kept, warned
        "e.png,ignore,70,90,4000,4000\n",  # ignore region: clipped, warned, kept
    )
    s = read_annotations_csv(p, MAP)
    g = Geometry.identity((100, 80))
    entries = [(k, f"{k}.png", None, g) for k in "abcde"]
    t, skips = match_annotations(s, entries)
    for k in "ab":  # refused like a box entirely outside: lesion kept, image-level
        assert t[k].boxes == [] and t[k].weak and t[k].has_lesion
    assert t["c"].boxes_stored == [[0.0, 0.0, 80.0, 100.0]] and not t["c"].weak
    assert t["d"].boxes_stored == [[60.0, 80.0, 80.0, 100.0]] and not t["d"].weak
    assert t["e"].ignore_stored == [[70.0, 90.0, 80.0, 100.0]] and not t["e"].weak
    by_file = {sk.file.rsplit("[", 1)[1].rstrip("]"): sk for sk in skips}
    assert set(by_file) == {"a.png", "b.png", "d.png", "e.png"}  # c: silent
    assert by_file["b.png"].row == 3 and "outside" in by_file["b.png"].reason
    assert by_file["b.png"].value == "[70.0, 90.0, 4000.0, 4000.0]"
    assert "kept, clipped" in by_file["d.png"].reason and by_file["d.png"].row == 5
    assert "[70.0, 90.0, 4000.0, 4000.0]" in caplog.text
