"""Ingest of site tables with rows that would silently mislead: a research
image without a patient id, and repeated or contradictory annotation rows."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from client.ingest import ingest_site, read_images_csv
from common.config.site import SiteConfig
from common.imaging.cache import SiteCache

from .conftest import write_csv

HEADER = ["image", "patient_id", "laterality", "view", "spacing_mm"]


def test_empty_patient_id_is_kept_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    p = write_csv(
        tmp_path / "images.csv",
        HEADER,
        [["a.png", "W1", "L", "MLO", "0.2"], ["b.png", "", "R", "MLO", "0.2"],
         ["c.png", "  ", "R", "CC", "0.2"]],
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        rows, skips = read_images_csv(p)
    assert list(rows) == ["a.png", "b.png", "c.png"]  # rows kept
    assert rows["b.png"].patient_id is None and rows["b.png"].spacing_mm == 0.2
    assert {(s.row, s.field, s.value) for s in skips} == {
        (3, "patient_id", ""), (4, "patient_id", ""),
    }  # fmt: skip
    assert all(s.file == str(p) and "its own patient" in s.reason for s in skips)
    assert any(
        "images.csv row 3: patient_id='': empty" in r.getMessage()
        for r in caplog.records
    )


def test_missing_patient_id_column_is_said_once(tmp_path: Path) -> None:
    p = write_csv(
        tmp_path / "images.csv",
        ["image", "spacing_mm"],
        [["a.png", "0.2"], ["b.png", "0.2"]],
    )
    rows, skips = read_images_csv(p)
    assert list(rows) == ["a.png", "b.png"]
    assert [(s.row, s.field, s.value) for s in skips] == [(1, "patient_id", "(column)")]
    # a header without rows says nothing
    empty = write_csv(tmp_path / "empty.csv", ["image"], [])
    assert read_images_csv(empty) == ({}, [])


def test_ingest_reports_patient_id_and_repeated_rows(
    synthetic_site: Path, tmp_path: Path
) -> None:
    write_csv(
        synthetic_site / "images.csv",
        HEADER,
        [["research/a.png", "W1", "L", "MLO", "0.2"],
         ["research/b.png", "", "R", "MLO", "0.2"]],
    )  # fmt: skip
    with open(synthetic_site / "annotations.csv", "a", newline="") as fh:
        fh.write("p1/l_cc.dcm,mass,10,60,30,80\n")  # row 10 repeats row 2
        fh.write("p1/r_cc.dcm,mass,10,60,30,80\n")  # beside its 'none' row 3
    cache = tmp_path / "cache"
    res = ingest_site(synthetic_site, cache, SiteConfig(), workers=1)
    by = {(Path(s.file).name, s.row, s.field) for s in res.annotation_skips}
    assert ("images.csv", 3, "patient_id") in by
    assert ("annotations.csv", 10, "image") in by
    assert ("annotations.csv", 3, "finding") in by
    report = json.loads((cache / "ingest_report.json").read_text())
    assert any("duplicate skipped" in json.dumps(s) for s in report.values())
    keys = {e.source: e.key for e in res.entries}
    targets = SiteCache(cache).read_annotations()
    assert len(targets[keys["p1/l_cc.dcm"]].boxes) == 1  # one lesion, one box
    assert targets[keys["p1/r_cc.dcm"]].has_lesion


def test_a_broken_link_or_a_fifo_among_the_images_is_named_not_read(tmp_path, caplog):
    """find_candidates (ingest's and predict's walk) passes over a broken
    symlink and a FIFO named like images with a warning naming each; opening
    the FIFO would block."""
    import logging
    import os

    from client.ingest import find_candidates

    site = tmp_path / "site"
    site.mkdir()
    (site / "real.dcm").write_bytes(b"\0" * 132)
    (site / "gone.dcm").symlink_to(tmp_path / "nowhere.dcm")
    os.mkfifo(site / "pipe.dcm")
    with caplog.at_level(logging.WARNING):
        found = find_candidates(site)
    assert [p.name for p in found] == ["real.dcm"]
    assert f"{site / 'gone.dcm'}: a broken link: skipped" in caplog.text
    assert f"{site / 'pipe.dcm'}: not a regular file" in caplog.text
