"""mini-MIAS importer: counts against Info.txt, patients, boxes, malformed rows."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simulation.cli import main as sim_main
from simulation.importers.mias import circle_box, import_mias, parse_info

EXPECTED_KIND = {
    "CIRC": "mass", "SPIC": "mass", "MISC": "mass", "CALC": "calcification",
    "ARCH": "ignore", "ASYM": "ignore", "NORM": "none",
}  # fmt: skip


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_import_shared_mini_mias(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "mini-mias"
    out = tmp_path / "site"
    assert sim_main(["import-mias", str(src), str(out)]) == 0
    # independent count straight from the table
    table = [
        ln.split() for ln in (src / "Info.txt").read_text().splitlines() if ln.strip()
    ]
    expected = Counter(EXPECTED_KIND[t[2]] for t in table)
    n_images = len({t[0] for t in table})
    assert n_images == 224
    assert len(list(out.glob("mdb*.png"))) == 224
    ann = _rows(out / "annotations.csv")
    assert Counter(r["finding"] for r in ann) == expected
    imgs = {r["image"]: r for r in _rows(out / "images.csv")}
    assert len(imgs) == 224
    # women: ids 2k-1 and 2k share a patient; even = left
    assert imgs["mdb003.png"]["patient_id"] == imgs["mdb004.png"]["patient_id"]
    assert imgs["mdb004.png"]["patient_id"] != imgs["mdb005.png"]["patient_id"]
    assert (
        imgs["mdb004.png"]["laterality"] == "L"
        and imgs["mdb003.png"]["laterality"] == "R"
    )
    assert {r["spacing_mm"] for r in imgs.values()} == {"0.2"}
    assert {r["view"] for r in imgs.values()} == {"MLO"}
    # rows without coordinates are kept as image-level labels
    no_coords = [
        t for t in table if t[2] != "NORM" and (len(t) < 7 or not t[4].isdigit())
    ]
    weak = [r for r in ann if r["finding"] != "none" and not r["xmin"]]
    assert len(weak) == len(no_coords) >= 2
    # mdb005 CIRC 477 133 30 -> centre row 1023 - 133 = 890
    box = next(r for r in ann if r["image"] == "mdb005.png")
    assert [float(box[k]) for k in ("xmin", "ymin", "xmax", "ymax")] == [
        447.5, 860.5, 507.5, 920.5,
    ]  # fmt: skip
    assert (out / "mdb005.png").read_bytes() == (
        src / "png" / "mdb005.png"
    ).read_bytes()


def test_circle_box_origin_and_clipping() -> None:
    assert circle_box(10, 1013, 5, (1024, 1024)) == (5.5, 5.5, 15.5, 15.5)
    assert circle_box(2, 0, 10, (1024, 1024)) == (0.0, 1013.5, 12.5, 1024.0)
    assert circle_box(5000, 5000, 3, (1024, 1024)) is None


def test_malformed_table_and_any_folder_layout(tmp_path: Path) -> None:
    src = tmp_path / "held-back"
    (src / "png").mkdir(parents=True)
    for n in (1, 2, 3):
        arr = np.zeros((64, 48), np.uint8)
        arr[10:50, :20] = 200
        Image.fromarray(arr).save(src / "png" / f"mdb{n:03d}.png")
    (src / "Info.txt").write_text(
        "REF TISSUE CLASS\n"
        "mdb001 G CIRC B 10 50 5\n"
        "mdb001 G SPIC M 30 20\n"  # two numbers: no usable coordinates
        "mdb002 X NORM\n"  # bad tissue
        "mdb002 F WHAT\n"  # bad class
        "mdbX F NORM\n"  # bad id
        "mdb009 F NORM\n"  # no image
        "mdb002 D CALC M *NOTE 3*\n"
        "\n"
    )
    table = parse_info(src / "Info.txt")
    assert [r.line for r in table.rows] == [2, 3, 7, 8]
    assert {(ln, v) for ln, v, _ in table.skipped} == {
        (4, "X"),
        (5, "WHAT"),
        (6, "mdbX"),
    }
    s = import_mias(src, tmp_path / "out", keep_words=True)
    assert s.images == 3 and s.missing_images == ["mdb009"]
    assert s.unlisted_images == ["mdb003"]
    ann = _rows(tmp_path / "out" / "annotations.csv")
    assert [r["finding"] for r in ann] == ["CIRC", "SPIC", "CALC"]
    # 64-row image: centre row = 63 - 50 = 13
    assert [float(ann[0][k]) for k in ("xmin", "ymin", "xmax", "ymax")] == [
        5.5, 8.5, 15.5, 18.5,
    ]  # fmt: skip
    assert ann[1]["xmin"] == "" and ann[2]["xmin"] == ""


def test_not_a_mias_folder(tmp_path: Path) -> None:
    from common.errors import MammofedError

    with pytest.raises(MammofedError, match="Info.txt"):
        import_mias(tmp_path, tmp_path / "out")
    assert sim_main(["import-mias", str(tmp_path), str(tmp_path / "out")]) == 2
