"""Bad input that used to pass, or to fail unclearly, through the readers.

PNG/TIFF research images without dynamic range or with non-finite pixels,
an implausible research-image spacing, VOI and Modality LUTs shorter than
their descriptor, an RLE payload that no decoder reads (and the tracebacks
pydicom logged for it), BitsAllocated 0.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from common.errors import RefusedImage
from common.imaging import dicom
from common.imaging.dicom import read_dicom
from common.imaging.image import MAX_SPACING_MM, MIN_SPACING_MM, check_spacing
from common.imaging.image_io import read_any
from common.imaging.research_image import load_grey01, read_research_image

WORKING = 0.4


def _mammo(rows: int = 256, cols: int = 200) -> Dataset:
    """A valid 12-bit-in-16 MG dataset (random pixels), ready to save."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sop = "1.2.840.10008.5.1.4.1.1.1.2"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop
    uid = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "P1", "MG"
    ds.ImageLaterality, ds.ViewPosition = "L", "CC"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.1, 0.1]
    rng = np.random.default_rng(0)
    ds.PixelData = rng.integers(0, 4000, (rows, cols)).astype(np.uint16).tobytes()
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _lut_item(entries: int, data: list[int] | bytes, vr: str = "US") -> Dataset:
    """A LUT item declaring ``entries`` 16-bit entries from 0, holding ``data``."""
    item = Dataset()
    item.LUTDescriptor = [entries, 0, 16]
    item.add(DataElement(0x00283006, vr, data))
    return item


# --- PNG/TIFF research images: no dynamic range, non-finite pixels ----------


@pytest.mark.parametrize(
    ("name", "array", "needle"),
    [
        ("zero.png", np.zeros((300, 300), np.uint8), "every pixel is 0 (uint8)"),
        ("white.png", np.full((300, 300), 255, np.uint8), "every pixel is 255"),
        ("flat16.png", np.full((300, 300), 700, np.uint16), "every pixel is 700"),
        ("flat.tif", np.full((300, 300), 0.5, np.float32), "every pixel is 0.5"),
    ],
)
def test_a_constant_research_image_is_refused_like_dicom(
    tmp_path: Path, name: str, array: np.ndarray, needle: str
) -> None:
    """A black PNG scored 100 "masses"; DICOM refuses the same pixels."""
    path = tmp_path / name
    Image.fromarray(array).save(path)
    with pytest.raises(RefusedImage, match="no dynamic range: ") as exc:
        read_any(path, working_spacing_mm=WORKING, spacing_mm=0.2)
    assert exc.value.path == str(path) and needle in exc.value.reason
    with pytest.raises(RefusedImage, match="no dynamic range"):
        load_grey01(path)  # the overlay's reader too


@pytest.mark.parametrize(
    ("fill", "needle"),
    [
        (np.nan, "pixel values not finite (NaN): 90000 of 90000 pixels"),
        (np.inf, "pixel values not finite (inf): 90000 of 90000 pixels"),
    ],
)
def test_a_non_finite_float_tiff_is_refused(
    tmp_path: Path, fill: float, needle: str
) -> None:
    """A float TIFF of NaN gave 0 detections and exit 0; now refused by name."""
    path = tmp_path / "nan.tif"
    Image.fromarray(np.full((300, 300), fill, np.float32)).save(path)
    with pytest.raises(RefusedImage) as exc:
        read_any(path, working_spacing_mm=WORKING, spacing_mm=0.2)
    assert exc.value.path == str(path) and exc.value.reason == needle


def test_one_nan_pixel_is_enough(tmp_path: Path) -> None:
    """NaN among real values is named too, with both kinds and the count."""
    arr = np.random.default_rng(2).uniform(0, 1, (100, 100)).astype(np.float32)
    arr[5, 5], arr[6, 6] = np.nan, -np.inf
    path = tmp_path / "some.tif"
    Image.fromarray(arr).save(path)
    with pytest.raises(RefusedImage, match=r"not finite \(NaN, -inf\): 2 of 10000"):
        load_grey01(path)


# --- research-image spacing -------------------------------------------------


