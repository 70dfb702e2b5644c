"""Every shared real DICOM file is decoded correctly or refused for the right reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.errors import RefusedImage
from common.imaging.dicom import read_dicom, read_header
from common.imaging.image_io import read_any
from common.keys import (
    FOR_PRESENTATION,
    FOR_PROCESSING,
    SPACING_CONFIG,
    SPACING_IMAGER_MAG,
    VIEW_CC,
    VIEW_MLO,
)

GE_FILES = {
    "MG-Im-GE-SenDS-scaled.dcm": (FOR_PROCESSING, "MONOCHROME1", 4, 4),
    "MG-Im-GE_Seno_1_ForPresentation.dcm": (FOR_PRESENTATION, "MONOCHROME2", 1, 2),
    "MG-Im-GE_Seno_1_ForProcessing.dcm": (FOR_PROCESSING, "MONOCHROME1", 1, 2),
    "MG-Im-GE_Seno_2_ForPresentation.dcm": (FOR_PRESENTATION, "MONOCHROME2", 1, 2),
}


@pytest.mark.parametrize("name", sorted(GE_FILES))
def test_openrem_ge_header_and_refusal(shared_data: Path, name: str) -> None:
    """GE headers: nonsense PixelSpacing skipped; tiny pixel data refused."""
    path = shared_data / "dicom" / "openrem" / name
    intent, photometric, rows, cols = GE_FILES[name]
    meta = read_header(path)
    assert (meta.laterality, meta.laterality_source) == ("L", "ImageLaterality")
    assert meta.view == VIEW_CC
    assert meta.presentation_intent == intent
    assert meta.photometric == photometric
    assert meta.spacing_source == SPACING_IMAGER_MAG
    assert meta.stored_spacing_mm == pytest.approx(0.094090909)
    assert meta.manufacturer == "GE MEDICAL SYSTEMS"
    with pytest.raises(RefusedImage) as err:
        read_dicom(path, working_spacing_mm=0.1)
    assert err.value.reason.startswith(f"pixel array {rows}x{cols} ")


def test_hologic_without_pixel_data(shared_data: Path) -> None:
    """Hologic header: no PixelData -> refused; header still readable with a default."""
    path = shared_data / "dicom" / "openrem" / "MG-Im-Hologic-PropProj.dcm"
    for default in (None, 0.07):
        with pytest.raises(RefusedImage, match="no pixel data"):
            read_dicom(path, working_spacing_mm=0.1, default_spacing_mm=default)
    with pytest.raises(RefusedImage, match="no usable pixel spacing"):
        read_header(path)
    meta = read_header(path, default_spacing_mm=0.07)
    assert (meta.laterality, meta.laterality_source) == ("R", "Laterality")
    assert meta.spacing_source == SPACING_CONFIG
    assert meta.photometric == "MONOCHROME1"
    assert meta.view == "FLATFIELD"


def test_fodicom_siemens_jpeg_lossless(shared_data: Path) -> None:
    """Siemens JPEG Lossless: blank Manufacturer, spacing from Imager/magnification."""
    path = shared_data / "dicom" / "fo-dicom" / "OutOfBoundsOverlay.dcm"
    img = read_dicom(path, working_spacing_mm=0.1)
    meta = img.meta
    assert meta.manufacturer == ""
    assert meta.model == "Mammomat Inspiration"
    assert (meta.laterality, meta.laterality_source) == ("L", "ImageLaterality")
    assert meta.view == VIEW_CC
    assert meta.spacing_source == SPACING_IMAGER_MAG
    assert meta.stored_spacing_mm == pytest.approx(0.085 / 1.0433386837881)
    assert (meta.rows, meta.cols) == (788, 1318)
    g = img.geometry
    assert g.stored_shape == (788, 1318)
    assert not g.flip
    # the dark (air) band at the top and the biopsy device are cropped away
    assert g.crop[1] > 100
    ch, cw = g.crop_shape
    ratio = meta.stored_spacing_mm / 0.1
    assert g.model_shape == (round(ch * ratio), round(cw * ratio))
    px = img.pixels
    assert px.dtype == np.float32 and 0 <= px.min() and px.max() <= 1
    assert px.mean() > 0.2  # mostly breast tissue after the crop
    # the calcification specks of a real FFDM file, on the model's grid
    with_specks = read_dicom(path, working_spacing_mm=0.1, specks=True)
    sp = with_specks.specks
    assert sp is not None and len(sp) > 0 and sp.dtype == np.float32
    h, w = g.model_shape
    assert np.all((sp[:, 0] >= 0) & (sp[:, 0] <= w) & (sp[:, 1] >= 0) & (sp[:, 1] <= h))
    assert np.all(sp[:, 2] > 3.0)
    np.testing.assert_array_equal(with_specks.pixels, px)  # pixels unchanged


def test_nema_digitised_film(shared_data: Path) -> None:
    """NEMA J2K film (RG, BREAST, SC): accepted with a site default spacing only."""
    path = shared_data / "dicom" / "nema-wg04" / "MG1_J2KI.dcm"
    with pytest.raises(RefusedImage, match="no usable pixel spacing"):
        read_dicom(path, working_spacing_mm=0.4)
    img = read_any(path, working_spacing_mm=0.4, default_spacing_mm=0.05)
    meta = img.meta
    assert (meta.laterality, meta.laterality_source) == ("L", "Laterality")
    assert meta.view == VIEW_MLO
    assert meta.spacing_source == SPACING_CONFIG
    g = img.geometry
    assert g.stored_shape == (4664, 3064) and not g.flip
    # chest wall at the left edge kept; the empty film on the right cropped away
    assert g.crop[0] == 0 and g.crop[2] < 0.8 * 3064
    px = img.pixels
    assert px[:, : px.shape[1] // 4].mean() > px[:, -px.shape[1] // 4 :].mean()
