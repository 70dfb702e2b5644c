"""Annotation rows that would count wrong: an exact repeat of a row (one lesion
counted twice) and a ``none`` row beside a lesion (contradictory labels) are
skipped with a warning naming both rows; the rest is kept."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from common.config.site import SiteConfig
from common.imaging.annotations import (
    match_annotations,
    read_annotations_csv,
    read_coco_json,
)
from common.imaging.geometry import Geometry

MAP = SiteConfig(findings={"masse": "mass"}).finding_kind
LOGGER = "common.imaging.annotations"
GEOM = Geometry.identity((100, 80))


def _csv(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "annotations.csv"
    p.write_text("image,finding,xmin,ymin,xmax,ymax\n" + body)
    return p


def test_repeated_csv_row_is_one_box_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    p = _csv(
        tmp_path,
        "a.png,mass,1,2,10,20\n"
        "a.png,mass,1.0,2,10,20.0\n"  # the same box written otherwise
        "a.png,masse,1,2,10,20\n"  # a site word for the same kind
        "a.png,calcification,1,2,10,20\n"  # another kind: a second finding
        "a.png,mass,1,2,10,21\n"  # another box: a second lesion
        "b.png,mass,,,,\n"
        "b.png,mass,,,,\n"  # a repeated image-level label
        "c.png,none,,,,\n"
        "c.png,none,,,,\n",
    )
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        s = read_annotations_csv(p, MAP)
    a = s.images["a.png"].findings
    assert [(f.kind, f.row) for f in a] == [
        ("mass", 2), ("calcification", 5), ("mass", 6),
    ]  # fmt: skip
    assert [f.row for f in s.images["b.png"].findings] == [7]
    assert [f.row for f in s.images["c.png"].findings] == [9]
    assert s.images["c.png"].normal and not s.images["b.png"].normal
    assert {(sk.row, sk.field, sk.value) for sk in s.skipped} == {
        (3, "image", "a.png"), (4, "image", "a.png"), (8, "image", "b.png"),
        (10, "image", "c.png"),
    }  # fmt: skip
    assert any(
        "annotations.csv row 3: image='a.png': repeats row 2 (same finding 'mass', "
        "box (1, 2, 10, 20)): duplicate skipped" in r.getMessage()
        for r in caplog.records
    )
    # one ground-truth box per lesion reaches the cache targets
    targets, _ = match_annotations(s, [("ka", "a.png", None, GEOM)])
    assert targets["ka"].labels == [0, 1, 0] and not targets["ka"].weak


@pytest.mark.parametrize("none_first", [True, False])
def test_none_row_beside_a_lesion_is_skipped_lesion_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, none_first: bool
) -> None:
    rows = ["a.png,none,,,,", "a.png,mass,1,2,10,20"]
    if not none_first:
        rows.reverse()
    p = _csv(tmp_path, "\n".join(rows) + "\nb.png,none,,,,\n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        s = read_annotations_csv(p, MAP)
    none_row, mass_row = (2, 3) if none_first else (3, 2)
    assert [(f.kind, f.row) for f in s.images["a.png"].findings] == [("mass", mass_row)]
    assert s.images["b.png"].normal
    (sk,) = s.skipped
    assert (sk.row, sk.field, sk.value) == (none_row, "finding", "none")
    assert f"contradicts the mass of row {mass_row}" in sk.reason
    assert "the lesion is kept" in sk.reason
    assert any(f"row {none_row}: finding='none'" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def test_none_beside_an_ignore_region_is_kept(tmp_path: Path) -> None:
    # an ignore region (a marker, a clip) in a normal image is no contradiction
    s = read_annotations_csv(
        _csv(tmp_path, "a.png,none,,,,\na.png,ignore,0,0,5,5\n"), MAP
    )
    assert s.skipped == [] and [f.kind for f in s.images["a.png"].findings] == [
        "none", "ignore",
    ]  # fmt: skip


def test_skipped_row_and_repeat_together(tmp_path: Path) -> None:
    # the repeat is no lost lesion: the image stays box-supervised; a broken
    # row of the same image still makes it weak
    s = read_annotations_csv(
        _csv(tmp_path, "a.png,mass,1,2,10,20\na.png,mass,1,2,10,20\n"), MAP
    )
    assert not s.images["a.png"].weak
    s = read_annotations_csv(
        _csv(
            tmp_path,
            "a.png,none,,,,\na.png,mass,1,2,10,20\na.png,mass,1,2,10,20\n"
            "a.png,mass,x,2,10,20\n",
        ),
        MAP,
    )
    assert [f.kind for f in s.images["a.png"].findings] == ["mass", "ignore"]
    assert [sk.row for sk in s.skipped] == [5, 4, 2, 5]


def test_coco_repeat_and_contradiction(tmp_path: Path) -> None:
    p = tmp_path / "annotations.json"
    p.write_text(
        json.dumps(
            {
                "images": [
                    {"id": 1, "file_name": "a.png"},
                    {"id": 2, "file_name": "b.png"},
                ],
                "categories": [{"id": 7, "name": "mass"}, {"id": 8, "name": "none"}],
                "annotations": [
                    {"image_id": 1, "category_id": 7, "bbox": [1, 2, 9, 18]},
                    {"image_id": 1, "category_id": 7, "bbox": [1, 2, 9, 18]},
                    {"image_id": 2, "category_id": 8},
                    {"image_id": 2, "category_id": 7},
                ],
            }
        )
    )
    s = read_coco_json(p, MAP)
    assert [f.row for f in s.images["a.png"].findings] == [0]
    assert [(f.kind, f.row) for f in s.images["b.png"].findings] == [("mass", 3)]
    assert {(sk.row, sk.field) for sk in s.skipped} == {(1, "image"), (2, "finding")}


def test_rows_by_path_and_by_uid_are_checked_together(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    p = _csv(
        tmp_path,
        "a.dcm,mass,1,2,10,20\n"
        "1.2.3,mass,1,2,10,20\n"  # the same image by SOPInstanceUID, same lesion
        "b.dcm,none,,,,\n"
        "4.5.6,calcification,1,2,10,20\n",  # b.dcm by UID: not normal
    )
    s = read_annotations_csv(p, MAP)
    assert s.skipped == []
    entries = [("ka", "a.dcm", "1.2.3", GEOM), ("kb", "b.dcm", "4.5.6", GEOM)]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        targets, skips = match_annotations(s, entries)
    assert targets["ka"].labels == [0] and len(targets["ka"].boxes) == 1
    assert targets["kb"].labels == [1] and targets["kb"].has_lesion
    assert {(sk.row, sk.field) for sk in skips} == {(3, "image"), (4, "finding")}