def test_the_spacing_range_is_the_dicom_range() -> None:
    """One range for every reader: DICOM's."""
    assert (dicom.MIN_SPACING_MM, dicom.MAX_SPACING_MM) == (0.01, 1.0)
    assert (MIN_SPACING_MM, MAX_SPACING_MM) == (0.01, 1.0)
    assert check_spacing("x.png", 0.01, "spacing_mm") == 0.01
    assert check_spacing("x.png", 1, "spacing_mm") == 1.0


@pytest.mark.parametrize("spacing", [50.0, 1.5, 0.001, 0.0, -0.2, float("nan")])
def test_an_implausible_research_spacing_is_refused_before_resampling(
    tmp_path: Path, spacing: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--spacing-mm 50`` upsampled 300 x 300 to 37500 x 37500: refused first."""
    path = tmp_path / "a.png"
    arr = np.random.default_rng(3).integers(0, 255, (300, 300)).astype(np.uint8)
    Image.fromarray(arr).save(path)

    def no_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("pixels read despite the spacing")

    monkeypatch.setattr("common.imaging.research_image.load_grey01", no_read)
    with pytest.raises(RefusedImage) as exc:
        read_any(path, working_spacing_mm=WORKING, spacing_mm=spacing)
    assert exc.value.path == str(path)
    assert exc.value.reason.startswith(f"spacing_mm={spacing!r} mm (images.csv row")
    assert "outside the plausible [0.01, 1.0] mm" in exc.value.reason
    with pytest.raises(RefusedImage, match="default_spacing_mm or --default"):
        read_any(path, working_spacing_mm=WORKING, default_spacing_mm=spacing)
    with pytest.raises(RefusedImage, match=f"spacing_mm={spacing!r} mm is outside"):
        read_research_image(path, spacing_mm=spacing, working_spacing_mm=WORKING)


# --- VOI and Modality LUTs shorter than declared ----------------------------


def _no_window(ds: Dataset) -> Dataset:
    for name in ("WindowCenter", "WindowWidth"):
        if name in ds:
            delattr(ds, name)
    return ds


@pytest.mark.parametrize(
    ("item", "needle"),
    [
        (
            _lut_item(4096, [0, 65535]),
            "VOILUTSequence[0]: LUTDescriptor declares 4096 entries, LUTData holds 2",
        ),
        (
            _lut_item(4096, np.array([0, 65535], "<u2").tobytes(), "OW"),
            "VOILUTSequence[0]: LUTDescriptor declares 4096 entries, LUTData holds 2",
        ),
        (
            _lut_item(0, list(range(4096))),
            "VOILUTSequence[0]: LUTDescriptor declares 65536 entries (first "
            "value 0), LUTData holds 4096",
        ),
        (_lut_item(4096, []), "VOILUTSequence[0]: empty LUTData"),
    ],
    ids=["us-short", "ow-short", "zero-means-65536", "empty"],
)
def test_a_short_voi_lut_is_refused(tmp_path: Path, item: Dataset, needle: str) -> None:
    """Two entries for 4096 made a near-binary image that the model scored."""
    ds = _no_window(_mammo())
    ds.VOILUTSequence = Sequence([item])
    path = _save(ds, tmp_path / "voi.dcm")
    with pytest.raises(RefusedImage) as exc:
        read_dicom(path, working_spacing_mm=WORKING)
    assert exc.value.path == str(path) and exc.value.reason == needle


def test_a_full_voi_lut_still_reads(tmp_path: Path) -> None:
    """A LUT holding what it declares (or more) is applied as before."""
    ds = _no_window(_mammo())
    ds.VOILUTSequence = Sequence([_lut_item(4096, list(range(0, 65536, 16)))])
    img = read_dicom(_save(ds, tmp_path / "ok.dcm"), working_spacing_mm=WORKING)
    assert img.pixels.max() > img.pixels.min()


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (
            [0, 65535],
            "ModalityLUTSequence[0]: LUTDescriptor declares 4096 entries, "
            "LUTData holds 2",
        ),
        ([], "ModalityLUTSequence[0]: empty LUTData"),
    ],
    ids=["short", "empty"],
)
def test_a_short_modality_lut_is_refused_before_pydicom(
    tmp_path: Path, data: list[int], needle: str
) -> None:
    """Checked before ``apply_modality_lut`` clips values into the short table."""
    ds = _mammo()
    item = _lut_item(4096, data)
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = Sequence([item])
    path = _save(ds, tmp_path / "mod.dcm")
    with pytest.raises(RefusedImage) as exc:
        read_dicom(path, working_spacing_mm=WORKING)
    assert exc.value.reason == needle


def test_a_short_modality_lut_within_its_values_is_refused_too(
    tmp_path: Path,
) -> None:
    """Stored values all inside the held entries: pydicom mapped it silently."""
    ds = _mammo()
    ds.PixelData = np.tile(np.arange(2, dtype=np.uint16), 256 * 100).tobytes()
    item = _lut_item(4096, [0, 4000])
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = Sequence([item])
    with pytest.raises(RefusedImage, match="declares 4096 entries, LUTData holds 2"):
        read_dicom(_save(ds, tmp_path / "mod.dcm"), working_spacing_mm=WORKING)


# --- a broken RLE payload ---------------------------------------------------


def _broken_rle(path: Path) -> Path:
    ds = _mammo()
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([b"\x01" * 100])
    ds["PixelData"].VR = "OB"
    return _save(ds, path)


def test_a_broken_rle_payload_is_one_line_with_the_decoders_reasons(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No pydicom traceback at ERROR; the reason is each plugin's own."""
    path = _broken_rle(tmp_path / "rle.dcm")
    caplog.set_level(logging.INFO)
    with pytest.raises(RefusedImage) as exc:
        read_dicom(path, working_spacing_mm=WORKING)
    reason = exc.value.reason
    assert reason.startswith("pixel data cannot be decoded: ")
    assert "Unable to decode" not in reason and "\n" not in reason
    assert "The RLE header specifies an invalid number of segments (16843009)" in (
        reason
    )
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert loud == [], [r.getMessage() for r in loud]


def test_the_decoder_tracebacks_go_to_debug_and_only_around_the_decode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Kept at DEBUG on the reader's logger; pydicom's logger unchanged after."""
    path = _broken_rle(tmp_path / "rle.dcm")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RefusedImage):
        read_dicom(path, working_spacing_mm=WORKING)
    debug = [r for r in caplog.records if r.name == dicom.log.name and r.exc_info]
    assert debug and all(r.levelno == logging.DEBUG for r in debug)
    logger = logging.getLogger(dicom.PYDICOM_DECODER_LOGGER)
    assert logger.filters == []
    caplog.clear()
    logger.error("outside a decode", exc_info=ValueError("x"))
    assert [r.getMessage() for r in caplog.records] == ["outside a decode"]


def test_the_decoder_logger_is_the_one_pydicom_uses() -> None:
    """An upgrade that renames it would let the tracebacks through again."""
    from pydicom.pixels.decoders import base

    assert base.LOGGER.name == dicom.PYDICOM_DECODER_LOGGER


def test_other_decode_failures_keep_their_one_line() -> None:
    """Only pydicom's "all plugins failed" error is taken apart."""
    assert dicom._decode_failure(ValueError("short\nmore")) == "ValueError: short"
    assert dicom._decode_failure(RuntimeError("Unable to decode as")) == (
        "RuntimeError: Unable to decode as"
    )


# --- BitsAllocated ----------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 12, 2, 64])
def test_an_invalid_bits_allocated_is_named(tmp_path: Path, bits: int) -> None:
    """BitsAllocated=0 read as "51200 bytes beyond ... at BitsAllocated=0"."""
    ds = _mammo()
    ds.BitsAllocated = bits
    path = _save(ds, tmp_path / "bits.dcm")
    with pytest.raises(RefusedImage) as exc:
        read_dicom(path, working_spacing_mm=WORKING)
    assert exc.value.reason == (
        f"BitsAllocated={bits} is invalid: expected 1, 8, 16 or 32 bits per "
        "stored sample"
    )
    with pytest.raises(RefusedImage, match=f"BitsAllocated={bits} is invalid"):
        dicom.check_pixel_budget(pydicom.dcmread(path), path, None)


@pytest.mark.parametrize("bits", [8, 32])
def test_eight_and_32_bit_images_still_read(tmp_path: Path, bits: int) -> None:
    """The values the reader decodes are not refused."""
    ds = _mammo()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    dtype = np.uint8 if bits == 8 else np.uint32
    rng = np.random.default_rng(4)
    ds.PixelData = rng.integers(0, 250, (256, 200)).astype(dtype).tobytes()
    img = read_dicom(_save(ds, tmp_path / "ok.dcm"), working_spacing_mm=WORKING)
    assert img.pixels.max() > img.pixels.min()


def test_several_lateralities_are_ignored_with_a_warning_naming_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ImageLaterality ``L\\R`` is not read as L: it is passed over, named, and
    the series Laterality decides."""
    ds = _mammo()
    ds.ImageLaterality = ["L", "R"]
    ds.Laterality = "R"
    path = _save(ds, tmp_path / "two.dcm")
    with caplog.at_level(logging.WARNING):
        img = read_dicom(path, working_spacing_mm=0.4)
    assert img.meta.laterality == "R" and img.meta.laterality_source == "Laterality"
    assert f"{path}: ImageLaterality='L\\\\R' holds 2 values" in caplog.text


def test_an_unknown_presentation_lut_shape_is_named_and_read_as_identity(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ds = _mammo()
    ds.PresentationLUTShape = "BOGUS"
    path = _save(ds, tmp_path / "shape.dcm")
    with caplog.at_level(logging.WARNING):
        bogus = read_dicom(path, working_spacing_mm=0.4)
    assert f"{path}: PresentationLUTShape='BOGUS' is neither IDENTITY nor" in (
        caplog.text
    )
    ds.PresentationLUTShape = "IDENTITY"
    plain = read_dicom(_save(ds, tmp_path / "plain.dcm"), working_spacing_mm=0.4)
    np.testing.assert_array_equal(bogus.pixels, plain.pixels)


def test_grey_with_alpha_reads_as_grey(tmp_path: Path) -> None:
    """An LA PNG (grey + alpha) is its grey plane, not an IndexError."""
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (96, 96)).astype(np.uint8)
    la = np.dstack([grey, np.full_like(grey, 255)])
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    np.testing.assert_allclose(
        load_grey01(tmp_path / "la.png"), grey / 255.0, atol=1e-6
    )


def test_float_raw_values_are_scaled_by_their_range_not_clipped(
    tmp_path: Path,
) -> None:
    """A float TIFF of raw 12-bit values keeps its contrast (clipping to
    [0, 1] made it near binary)."""
    rng = np.random.default_rng(2)
    raw = rng.uniform(100.0, 4000.0, (96, 96)).astype(np.float32)
    Image.fromarray(raw).save(tmp_path / "raw.tif")
    unit = load_grey01(tmp_path / "raw.tif")
    expected = (raw - raw.min()) / (raw.max() - raw.min())
    np.testing.assert_allclose(unit, expected, atol=1e-5)
    assert len(np.unique(unit)) > 1000


def test_pydicom_warnings_while_parsing_name_the_file_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What pydicom tolerates it says as a warning and on its own logger,
    neither naming the file: the reader says it once, naming the file."""
    import warnings

    path = _save(_mammo(), tmp_path / "vr.dcm")
    real = pydicom.dcmread
    said = "Expected implicit VR, but found explicit VR - using explicit VR"

    def tolerant(*args, **kwargs):
        logging.getLogger("pydicom").warning(said)
        warnings.warn(said, UserWarning, stacklevel=1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", tolerant)
    with caplog.at_level(logging.WARNING):
        dicom.read_dataset(path)
    ours = [r.getMessage() for r in caplog.records if said in r.getMessage()]
    assert ours == [f"{path}: pydicom: {said}"]
    assert logging.getLogger("pydicom").filters == []
