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
    assert len(s.skipped) == 1
    sk = s.skipped[0]
    assert (sk.file, sk.row, sk.field, sk.value) == (str(p), 3, field, value)
    assert str(p) in caplog.text and "row 3" in caplog.text


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
    assert {sk.field for sk in s.skipped} == {"bbox", "image_id"}
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
