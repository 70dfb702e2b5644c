"""mini-MIAS importer on hostile input: absurd coordinates, broken PNGs, and an
output folder that would overwrite the source."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.errors import MammofedError
from simulation.cli import main as sim_main
from simulation.importers.mias import import_mias

LOGGER = "simulation.importers.mias"


def _src(root: Path, info: str, broken_png: bool = False) -> Path:
    src = root / "src"
    (src / "png").mkdir(parents=True)
    for n in (1, 3):
        Image.fromarray(np.zeros((64, 48), np.uint8)).save(
            src / "png" / f"mdb{n:03d}.png"
        )
    if broken_png:
        (src / "png" / "mdb002.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (src / "Info.txt").write_text(info, encoding="latin-1")
    return src


def _ann(out: Path) -> list[dict[str, str]]:
    with open(out / "annotations.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("digits", [400, 5000])
def test_absurd_coordinates_dropped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, digits: int
) -> None:
    info = (
        "mdb001 G CIRC B " + "9" * digits + " 10 5\n"  # beyond any int/float limit
        "mdb003 G CALC B 10 10 123456\n"  # a 6-digit radius
    )
    src = _src(tmp_path, info)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        s = import_mias(src, tmp_path / "out")
    assert s.images == 2 and s.annotation_rows == 2
    ann = _ann(tmp_path / "out")
    assert [(r["finding"], r["xmin"]) for r in ann] == [
        ("mass", ""), ("calcification", ""),
    ]  # fmt: skip
    msgs = [r.getMessage() for r in caplog.records]
    assert any(
        "line 1: coordinate '9999" in m and f"({digits} chars)" in m for m in msgs
    )
    assert any("line 2: coordinate '123456'" in m for m in msgs)
    assert all(len(m) < 400 for m in msgs)


@pytest.mark.parametrize(
    "row",
    [
        "mdb001 G CIRC B 48 10 5",  # x = width: centre outside
        "mdb001 G CIRC B 10 64 5",  # y = height: centre outside
        "mdb001 G CIRC B 10 10 99999",  # radius larger than the image
    ],
)
def test_circle_not_fitting_the_image_dropped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, row: str
) -> None:
    src = _src(tmp_path, row + "\n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        import_mias(src, tmp_path / "out")
    assert [(r["finding"], r["xmin"]) for r in _ann(tmp_path / "out")] == [("mass", "")]
    x, y, r = row.split()[-3:]
    assert any(
        f"line 1: circle ({x}, {y}, r={r}) does not fit the 48x64 image"
        in rec.getMessage()
        for rec in caplog.records
    )


def test_undecodable_png_skipped_rest_imported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    info = "mdb001 G CIRC B 10 10 5\nmdb002 G NORM\nmdb003 F NORM\n"
    src = _src(tmp_path, info, broken_png=True)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        s = import_mias(src, out)
    assert s.images == 2 and s.unreadable_images == ["mdb002"]
    assert s.missing_images == [] and s.annotation_rows == 2
    assert sorted(p.name for p in out.glob("*.png")) == ["mdb001.png", "mdb003.png"]
    assert [r["image"] for r in _ann(out)] == ["mdb001.png", "mdb003.png"]
    msgs = [r.getMessage() for r in caplog.records]
    assert any("mdb002.png: cannot decode the PNG, not imported" in m for m in msgs)
    assert any("line 2: image mdb002.png could not be decoded" in m for m in msgs)


@pytest.mark.parametrize("where", [".", "png", "sub/site"])
def test_output_in_the_source_refused_before_writing(
    tmp_path: Path, where: str
) -> None:
    src = _src(tmp_path, "mdb001 G CIRC B 10 10 5\n")
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    out = src / where
    with pytest.raises(MammofedError, match="output folder is the source folder"):
        import_mias(src, out)
    assert sim_main(["import-mias", str(src), str(out)]) == 2
    after = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    assert after == before and not (src / "sub").exists()
