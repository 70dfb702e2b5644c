"""Cache entries that are damaged or gone: logged naming them, the rest read."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from common.imaging.cache import SiteCache, manifest_row
from common.imaging.data import SiteDataset
from tests.common.imaging.test_site_dataset import make_cache

LOGGER = "common.imaging.cache"


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """4 patients, 8 entries ``k000``..``k007`` and their manifest."""
    root = make_cache(tmp_path / "c", n_patients=4)
    c = SiteCache(root)
    c.write_manifest([manifest_row(c.read_entry(k), True) for k in c.keys()])
    return root


@pytest.mark.parametrize(
    "text",
    [
        "[1, 2]",
        '"entry"',
        "3",
        "null",
        '{"format": 1, "key": "k", "source": "s", "size": 1, "mtime_ns": 1, '
        '"working_spacing_mm": 0.4, "spacing_mm": 0.4, "geometry": [1], "meta": {}}',
        '{"format": 1, "key": "k", "source": "s", "size": 1e999, "mtime_ns": 1}',
        "[" * 100_000,
    ],
)
def test_entry_json_not_an_entry_object_is_ignored_naming_it(
    cache: Path, caplog: pytest.LogCaptureFixture, text: str
) -> None:
    c = SiteCache(cache)
    c.entry_path("k001").write_text(text)
    with pytest.raises(ValueError, match=r"k001\.json: malformed cache entry"):
        c.read_entry("k001")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ds = SiteDataset(cache)
    assert len(ds) == 7 and "k001" not in {r.key for r in ds.records}
    assert any(
        "cache entry k001 unreadable, ignored" in r.getMessage()
        and "k001.json" in r.getMessage()
        for r in caplog.records
    )


def test_missing_entry_json_is_logged_naming_key_and_source(
    cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c = SiteCache(cache)
    c.entry_path("k002").unlink()
    c.entry_path("k003").write_text("[1, 2]")  # malformed: said once, elsewhere
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ds = SiteDataset(cache)
    assert len(ds) == 6
    assert c.missing_entries() == ["k002"]
    msgs = [r.getMessage() for r in caplog.records]
    assert (
        "cache entry k002 ('002.dcm' in manifest.csv row 4): entry JSON missing, "
        "image ignored" in msgs
    )
    assert not any("k003" in m and "JSON missing" in m for m in msgs)


def test_manifest_checks_survive_odd_manifests(
    cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c = SiteCache(cache)
    (cache / "manifest.csv").write_text("key,source\n,a.png\nk\x00x,b.png\nk000,c\n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert c.missing_entries() == ["k\x00x"]
    assert any(r"'k\x00x'" in r.getMessage() for r in caplog.records)
    (cache / "manifest.csv").unlink()
    assert c.missing_entries() == [] and len(SiteDataset(cache)) == 8
