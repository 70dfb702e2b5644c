"""mini-MIAS background tissue -> density.csv -> the cache's image metadata."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.ingest import ingest_site
from common.config.site import SiteConfig
from common.imaging.cache import SiteCache
from common.imaging.image import DENSITY_COLUMNS, DENSITY_CSV
from simulation.importers.mias import import_mias


def _fake_mias(src: Path, numbers: list[int], info: str) -> None:
    (src / "png").mkdir(parents=True)
    for n in numbers:
        arr = np.full((128, 96), 5, np.uint8)
        # the breast against the chest wall: left for even (L), right for odd
        # ids; its brightness differs per image (identical pixels are refused)
        if n % 2 == 0:
            arr[16:112, :60] = 150 + 10 * n
        else:
            arr[16:112, 36:] = 150 + 10 * n
        Image.fromarray(arr).save(src / "png" / f"mdb{n:03d}.png")
    (src / "Info.txt").write_text(info)


def test_importer_writes_tissue_and_ingest_stores_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "mias"
    _fake_mias(
        src,
        [1, 2, 3, 4],
        "mdb001 G CIRC B 30 60 8\n"
        "mdb002 F NORM\n"
        "mdb002 D CALC B 20 40 5\n"  # same image, other tissue: first kept
        "mdb003 X NORM\n"  # bad tissue: row skipped, no density
        "mdb004 D NORM\n"
        "mdb007 F NORM\n",  # no image
    )
    out = tmp_path / "site"
    with caplog.at_level(logging.WARNING, logger="simulation.importers.mias"):
        summary = import_mias(src, out)
    with open(out / DENSITY_CSV, newline="") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == DENSITY_COLUMNS
    assert rows[1:] == [["mdb001.png", "G"], ["mdb002.png", "F"], ["mdb004.png", "D"]]
    assert dict(summary.densities) == {"G": 1, "F": 1, "D": 1}
    assert any(
        "line 3" in r.getMessage() and "'D'" in r.getMessage() for r in caplog.records
    )

    cache = tmp_path / "cache"
    res = ingest_site(out, cache, SiteConfig(), workers=1)
    assert len(res.entries) == 4 and res.skipped == []
    assert not [s for s in res.annotation_skips if s.file.endswith(DENSITY_CSV)]
    got = {e.source: e.meta.density for e in SiteCache(cache).iter_entries()}
    assert got == {
        "mdb001.png": "G",
        "mdb002.png": "F",
        "mdb003.png": None,
        "mdb004.png": "D",
    }


def test_shared_mini_mias_density_matches_info(
    shared_data: Path, tmp_path: Path
) -> None:
    src = shared_data / "mini-mias"
    import_mias(src, tmp_path / "site")
    first: dict[str, str] = {}
    for line in (src / "Info.txt").read_text().splitlines():
        tok = line.split()
        if tok and tok[0].startswith("mdb"):
            first.setdefault(f"{tok[0]}.png", tok[1])
    with open(tmp_path / "site" / DENSITY_CSV, newline="") as fh:
        written = {r["image"]: r["density"] for r in csv.DictReader(fh)}
    assert written == first and len(written) == 224
    assert set(written.values()) == {"F", "G", "D"}
