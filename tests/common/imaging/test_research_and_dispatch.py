"""PNG/TIFF research images, read_any dispatch and standardize edge cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.errors import RefusedImage
from common.imaging.image_io import read_any
from common.imaging.preprocess import find_breast, standardize
from common.imaging.research_image import read_research_image
from common.keys import SPACING_TABLE


def _breast(rows: int = 128, cols: int = 96, side: str = "left") -> np.ndarray:
    """Half-ellipse of 0.5 against ``side`` with a 1.0 block; float[rows, cols]."""
    r = np.arange(rows)[:, None] + 0.5
    c = np.arange(cols)[None, :] + 0.5
    dist = c if side == "left" else cols - c
    img = np.where(
        ((r - rows / 2) / (0.4 * rows)) ** 2 + (dist / (0.6 * cols)) ** 2 <= 1, 0.5, 0.0
    )
    mc = 20 if side == "left" else cols - 24
    img[60:64, mc : mc + 4] = 1.0
    return img


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_research_image(tmp_path: Path, dtype, suffix) -> None:
    """8/16-bit PNG/TIFF of a right breast: flipped, laterality from the breast side."""
    top = np.iinfo(dtype).max
    arr = (_breast(side="right") * top).astype(dtype)
    path = tmp_path / f"img{suffix}"
    Image.fromarray(arr).save(path)
    img = read_research_image(
        path, spacing_mm=0.1, working_spacing_mm=0.2, patient_id="w1", view="MLO"
    )
    assert img.geometry.flip
    assert (img.meta.laterality, img.meta.laterality_source) == ("R", "breast-side")
    assert img.meta.spacing_source == SPACING_TABLE
    assert (img.meta.patient_id, img.meta.view) == ("w1", "MLO")
    px = img.pixels
    assert px.dtype == np.float32 and 0 <= px.min() and px.max() <= 1
    assert px[px.shape[0] // 2, 0] > 0.3  # chest wall now at x = 0
    box = img.geometry.to_model(np.array([[96 - 24, 60, 96 - 20, 64]], float))[0]
    iy, ix = np.unravel_index(np.argmax(px), px.shape)
    assert box[0] - 0.5 <= ix + 0.5 <= box[2] + 0.5
    assert box[1] - 0.5 <= iy + 0.5 <= box[3] + 0.5


def test_research_table_laterality(tmp_path: Path) -> None:
    """A laterality given by the table is kept with source 'table'."""
    path = tmp_path / "a.png"
    Image.fromarray((_breast() * 255).astype(np.uint8)).save(path)
    img = read_research_image(
        path, spacing_mm=0.2, working_spacing_mm=0.2, laterality="L"
    )
    assert (img.meta.laterality, img.meta.laterality_source) == ("L", "table")
    with pytest.raises(ValueError, match="laterality"):
        read_research_image(
            path, spacing_mm=0.2, working_spacing_mm=0.2, laterality="left"
        )


def test_research_refusals(tmp_path: Path) -> None:
    """Colour, tiny and unreadable images are refused with the reason."""
    colour = tmp_path / "c.png"
    rgb = np.zeros((80, 80, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(colour)
    with pytest.raises(RefusedImage, match="colour"):
        read_research_image(colour, spacing_mm=0.1, working_spacing_mm=0.2)
    tiny = tmp_path / "t.png"
    Image.fromarray(np.zeros((10, 80), np.uint8)).save(tiny)
    with pytest.raises(RefusedImage, match="10x80"):
        read_research_image(tiny, spacing_mm=0.1, working_spacing_mm=0.2)
    bad = tmp_path / "b.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(RefusedImage, match="unreadable"):
        read_research_image(bad, spacing_mm=0.1, working_spacing_mm=0.2)


def test_read_any_dispatch(tmp_path: Path, write_mammo) -> None:
    """DICOM by content (any suffix), PNG by suffix, others refused."""
    dcm, _ = write_mammo("scan.bin")
    assert read_any(dcm, working_spacing_mm=0.2).meta.sop_instance_uid
    png = tmp_path / "a.png"
    Image.fromarray((_breast() * 255).astype(np.uint8)).save(png)
    with pytest.raises(RefusedImage, match="needs spacing_mm"):
        read_any(png, working_spacing_mm=0.2)
    assert (
        read_any(png, working_spacing_mm=0.2, default_spacing_mm=0.1).meta.rows == 128
    )
    txt = tmp_path / "a.txt"
    txt.write_text("x")
    with pytest.raises(RefusedImage, match="unsupported file type"):
        read_any(txt, working_spacing_mm=0.2)
    with pytest.raises(RefusedImage, match="not found"):
        read_any(tmp_path / "missing.dcm", working_spacing_mm=0.2)


def test_read_any_mini_mias(shared_data: Path) -> None:
    """mini-MIAS: odd ids are right breasts, even ids left (breast side agrees)."""
    for name, lat in (("mdb003.png", "R"), ("mdb004.png", "L")):
        img = read_any(
            shared_data / "mini-mias" / "png" / name,
            working_spacing_mm=0.4,
            spacing_mm=0.2,
        )
        assert img.meta.laterality == lat
        assert img.geometry.flip is (lat == "R")
        assert img.pixels.shape[1] < 512  # padding cropped away


def test_standardize_never_crops_to_nothing() -> None:
    """A flat or empty image keeps its whole frame; shapes and values are sane."""
    for arr in (np.zeros((100, 80), np.float32), np.full((100, 80), 0.7, np.float32)):
        px, g, lat, src = standardize(
            arr, stored_spacing_mm=0.1, laterality=None, working_spacing_mm=0.1
        )
        assert g.crop == (0, 0, 80, 100) and px.shape == (100, 80)
        assert lat in ("L", "R") and src == "breast-side"
    with pytest.raises(ValueError, match="spacing"):
        standardize(
            np.zeros((10, 10)),
            stored_spacing_mm=0,
            laterality=None,
            working_spacing_mm=0.1,
        )


def test_find_breast_ignores_small_label() -> None:
    """A bright label far from the breast does not widen the crop."""
    img = _breast(256, 192)
    img[10:20, 170:185] = 1.0  # label in the top right corner
    region = find_breast(img)
    assert region.side == "left" and region.found
    assert region.bbox[0] == 0 and region.bbox[2] < 140


def test_model_shape_at_least_one() -> None:
    """An extreme working spacing still gives a 1x1 image at least."""
    px, g, _, _ = standardize(
        _breast(), stored_spacing_mm=0.1, laterality="L", working_spacing_mm=1000.0
    )
    assert px.shape == g.model_shape == (1, 1)


def test_a_guessed_breast_side_names_the_file(tmp_path, caplog):
    """A breast centred in the image, as much tissue left as right, shows no
    side; with no laterality given the warning that it assumes left names the
    file."""
    import logging

    from PIL import Image

    from common.imaging.research_image import read_research_image

    yy, xx = np.mgrid[:128, :128]
    disk = (xx - 63.5) ** 2 + (yy - 63.5) ** 2 < 40**2
    img = np.where(disk, 180, 10).astype(np.uint8)
    path = tmp_path / "even.png"
    Image.fromarray(img).save(path)
    with caplog.at_level(logging.WARNING):
        read_research_image(path, spacing_mm=0.2, working_spacing_mm=0.4)
    lines = [r.getMessage() for r in caplog.records if "ambiguous" in r.getMessage()]
    assert lines and all(str(path) in m for m in lines), caplog.text
