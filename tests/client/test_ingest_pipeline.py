"""Ingest of a small synthetic site: skips, cache reuse, changes, manifest, CLI."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from client.cli import main as client_main
from client.ingest import find_candidates, ingest_site, read_images_csv, read_split_csv
from common.config.site import SiteConfig
from common.errors import MammofedError
from common.imaging.cache import SiteCache
from common.keys import MANIFEST_COLUMNS

from .conftest import write_csv, write_dicom


def _manifest(cache: Path) -> list[dict[str, str]]:
    with open(cache / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_ingest_synthetic_site(
    synthetic_site: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="client.ingest"):
        res = ingest_site(synthetic_site, cache, SiteConfig(), workers=1)
    # progress: the last decode line says every file is done
    progress = [m for m in caplog.messages if m.startswith("decoded ")]
    assert progress and progress[-1].startswith("decoded 7/7 files (")
    assert progress[-1].endswith("; done)")
    sources = sorted(e.source for e in res.entries)
    assert sources == [
        "p1/l_cc.dcm", "p1/r_cc.dcm", "p2/l_mlo.dcm", "p2/r_mlo.dcm",
        "research/a.png", "research/b.png",
    ]  # fmt: skip
    # the corrupt file is skipped with a reason; the text file is passed over quietly
    assert [s["file"] for s in res.skipped] == ["broken.dcm"]
    assert res.skipped[0]["reason"]
    assert not any("notes.txt" in s["file"] for s in res.skipped)

    rows = _manifest(cache)
    with open(cache / "manifest.csv", newline="") as fh:
        assert tuple(next(csv.reader(fh))) == MANIFEST_COLUMNS
    by_src = {r["source"]: r for r in rows}
    assert by_src["p2/l_mlo.dcm"]["manufacturer"] == "OtherCo"
    assert by_src["research/a.png"]["patient_id"] == "W1"
    assert by_src["research/b.png"]["laterality"] == "R"
    assert by_src["p1/l_cc.dcm"]["labeled"] == "1"
    assert by_src["p2/r_mlo.dcm"]["labeled"] == "0"  # its only row was broken

    report = json.loads((cache / "ingest_report.json").read_text())
    assert {d["file"] for d in report["ingested"]} == set(sources)
    for d in report["ingested"]:
        assert {"file", "manufacturer", "laterality", "view", "spacing_mm"} <= set(d)
    assert report["skipped"][0]["file"] == "broken.dcm"
    # broken annotation rows are reported with file, row, field and value
    ann_sk = report["annotation_skipped"]
    fields = {(s["row"], s["field"], s["value"]) for s in ann_sk}
    assert (7, "xmin", "50") in fields
    assert (9, "finding", "tumour") in fields
    assert any(s["field"] == "image" and s["value"] == "ghost.dcm" for s in ann_sk)
    assert (cache / "resolved_config.yaml").is_file()

    # annotations in both spaces, mapped with the stored geometry
    c = SiteCache(cache)
    targets = c.read_annotations()
    key = {e.source: e.key for e in res.entries}
    t = targets[key["p1/l_cc.dcm"]]
    assert t.labeled and not t.weak and t.labels == [0]
    assert t.boxes_stored == [[10.0, 60.0, 30.0, 80.0]]
    geom = c.read_entry(key["p1/l_cc.dcm"]).geometry
    np.testing.assert_allclose(t.boxes, geom.to_model(np.asarray(t.boxes_stored)))
    assert targets[key["p2/l_mlo.dcm"]].weak
    assert targets[key["research/a.png"]].ignore_stored == [[5.0, 20.0, 25.0, 40.0]]
    assert not targets[key["research/b.png"]].labeled
    # pixels in the cache are model space and match the geometry
    px = c.load_pixels(key["p1/l_cc.dcm"])
    assert px.shape == geom.model_shape and 0.0 <= px.min() and px.max() <= 1.0


def test_a_new_pixel_dtype_is_honoured_without_force(
    synthetic_site: Path, tmp_path: Path
) -> None:
    """Entries stored as another dtype are decoded again (were kept as they were)."""
    cache = tmp_path / "cache"
    first = ingest_site(synthetic_site, cache, SiteConfig(), workers=1)
    c = SiteCache(cache)
    assert {c.stored_dtype(k) for k in first.new} == {"uint16"}
    assert {e.pixel_dtype for e in first.entries} == {"uint16"}
    # an entry written before the field existed: judged by its array's header
    legacy = c.entry_path(first.new[0])
    doc = json.loads(legacy.read_text())
    del doc["pixel_dtype"]
    legacy.write_text(json.dumps(doc))
    assert c.read_entry(first.new[0]).pixel_dtype is None
    same = ingest_site(synthetic_site, cache, SiteConfig(), workers=1)
    assert same.new == [] and len(same.reused) == 6  # not decoded again
    half = ingest_site(
        synthetic_site, cache, SiteConfig(pixel_dtype="float16"), workers=1
    )
    assert half.reused == [] and sorted(half.new) == sorted(first.new)
    assert {c.stored_dtype(e.key) for e in half.entries} == {"float16"}
    again = ingest_site(
        synthetic_site, cache, SiteConfig(pixel_dtype="float16"), workers=1
    )
    assert again.new == [] and len(again.reused) == 6
    assert c.stored_dtype("no-such-key") is None


def test_rerun_change_delete_and_annotation_refresh(
    synthetic_site: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    first = ingest_site(synthetic_site, cache, SiteConfig(), workers=1)
    assert len(first.new) == 6
    again = ingest_site(synthetic_site, cache, SiteConfig(), workers=1)
    assert again.new == [] and len(again.reused) == 6 and again.removed == []
    # the refused file is remembered, not decoded again, still reported
    assert [s["file"] for s in again.skipped] == ["broken.dcm"]

    # changed content -> re-ingested under a new key; the old entry is dropped
    old_key = {e.source: e.key for e in first.entries}["p1/r_cc.dcm"]
    write_dicom(
        synthetic_site / "p1" / "r_cc.dcm", patient="P1", laterality="R", seed=99
    )
    changed = ingest_site(synthetic_site, cache, SiteConfig(), workers=1)
    assert len(changed.new) == 1 and changed.removed == [old_key]
    assert not SiteCache(cache).has(old_key)

    # touched but identical -> not decoded
    os.utime(synthetic_site / "p1" / "l_cc.dcm", ns=(1, 1))
    touched = ingest_site(synthetic_site, cache, SiteConfig(), workers=1)
    assert touched.new == []

    # annotations changed only -> refreshed without decoding anything
    write_csv(
        synthetic_site / "annotations.csv",
        ["image", "finding", "xmin", "ymin", "xmax", "ymax"],
        [["research/b.png", "calcification", 100, 90, 120, 110]],
    )
    refreshed = ingest_site(synthetic_site, cache, SiteConfig(), workers=1)
    assert refreshed.new == []
    targets = SiteCache(cache).read_annotations()
    labeled = {e.source for e in refreshed.entries if targets[e.key].labeled}
    assert labeled == {"research/b.png"}

    # a deleted source disappears from the cache and the manifest
    (synthetic_site / "research" / "a.png").unlink()
    gone = ingest_site(synthetic_site, cache, SiteConfig(), workers=1)
    assert len(gone.removed) == 1
    assert "research/a.png" not in {r["source"] for r in _manifest(cache)}


def test_another_folder_or_an_empty_one_never_empties_the_cache(
    synthetic_site: Path, tmp_path: Path
) -> None:
    """A DICOM node's data_dir ingested into a cache another tree filled used to
    remove every image of that tree (its files were 'gone' from the walk)."""
    cache = tmp_path / "cache"
    first = ingest_site(synthetic_site, cache, SiteConfig(), workers=1)
    keys = set(SiteCache(cache).keys())
    assert len(keys) == len(first.entries) > 0
    other = tmp_path / "incoming"
    shutil.copytree(synthetic_site / "p1", other / "p1")
    with pytest.raises(MammofedError, match="mirrors site folder .*would remove"):
        ingest_site(other, cache, SiteConfig(), workers=1)
    assert set(SiteCache(cache).keys()) == keys
    # an unmounted share is an empty folder: refused, nothing removed
    shutil.rmtree(other / "p1")
    shutil.move(str(synthetic_site), str(tmp_path / "moved"))
    synthetic_site.mkdir()
    with pytest.raises(MammofedError, match="is empty but the cache"):
        ingest_site(synthetic_site, cache, SiteConfig(), workers=1)
    assert set(SiteCache(cache).keys()) == keys
    # the same folder back: nothing new, nothing removed; another cache is fine
    synthetic_site.rmdir()
    shutil.move(str(tmp_path / "moved"), str(synthetic_site))
    again = ingest_site(synthetic_site, cache, SiteConfig(), workers=1)
    assert again.removed == [] and again.new == []
    shutil.copytree(synthetic_site / "p1", other / "p1")
    assert ingest_site(other, tmp_path / "cache-2", SiteConfig(), workers=1).new


def test_sidecar_change_reingests_research_image(
    synthetic_site: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    ingest_site(synthetic_site, cache, SiteConfig(), workers=1)
    write_csv(
        synthetic_site / "images.csv",
        ["image", "patient_id", "laterality", "view", "spacing_mm"],
        [
            ["research/a.png", "W1", "L", "MLO", "0.1"],
            ["research/b.png", "W1", "R", "MLO", "0.2"],
        ],
    )
    res = ingest_site(synthetic_site, cache, SiteConfig(), workers=1)
    assert len(res.new) == 1
    e = next(e for e in res.entries if e.source == "research/a.png")
    assert e.meta.stored_spacing_mm == pytest.approx(0.1)


def test_split_csv_is_carried(synthetic_site: Path, tmp_path: Path) -> None:
    write_csv(
        synthetic_site / "split.csv",
        ["patient_id", "split"],
        [["P1", "train"], ["P2", "test"], ["W1", "holdout"]],
    )
    cache = tmp_path / "cache"
    res = ingest_site(synthetic_site, cache, SiteConfig(), workers=1)
    assert SiteCache(cache).read_split() == {"P1": "train", "P2": "test"}
    assert any(
        s.field == "split" and s.value == "holdout" for s in res.annotation_skips
    )


def test_process_pool_matches_inline(synthetic_site: Path, tmp_path: Path) -> None:
    a = ingest_site(synthetic_site, tmp_path / "a", SiteConfig(), workers=1)
    b = ingest_site(synthetic_site, tmp_path / "b", SiteConfig(), workers=2)
    assert sorted(e.key for e in a.entries) == sorted(e.key for e in b.entries)
    assert [s["file"] for s in b.skipped] == ["broken.dcm"]


def test_sidecar_and_split_tables_reject_bad_rows(tmp_path: Path) -> None:
    p = write_csv(
        tmp_path / "images.csv",
        ["image", "patient_id", "laterality", "view", "spacing_mm"],
        [["a.png", "W", "X", "CC", "0.2"], ["b.png", "W", "L", "CC", "abc"],
         ["c.png", "W", "R", "CC", "0.1"]],
    )  # fmt: skip
    rows, skips = read_images_csv(p)
    assert list(rows) == ["c.png"]
    assert {(s.row, s.field, s.value) for s in skips} == {
        (2, "laterality", "X"), (3, "spacing_mm", "abc"),
    }  # fmt: skip
    bad = write_csv(tmp_path / "split.csv", ["patient", "split"], [["a", "train"]])
    with pytest.raises(MammofedError, match="patient_id"):
        read_split_csv(bad)


def test_candidates_skip_site_tables_and_cache(synthetic_site: Path) -> None:
    (synthetic_site / "cache").mkdir()
    write_dicom(synthetic_site / "cache" / "x.dcm")
    found = {
        p.relative_to(synthetic_site).as_posix()
        for p in find_candidates(synthetic_site, exclude=[synthetic_site / "cache"])
    }
    assert "annotations.csv" not in found and "images.csv" not in found
    assert "notes.txt" not in found and "cache/x.dcm" not in found
    assert "broken.dcm" in found and "research/a.png" in found


def test_cli_exit_codes(synthetic_site: Path, tmp_path: Path) -> None:
    assert (
        client_main(["ingest", str(synthetic_site), "--out", str(tmp_path / "c")]) == 0
    )
    only_bad = tmp_path / "bad_site"
    only_bad.mkdir()
    shutil.copy(synthetic_site / "broken.dcm", only_bad / "broken.dcm")
    assert client_main(["ingest", str(only_bad), "--out", str(tmp_path / "c2")]) == 1
    assert (
        client_main(
            ["ingest", str(tmp_path / "missing"), "--out", str(tmp_path / "c3")]
        )
        == 2
    )
    assert (
        client_main(
            [
                "ingest",
                str(synthetic_site),
                "--out",
                str(tmp_path / "c4"),
                "--workers",
                "0",
            ]
        )
        == 2
    )


def test_shared_dicom_folder_ingests_without_aborting(
    shared_data: Path, tmp_path: Path
) -> None:
    site = shared_data / "dicom"
    cands = {p.relative_to(site).as_posix() for p in find_candidates(site)}
    res = ingest_site(site, tmp_path / "cache", SiteConfig(), workers=1)
    got = {e.source for e in res.entries}
    skipped = {s["file"] for s in res.skipped}
    assert got | skipped == cands and not got & skipped  # every file accounted for
    assert "fo-dicom/OutOfBoundsOverlay.dcm" in got  # the decodable full image
    assert "openrem/MG-Im-Hologic-PropProj.dcm" in skipped  # header without pixels
    assert all(s["reason"] for s in res.skipped)
    assert not any(p.endswith(("LICENSE", "License.txt")) for p in cands)


def test_specks_are_kept_when_the_site_asks_and_keys_do_not_change(
    synthetic_site: Path, tmp_path: Path
) -> None:
    """``specks: true`` decodes entries without specks again, under the same keys."""
    cache = tmp_path / "cache"
    first = ingest_site(synthetic_site, cache, SiteConfig(), workers=1)
    c = SiteCache(cache)
    assert not any(c.has_specks(k) for k in first.new)
    asked = ingest_site(synthetic_site, cache, SiteConfig(specks=True), workers=1)
    # the same files under the same keys (a run's out-of-fold keys still pair)
    assert sorted(asked.new) == sorted(first.new) and asked.reused == []
    for k in asked.new:
        s = c.load_specks(k)
        assert s is not None and s.ndim == 2 and s.shape[1] == 3
    again = ingest_site(synthetic_site, cache, SiteConfig(specks=True), workers=1)
    assert again.new == [] and len(again.reused) == 6
    # the DICOMs and the PNGs alike
    assert {Path(e.source).suffix for e in again.entries} == {".dcm", ".png"}
    # a site that stops asking keeps what it has (not decoded again)
    plain = ingest_site(synthetic_site, cache, SiteConfig(), workers=1)
    assert plain.new == [] and all(c.has_specks(k) for k in plain.reused)
    c.remove(plain.reused[0])
    assert not c.specks_path(plain.reused[0]).exists()
