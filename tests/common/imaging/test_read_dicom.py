"""Synthetic DICOM mammograms through ``common.imaging.dicom``.

Pixels, geometry, header.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from common.errors import RefusedImage
from common.imaging import dicom
from common.imaging.dicom import decode_pixels, read_dicom, read_header
from common.keys import (
    SPACING_CONFIG,
    SPACING_IMAGER,
    SPACING_IMAGER_MAG,
    SPACING_PIXEL,
    VIEW_CC,
    VIEW_MLO,
)

WORKING = 0.2  # twice the synthetic stored spacing of 0.1 mm


def _marker_centroid(pixels: np.ndarray) -> tuple[float, float]:
    """Intensity-weighted centre (x, y), pixel-edge coords, of what exceeds tissue."""
    excess = np.clip(pixels - 0.75 * pixels.max() - 1e-6, 0, None)
    excess = np.where(pixels > np.percentile(pixels, 99) * 0.9, excess, 0)
    total = excess.sum()
    assert total > 0, "marker not found"
    ys, xs = np.indices(pixels.shape)
    return (
        float((excess * (xs + 0.5)).sum() / total),
        float((excess * (ys + 0.5)).sum() / total),
    )


def _check_standard(path: Path, ph: Any, **kwargs: Any) -> Any:
    """Read ``path`` and assert dense-bright, breast-left, marker where mapped."""
    img = read_dicom(path, working_spacing_mm=WORKING, **kwargs)
    px = img.pixels
    assert px.dtype == np.float32 and px.ndim == 2
    assert 0.0 <= px.min() and px.max() <= 1.0
    assert px.shape == img.geometry.model_shape
    h, w = px.shape
    # breast on the left: the chest-wall column is tissue, the far column is not
    assert px[h // 2, 0] > px[h // 2, w - 1] + 0.2
    assert px[:, : w // 2].mean() > px[:, w // 2 :].mean()
    # dense bright: the marker (density 1) is the brightest thing, background darkest
    stored = decode_pixels(pydicom.dcmread(path), path)
    x0, y0, x1, y1 = ph.marker_box
    marker = stored[y0:y1, x0:x1].mean()
    tissue = stored[ph.density == 0.5].mean()
    background = stored[ph.density == 0].mean()
    assert marker > tissue + 0.1 > background + 0.2
    # the marker lands where Geometry.to_model says, within half a model pixel
    box = img.geometry.to_model(np.array([ph.marker_box], dtype=float))[0]
    cx, cy = _marker_centroid(px)
    assert abs(cx - (box[0] + box[2]) / 2) <= 0.5
    assert abs(cy - (box[1] + box[3]) / 2) <= 0.5
    # round trip to stored space
    back = img.geometry.to_stored(box[None])[0]
    np.testing.assert_allclose(back, ph.marker_box, atol=1e-6)
    return img


@pytest.mark.parametrize(
    ("photometric", "lut_shape"),
    [
        ("MONOCHROME2", None),
        ("MONOCHROME1", None),
        ("MONOCHROME1", "INVERSE"),
        ("MONOCHROME2", "INVERSE"),
        ("MONOCHROME2", "IDENTITY"),
    ],
)
@pytest.mark.parametrize("side", ["left", "right"])
def test_photometric_and_side(write_mammo, photometric, lut_shape, side) -> None:
    """Every photometric variant decodes dense-bright with the breast on the left."""
    path, ph = write_mammo(photometric=photometric, lut_shape=lut_shape, side=side)
    img = _check_standard(path, ph)
    assert img.geometry.flip is (side == "right")
    assert img.meta.photometric == photometric


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window": (2048.0, 4096.0, "LINEAR")},
        {"window": (2048.0, 4096.0, "SIGMOID")},
        {"window": (2048.0, 4096.0, "LINEAR_EXACT")},
        {"window": None, "voi_lut": True},
        {"window": None},
        {
            "intent": "FOR PROCESSING",
            "photometric": "MONOCHROME1",
            "lut_shape": "INVERSE",
            "window": None,
        },
        {"intent": "FOR PROCESSING", "photometric": "MONOCHROME2", "window": None},
    ],
    ids=[
        "linear",
        "sigmoid",
        "linear-exact",
        "voi-lut-seq",
        "no-voi",
        "proc-m1",
        "proc-m2",
    ],
)
def test_voi_and_intent(write_mammo, kwargs) -> None:
    """Windows, VOI LUT Sequence and FOR PROCESSING all give dense-bright [0, 1]."""
    path, ph = write_mammo(**kwargs)
    img = _check_standard(path, ph)
    assert img.meta.presentation_intent == kwargs.get("intent", "FOR PRESENTATION")


def test_sigmoid_window_values(write_mammo) -> None:
    """SIGMOID follows PS3.3: value at the centre is 0.5, monotone increasing."""
    path, _ = write_mammo(window=(2048.0, 1000.0, "SIGMOID"))
    ds = pydicom.dcmread(path)
    ds.PixelData = (
        np.array([[0, 2048, 4095]], dtype=np.uint16)
        .repeat(64, 0)
        .repeat(22, 1)[:, :64]
        .tobytes()
    )
    ds.Rows, ds.Columns = 64, 64
    arr = np.tile(np.array([0, 2048, 4095], dtype=np.uint16), (64, 22))[:, :64]
    out = dicom.to_unit_range(arr, ds, path)
    assert out[0, 1] == pytest.approx(0.5, abs=1e-6)
    assert out[0, 0] == pytest.approx(1 / (1 + np.exp(4 * 2048 / 1000)), abs=1e-6)
    assert out[0, 0] < out[0, 1] < out[0, 2]


def test_first_window_is_used(write_mammo) -> None:
    """With several windows the first one applies (documented choice)."""
    path, _ = write_mammo()
    ds = pydicom.dcmread(path)
    ds.WindowCenter = [1000, 3000]
    ds.WindowWidth = [200, 200]
    arr = np.full((64, 64), 1000, dtype=np.uint16)
    assert dicom.to_unit_range(arr, ds, path).mean() == pytest.approx(0.5, abs=0.01)


def test_window_preferred_over_voi_lut_sequence(write_mammo) -> None:
    """When both are present the window (with VOILUTFunction) wins."""
    path, _ = write_mammo(window=(100.0, 50.0, None), voi_lut=True)
    ds = pydicom.dcmread(path)
    arr = np.full((64, 64), 1000, dtype=np.uint16)
    assert dicom.to_unit_range(arr, ds, path).min() == 1.0  # far above the window
    del ds.WindowCenter, ds.WindowWidth
    lut = dicom.to_unit_range(arr, ds, path)
    assert lut.mean() == pytest.approx(np.sqrt(1000 / 4095), abs=0.01)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "j2k"])
def test_compressed(write_mammo, syntax) -> None:
    """RLE and JPEG 2000 lossless decode to the same image as uncompressed."""
    path, ph = write_mammo(compress=syntax)
    ref_path, _ = write_mammo("ref.dcm")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    img = _check_standard(path, ph)
    ref = read_dicom(ref_path, working_spacing_mm=WORKING)
    np.testing.assert_array_equal(img.pixels, ref.pixels)


@pytest.mark.parametrize(
    ("kwargs", "mm", "source"),
    [
        (
            {"pixel_spacing": (0.1, 0.1), "imager_spacing": (0.2, 0.2)},
            0.1,
            SPACING_PIXEL,
        ),
        ({"pixel_spacing": None, "imager_spacing": (0.1, 0.1)}, 0.1, SPACING_IMAGER),
        (
            {
                "pixel_spacing": None,
                "imager_spacing": (0.11, 0.11),
                "magnification": 1.1,
            },
            0.1,
            SPACING_IMAGER_MAG,
        ),
        (
            {"pixel_spacing": (53.9, 45.0), "imager_spacing": (0.1, 0.1)},
            0.1,
            SPACING_IMAGER,
        ),
        ({"pixel_spacing": (0.001, 0.001)}, 0.1, SPACING_CONFIG),
        ({"pixel_spacing": None}, 0.1, SPACING_CONFIG),
    ],
    ids=["pixel", "imager", "imager-mag", "nonsense-pixel", "tiny-pixel", "none"],
)
def test_spacing_sources(write_mammo, kwargs, mm, source) -> None:
    """Spacing comes from the documented source, nonsense treated as absent."""
    path, ph = write_mammo(**kwargs)
    img = _check_standard(path, ph, default_spacing_mm=0.1)
    assert img.meta.stored_spacing_mm == pytest.approx(mm)
    assert img.meta.spacing_source == source
    # 0.1 mm stored -> 0.2 mm working halves the crop size (rounded)
    ch, cw = img.geometry.crop_shape
    assert img.geometry.model_shape == (round(ch / 2), round(cw / 2))


def test_no_spacing_and_no_default_is_refused(write_mammo) -> None:
    """Without any spacing and no site default the reader refuses."""
    path, _ = write_mammo(pixel_spacing=(5.0, 5.0))
    with pytest.raises(RefusedImage, match="no usable pixel spacing"):
        read_dicom(path, working_spacing_mm=WORKING)


@pytest.mark.parametrize(
    ("kwargs", "lat", "source"),
    [
        (
            {"image_laterality": "R", "series_laterality": "L", "side": "right"},
            "R",
            "ImageLaterality",
        ),
        (
            {"image_laterality": None, "series_laterality": "R", "side": "right"},
            "R",
            "Laterality",
        ),
        ({"image_laterality": None, "side": "right"}, "R", "breast-side"),
        ({"image_laterality": None, "side": "left"}, "L", "breast-side"),
        ({"image_laterality": "B", "side": "left"}, "L", "breast-side"),
    ],
)
def test_laterality_sources(write_mammo, kwargs, lat, source) -> None:
    """ImageLaterality, then Laterality, then the side the breast is on."""
    path, ph = write_mammo(**kwargs)
    img = _check_standard(path, ph)
    assert (img.meta.laterality, img.meta.laterality_source) == (lat, source)


@pytest.mark.parametrize(
    ("kwargs", "view"),
    [
        ({"view_position": "MLO"}, VIEW_MLO),
        ({"view_position": "cc "}, VIEW_CC),
        (
            {"view_position": None, "view_code": ("R-10242", "SNM3", "cranio-caudal")},
            VIEW_CC,
        ),
        ({"view_position": "", "view_code": ("399368009", "SCT", "x")}, VIEW_MLO),
        (
            {
                "view_position": None,
                "view_code": ("9", "99LOCAL", "medio-lateral oblique"),
            },
            VIEW_MLO,
        ),
        ({"view_position": None}, None),
    ],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
def test_view_sources(write_mammo, kwargs, view) -> None:
    """View from ViewPosition, else ViewCodeSequence code, else its meaning."""
    path, _ = write_mammo(**kwargs)
    assert read_header(path).view == view


def test_read_header_does_not_need_pixels(write_mammo) -> None:
    """read_header works on a pixel-less file; read_dicom refuses it."""
    path, _ = write_mammo(
        with_pixels=False, image_laterality=None, series_laterality="R"
    )
    meta = read_header(path)
    assert (meta.laterality, meta.laterality_source) == ("R", "Laterality")
    assert (meta.rows, meta.cols) == (128, 96)
    with pytest.raises(RefusedImage, match="no pixel data"):
        read_dicom(path, working_spacing_mm=WORKING)


@pytest.mark.parametrize(
    ("kwargs", "accepted"),
    [
        (
            {
                "modality": "CT",
                "body_part": "CHEST",
                "sop_class": "1.2.840.10008.5.1.4.1.1.2",
            },
            False,
        ),
        (
            {
                "modality": "CT",
                "body_part": "BREAST",
                "sop_class": "1.2.840.10008.5.1.4.1.1.2",
            },
            False,
        ),
        (
            {
                "modality": "RG",
                "body_part": "CHEST",
                "sop_class": "1.2.840.10008.5.1.4.1.1.7",
            },
            False,
        ),
        (
            {
                "modality": "RG",
                "body_part": "BREAST",
                "sop_class": "1.2.840.10008.5.1.4.1.1.7",
            },
            True,
        ),
        ({"modality": "DX", "body_part": None}, True),  # MG SOP class
    ],
    ids=["ct-chest", "ct-breast", "rg-chest", "rg-breast-sc", "mg-sop-class"],
)
def test_acceptance_rule(write_mammo, kwargs, accepted) -> None:
    """Accept MG / mammography SOP class / BREAST projection; refuse the rest."""
    path, _ = write_mammo(**kwargs)
    if accepted:
        assert read_dicom(path, working_spacing_mm=WORKING).pixels.size > 0
    else:
        with pytest.raises(RefusedImage) as err:
            read_dicom(path, working_spacing_mm=WORKING)
        reason = err.value.reason
        assert "not a breast projection image" in reason
        assert f"Modality='{kwargs['modality']}'" in reason
        assert "BodyPartExamined=" in reason and "\n" not in reason


def test_truncated_file_refused(write_mammo, tmp_path) -> None:
    """A file cut in the middle of its pixel data is refused in one line."""
    path, _ = write_mammo()
    data = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 5000])
    with pytest.raises(RefusedImage) as err:
        read_dicom(cut, working_spacing_mm=WORKING)
    assert "\n" not in err.value.reason
    assert "decoded" in err.value.reason or "unreadable" in err.value.reason
    head = tmp_path / "head.dcm"
    head.write_bytes(data[:200])
    with pytest.raises(RefusedImage):
        read_dicom(head, working_spacing_mm=WORKING)


def test_unknown_transfer_syntax_refused(write_mammo) -> None:
    """A private transfer syntax UID is refused naming the UID."""
    uid = "1.2.826.0.1.3680043.9.9999.1"
    path, _ = write_mammo(transfer_syntax=uid)
    with pytest.raises(RefusedImage, match=r"unsupported transfer syntax .*9999\.1"):
        read_dicom(path, working_spacing_mm=WORKING)


def test_missing_decoder_names_package(write_mammo, monkeypatch) -> None:
    """A known syntax without an installed plugin names the package to install."""
    path, _ = write_mammo(compress=JPEG2000Lossless)

    class _Unavailable:
        is_available = False

    monkeypatch.setattr(dicom, "get_decoder", lambda uid: _Unavailable())
    with pytest.raises(RefusedImage) as err:
        read_dicom(path, working_spacing_mm=WORKING)
    assert "1.2.840.10008.1.2.4.90" in err.value.reason
    assert "pylibjpeg-openjpeg" in err.value.reason


@pytest.mark.parametrize(("rows", "cols"), [(32, 96), (128, 8)])
def test_too_small_refused(write_mammo, rows, cols) -> None:
    """A pixel array under 64 px a side is refused naming rows x cols."""
    path, _ = write_mammo(rows=rows, cols=cols)
    with pytest.raises(RefusedImage, match=f"{rows}x{cols}"):
        read_dicom(path, working_spacing_mm=WORKING)


def test_not_a_file(tmp_path) -> None:
    """Missing files and non-DICOM bytes are refused, not crashed on."""
    with pytest.raises(RefusedImage, match="not found"):
        read_dicom(tmp_path / "nope.dcm", working_spacing_mm=WORKING)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"hello world" * 10)
    with pytest.raises(RefusedImage):
        read_dicom(junk, working_spacing_mm=WORKING)
    assert not dicom.is_dicom(junk)
