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


def _msgs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_repeated_lesion_row_written_once_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    info = (
        "mdb001 G CIRC B 10 10 5\n"
        "mdb001 G CIRC B 10 10 5\n"  # the same lesion again: one box, not two
        "mdb001 G CALC B 10 10 5\n"  # another class at the same place: kept
        "mdb003 F CIRC B\n"
        "mdb003 F CIRC B\n"  # a repeated image-level label
        "mdb003 F NORM\n"  # contradicts line 4 (below)
    )
    src = _src(tmp_path, info)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        s = import_mias(src, tmp_path / "out")
    ann = _ann(tmp_path / "out")
    assert [(r["image"], r["finding"], r["xmin"]) for r in ann] == [
        ("mdb001.png", "mass", "5.5"),
        ("mdb001.png", "calcification", "5.5"),
        ("mdb003.png", "mass", ""),
    ]
    assert s.annotation_rows == 3 and s.kinds == {"mass": 2, "calcification": 1}
    assert {ln for ln, _, _ in s.table_skipped} == {2, 5, 6}
    msgs = _msgs(caplog)
    assert any(
        "Info.txt line 2: mdb001 repeats the lesion of line 1 (same class and "
        "circle): duplicate skipped" in m
        for m in msgs
    )
    assert any("line 5: mdb003 repeats the lesion of line 4 (same class, no" in m
               for m in msgs)  # fmt: skip


@pytest.mark.parametrize("norm_first", [True, False])
def test_norm_row_beside_a_lesion_skipped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, norm_first: bool
) -> None:
    rows = ["mdb001 G NORM", "mdb001 G CIRC B 10 10 5"]
    if not norm_first:
        rows.reverse()
    src = _src(tmp_path, "\n".join(rows) + "\nmdb003 F NORM\n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        s = import_mias(src, tmp_path / "out")
    assert [(r["image"], r["finding"]) for r in _ann(tmp_path / "out")] == [
        ("mdb001.png", "mass"), ("mdb003.png", "none"),
    ]  # fmt: skip
    norm, lesion = (1, 2) if norm_first else (2, 1)
    assert [(ln, v) for ln, v, _ in s.table_skipped] == [(norm, "mdb001 G NORM")]
    assert any(
        f"line {norm}: mdb001 is NORM here but line {lesion} gives CIRC" in m
        and "contradictory labels" in m
        for m in _msgs(caplog)
    )


@pytest.mark.parametrize("radius", ["0", "-30", "+0"])
def test_non_positive_radius_kept_as_image_level_label(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, radius: str
) -> None:
    src = _src(tmp_path, f"mdb001 G CIRC B 10 10 {radius}\n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        s = import_mias(src, tmp_path / "out")
    assert [(r["finding"], r["xmin"]) for r in _ann(tmp_path / "out")] == [("mass", "")]
    assert s.unlisted_images == ["mdb003"] and s.table_skipped == []
    assert any(
        f"line 1: radius {int(radius)} is not positive; coordinates dropped, kept "
        "as an image-level label" in m
        for m in _msgs(caplog)
    )


def test_clipped_circle_logged_with_its_box(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = _src(tmp_path, "mdb001 G CIRC B 2 10 5\nmdb003 G CIRC B 10 10 5\n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        import_mias(src, tmp_path / "out")
    ann = _ann(tmp_path / "out")
    assert [ann[0][k] for k in ("xmin", "ymin", "xmax", "ymax")] == [
        "0", "48.5", "7.5", "58.5",
    ]  # fmt: skip
    msgs = _msgs(caplog)
    assert any(
        "line 1: circle (2, 10, r=5) extends beyond the 48x64 image; box clipped "
        "to (0, 48.5, 7.5, 58.5)" in m
        for m in msgs
    )
    assert not any("line 2:" in m for m in msgs)  # fits: nothing to say


@pytest.mark.parametrize(
    ("row", "xmin"),
    [("mdb001 G CIRC Z 10 10 5", "5.5"), ("mdb001 G CIRC Z", "")],
)
def test_unknown_severity_named_and_coordinates_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, row: str, xmin: str
) -> None:
    src = _src(tmp_path, row + "\n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        import_mias(src, tmp_path / "out")
    assert [(r["finding"], r["xmin"]) for r in _ann(tmp_path / "out")] == [
        ("mass", xmin)
    ]
    msgs = _msgs(caplog)
    assert any("line 1: unknown severity 'Z' (expected B or M)" in m for m in msgs)
    assert not any("are not coordinates" in m for m in msgs)


@pytest.mark.parametrize("keep_words", [False, True])
def test_two_classes_of_one_kind_on_one_circle(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, keep_words: bool
) -> None:
    src = _src(tmp_path, "mdb001 G CIRC B 10 10 5\nmdb001 G SPIC M 10 10 5\n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        import_mias(src, tmp_path / "out", keep_words=keep_words)
    written = [r["finding"] for r in _ann(tmp_path / "out")]
    # mapped, both are one mass box; as words, the site config decides
    assert written == (["CIRC", "SPIC"] if keep_words else ["mass"])
    said = any(
        "line 2: mdb001 repeats the lesion of line 1 (same circle; CIRC there, "
        "both mass): duplicate skipped" in m
        for m in _msgs(caplog)
    )
    assert said != keep_words
