"""Breast density from ``density.csv``: ingest, skips, cache metadata, old caches."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pydicom
import pytest

from client.ingest import ingest_site, read_density_csv
from common.config.site import SiteConfig
from common.errors import MammofedError
from common.imaging.cache import SiteCache
from common.imaging.data import SiteDataset
from common.imaging.image import DENSITY_CSV, ImageMeta

from .conftest import write_csv

HEADER = ["image", "density"]


def _densities(cache: Path) -> dict[str, str | None]:
    return {e.source: e.meta.density for e in SiteCache(cache).iter_entries()}


def test_density_csv_rows_and_skips(
    synthetic_site: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uid = str(pydicom.dcmread(synthetic_site / "p1" / "r_cc.dcm").SOPInstanceUID)
    write_csv(
        synthetic_site / DENSITY_CSV,
        HEADER,
        [
            ["p1/l_cc.dcm", "a"],  # row 2: BI-RADS
            ["./research/a.png", " F "],  # row 3: MIAS, path normalized, stripped
            [uid, "D"],  # row 4: by SOPInstanceUID (p1/r_cc.dcm)
            ["p2/l_mlo.dcm", "dense"],  # row 5: bad value
            ["p2/r_mlo.dcm", "A"],  # row 6: upper-case BI-RADS: refused
            ["ghost.dcm", "b"],  # row 7: no such image
            ["p1/l_cc.dcm", "c"],  # row 8: second row of one image
            ["research/b.png", ""],  # row 9: empty value
            ["p1/r_cc.dcm", "G"],  # row 10: same image as row 4 (by path)
        ],
    )
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="common.imaging.annotations"):
        res = ingest_site(synthetic_site, cache, SiteConfig(), workers=1)
    # every image is still ingested (broken.dcm never was)
    assert len(res.entries) == 6
    assert _densities(cache) == {
        "p1/l_cc.dcm": "a",
        "research/a.png": "F",
        "p1/r_cc.dcm": "D",
        "p2/l_mlo.dcm": None,
        "p2/r_mlo.dcm": None,
        "research/b.png": None,
    }
    dfile = str(synthetic_site / DENSITY_CSV)
    skips = {(s.row, s.field, s.value) for s in res.annotation_skips if s.file == dfile}
    assert skips == {
        (5, "density", "dense"),
        (6, "density", "A"),
        (7, "image", "ghost.dcm"),
        (8, "image", "p1/l_cc.dcm"),
        (9, "density", ""),
        (10, "image", "p1/r_cc.dcm"),
    }
    # logged with file, row and value
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{dfile} row 5: density='dense'" in logged
    assert f"{dfile} row 7: image='ghost.dcm'" in logged
    assert "case matters" in logged
    # the report carries the density and the skipped rows
    report = json.loads((cache / "ingest_report.json").read_text())
    by_file = {d["file"]: d for d in report["ingested"]}
    assert by_file["p1/l_cc.dcm"]["density"] == "a"
    assert by_file["p2/l_mlo.dcm"]["density"] is None
    assert {"file": dfile, "row": 6, "field": "density", "value": "A"}.items() <= (
        next(s for s in report["annotation_skipped"] if s["row"] == 6).items()
    )
    # the dataset's records carry it too
    recs = {r.source: r for r in SiteDataset(cache, test_fraction=0.0).records}
    assert recs["research/a.png"].meta.density == "F"


def test_density_change_rewrites_metadata_without_decoding(
    synthetic_site: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    first = ingest_site(synthetic_site, cache, SiteConfig(), workers=1)
    assert set(_densities(cache).values()) == {None}  # no density.csv: unknown
    keys = sorted(e.key for e in first.entries)

    write_csv(synthetic_site / DENSITY_CSV, HEADER, [["p1/l_cc.dcm", "b"]])
    again = ingest_site(synthetic_site, cache, SiteConfig(), workers=1)
    assert again.new == [] and sorted(e.key for e in again.entries) == keys
    assert _densities(cache)["p1/l_cc.dcm"] == "b"

    write_csv(synthetic_site / DENSITY_CSV, HEADER, [["p1/l_cc.dcm", "c"]])
    ingest_site(synthetic_site, cache, SiteConfig(), workers=1)
    assert _densities(cache)["p1/l_cc.dcm"] == "c"

    (synthetic_site / DENSITY_CSV).unlink()  # the table decides: gone, unknown
    gone = ingest_site(synthetic_site, cache, SiteConfig(), workers=1)
    assert gone.new == [] and set(_densities(cache).values()) == {None}


def test_old_cache_entries_without_density_read_as_unknown(
    site_cache: Path,
) -> None:
    c = SiteCache(site_cache)
    key = c.keys()[0]
    doc = json.loads(c.entry_path(key).read_text())
    assert doc["meta"].pop("density") is None
    c.entry_path(key).write_text(json.dumps(doc))  # as written before the field
    assert c.read_entry(key).meta.density is None
    e = c.with_density(c.read_entry(key), "G")
    assert c.read_entry(key).meta.density == "G" == e.meta.density
    assert c.with_density(e, "G") is e  # unchanged: not saved again
    # a malformed density in an entry is refused, naming the file and value
    doc["meta"]["density"] = "Z"
    c.entry_path(key).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=rf"{key}\.json.*got 'Z'"):
        c.read_entry(key)
    with pytest.raises(ValueError, match="got 'fatty'"):
        c.with_density(e, "fatty")


def test_image_meta_refuses_unknown_density() -> None:
    meta = dict(
        source="x.png", sop_instance_uid=None, patient_id=None, manufacturer="",
        model="", view=None, laterality="L", laterality_source="table",
        stored_spacing_mm=0.2, spacing_source="table", presentation_intent=None,
        photometric=None, rows=64, cols=64,
    )  # fmt: skip
    assert ImageMeta(**meta).density is None
    assert ImageMeta.from_dict({**meta, "density": "d"}).density == "d"
    with pytest.raises(ValueError, match="got 'e'"):
        ImageMeta(**meta, density="e")


def test_density_table_errors_and_images_csv_column(
    synthetic_site: Path, tmp_path: Path
) -> None:
    bad = write_csv(tmp_path / DENSITY_CSV, ["image", "birads"], [["a.png", "a"]])
    with pytest.raises(MammofedError, match="lacks column.*density"):
        read_density_csv(bad)
    # a density column in images.csv is not read there, and says where it goes
    write_csv(
        synthetic_site / "images.csv",
        ["image", "patient_id", "laterality", "view", "spacing_mm", "density"],
        [
            ["research/a.png", "W1", "L", "MLO", "0.2", "F"],
            ["research/b.png", "W1", "R", "MLO", "0.2", "G"],
        ],
    )
    res = ingest_site(synthetic_site, tmp_path / "cache", SiteConfig(), workers=1)
    (skip,) = [s for s in res.annotation_skips if s.field == "density"]
    assert skip.file.endswith("images.csv") and DENSITY_CSV in skip.reason
    assert set(_densities(tmp_path / "cache").values()) == {None}
    # an unreadable density.csv fails the ingest as a whole, like the other tables
    write_csv(synthetic_site / DENSITY_CSV, ["image"], [["research/a.png"]])
    with pytest.raises(MammofedError, match="density"):
        ingest_site(synthetic_site, tmp_path / "cache2", SiteConfig(), workers=1)
