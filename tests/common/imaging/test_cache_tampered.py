"""Tampered or damaged site-cache files are refused with an error naming them."""

from __future__ import annotations

import dataclasses
import io
import json
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from common.errors import MammofedError
from common.imaging.cache import CacheError, SiteCache
from common.imaging.data import SiteDataset
from tests.common.imaging.test_site_dataset import make_cache

SPLIT = {"P00": "train", "P01": "test", "P02": "train", "P03": "test"}


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """4 patients, 8 images of model shape 40x32; k000 has a box (label 1)."""
    return make_cache(tmp_path / "c", n_patients=4, split=SPLIT)


def test_good_cache_still_reads(cache: Path) -> None:
    ds = SiteDataset(cache)
    assert [ds.records[i].split for i in (0, 2, 4, 6)] == list(SPLIT.values())
    img, t = ds.view("all")[0]
    assert img.shape == (1, 40, 32) and t["labels"].tolist() == [1]
    # float16 entries too
    c = SiteCache(cache)
    np.savez(c.pixels_path("k000"), pixels=np.full((40, 32), 0.5, np.float16))
    assert float(c.load_pixels("k000").mean()) == 0.5


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"P00": "holdout", "P01": "test"}', r"split\.json: entry 1: .*holdout"),
        ('{"P00": 1}', r"split\.json: entry 1: split 1 "),
        ("[1, 2]", r"split\.json: expected an object.*list"),
        ("{bad", r"split\.json: unreadable split"),
    ],
)
def test_split_json_refused(cache: Path, text: str, match: str) -> None:
    (cache / "split.json").write_text(text)
    with pytest.raises(CacheError, match=match) as ei:
        SiteDataset(cache)
    assert isinstance(ei.value, MammofedError)


def _edit_annotations(cache: Path, key: str, **fields: object) -> None:
    path = cache / "annotations.json"
    data = json.loads(path.read_text())
    data[key].update(fields)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"boxes": [[float("nan"), 0, float("inf"), 5]]}, r"boxes \[nan.*finite"),
        ({"boxes": [[1, 2, 3]]}, r"boxes \[1, 2, 3\].*4 finite"),
        ({"boxes": [[8, 8, 4, 16]]}, r"boxes .*xmin < xmax"),
        ({"boxes_stored": [[1, 2, 10**400, 4]]}, r"boxes_stored .*finite"),
        ({"ignore": [[0, 0, 2, float("inf")]]}, r"ignore .*finite"),
        ({"labels": [99]}, r"labels \[99\]: labels must be indices"),
        ({"labels": [True]}, r"labels \[True\]"),
        ({"labels": [0, 1]}, r"labels \[0, 1\]: needs one label"),
        ({"labeled": "false"}, r"labeled 'false': must be true or false"),
        ({"weak_kinds": "mass"}, r"weak_kinds"),
    ],
)
def test_annotations_json_refused(
    cache: Path, fields: dict[str, object], match: str
) -> None:
    _edit_annotations(cache, "k000", **fields)
    with pytest.raises(CacheError, match=r"annotations\.json: k000: " + match):
        SiteDataset(cache)


def test_annotations_json_not_a_mapping(cache: Path) -> None:
    (cache / "annotations.json").write_text("[1]")
    with pytest.raises(CacheError, match=r"annotations\.json: expected an object"):
        SiteCache(cache).read_annotations()
    (cache / "annotations.json").write_text('{"k000": [1]}')
    with pytest.raises(CacheError, match=r"annotations\.json: k000: malformed"):
        SiteCache(cache).read_annotations()


def test_box_outside_the_model_image_refused(cache: Path) -> None:
    box = [4.0, 8.0, 1e30, 16.0]  # finite, ordered, but beyond the 32 px width
    _edit_annotations(cache, "k000", boxes=[box])
    with pytest.raises(CacheError, match=r"annotations\.json: k000: boxes .*32x40"):
        SiteDataset(cache)


@pytest.mark.parametrize(
    ("pixels", "match"),
    [
        (np.ones((7, 3), np.uint16), r"\(7, 3\) uint16 does not match.*\(40, 32\)"),
        (np.ones((40, 32), np.float32), r"float32 does not match"),
        (np.array([{"a": 1}], dtype=object), r"object does not match"),
        (np.full((40, 32), np.nan, np.float16), r"outside \[0, 1\]"),
        (np.full((40, 32), np.inf, np.float16), r"outside \[0, 1\]"),
    ],
)
def test_tampered_pixels_refused(cache: Path, pixels: np.ndarray, match: str) -> None:
    c = SiteCache(cache)
    np.savez(c.pixels_path("k000"), pixels=pixels)
    ds = SiteDataset(cache)
    with pytest.raises(CacheError, match=r"k000\.npz: .*" + match):
        ds.view("all")[0]
    with pytest.raises(CacheError, match=r"k000\.npz: .*" + match):
        c.load_pixels("k000")  # the entry's geometry read from its JSON


def test_compressed_bomb_refused_before_decompressing(cache: Path) -> None:
    c = SiteCache(cache)
    np.savez_compressed(c.pixels_path("k000"), pixels=np.zeros((4000, 4000), np.uint16))
    assert c.pixels_path("k000").stat().st_size < 200_000  # 32 MB when decoded
    tracemalloc.start()
    try:
        with pytest.raises(CacheError, match=r"\(4000, 4000\) uint16 does not match"):
            c.load_pixels("k000")
        entry = c.read_entry("k000")
        with pytest.raises(CacheError, match=r"k000\.npz"):
            c.with_pixel_digest(dataclasses.replace(entry, pixel_sha256=None))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000


def test_damaged_pixel_files_refused(cache: Path) -> None:
    c = SiteCache(cache)
    p = c.pixels_path("k000")
    p.write_bytes(b"not a zip at all")
    with pytest.raises(CacheError, match=r"k000\.npz: unreadable pixel file"):
        c.load_pixels("k000")
    np.savez(p, other=np.zeros((40, 32), np.uint16))  # no 'pixels' member
    with pytest.raises(CacheError, match=r"k000\.npz: unreadable pixel file"):
        c.load_pixels("k000")
    # the header claims the entry's shape, the data is cut short / too long
    for shape, word in (((40, 31), "shorter"), ((41, 32), "longer")):
        member = io.BytesIO()
        np.lib.format.write_array(member, np.zeros(shape, np.uint16))
        body = member.getvalue().replace(str(shape).encode(), b"(40, 32)")
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("pixels.npy", body)
        with pytest.raises(CacheError, match=rf"k000\.npz: pixel data is {word}"):
            c.load_pixels("k000")
