"""Hostile DICOM headers through ``common.imaging.dicom``.

Pixel budget, colour, Modality LUT, unusable header values, compressed frames
larger than their header or cut into too many JPEG 2000 tiles. (Deflate bombs:
``test_deflate``.)

Each file is small; a header may declare a huge image. The budget must refuse
it from the header alone, before any pixel byte is read or decoded.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000Lossless

from common.config.site import DEFAULT_MAX_PIXELS, SiteConfig
from common.errors import RefusedImage
from common.imaging import dicom
from common.imaging.codestream import MAX_J2K_TILES
from common.imaging.dicom import read_dicom
from common.imaging.image_io import read_any
from tests.conftest import REPO

WORKING = 0.2


def _edit(path: Path, **values: Any) -> Path:
    """Rewrite header elements of ``path`` (raw strings allowed, not validated)."""
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    with pydicom_config.disable_value_validation():
        ds.save_as(path, enforce_file_format=True)
    return path


def test_default_budget_is_the_site_default() -> None:
    """One default, shared by the reader and the site config."""
    assert SiteConfig().max_pixels == DEFAULT_MAX_PIXELS
    assert 29_000_000 < DEFAULT_MAX_PIXELS < 40_000_000  # 28 Mpx detectors fit


def test_budget_refuses_declared_16k_before_reading_pixels(
    tmp_path: Path, factory: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 8.4 MB RLE file declaring 16384^2 pixels: refused from the header.

    Neither the (deferred) PixelData is read from the file nor a decoder run.
    """
    path = factory.write_rle_bomb(tmp_path / "bomb.dcm", full=True)
    deferred: list[str] = []
    real = pydicom.filereader.read_deferred_data_element

    def spy(*args: Any, **kwargs: Any) -> Any:
        deferred.append(str(args[1]))  # (opener, filename, timestamp, elem)
        return real(*args, **kwargs)

    def no_decode(self: Dataset) -> np.ndarray:
        raise AssertionError("pixel data decoded despite the budget")

    monkeypatch.setattr(pydicom.filereader, "read_deferred_data_element", spy)
    monkeypatch.setattr(Dataset, "pixel_array", property(no_decode))
    with pytest.raises(RefusedImage) as exc:
        read_dicom(path, working_spacing_mm=WORKING)
    reason = exc.value.reason
    assert "over the pixel budget" in reason
    assert "16384 x 16384 x 1 x 1 = 268435456 samples" in reason
    assert "BitsAllocated=16" in reason and f"max_pixels={DEFAULT_MAX_PIXELS}" in reason
    assert deferred == []
    with pytest.raises(RefusedImage, match="over the pixel budget"):
        read_any(path, working_spacing_mm=WORKING)
    assert deferred == []
    assert len(dicom.read_dataset(path).PixelData) > 0  # the spy sees reads
    assert deferred == [str(path)]


def test_budget_is_configurable_and_counts_bytes(write_mammo) -> None:
    """128 x 96 = 12288 samples: over a 10000 budget; 32-bit pixels count double."""
    path, _ = write_mammo()
    assert read_dicom(path, working_spacing_mm=WORKING, max_pixels=12288).pixels.size
    with pytest.raises(RefusedImage, match=r"128 x 96 x 1 x 1 = 12288 samples"):
        read_dicom(path, working_spacing_mm=WORKING, max_pixels=10000)
    ds = pydicom.dcmread(path)
    ds.BitsAllocated = 32  # header only: the budget does not look at the pixels
    with pytest.raises(RefusedImage, match=r"49152 bytes decoded at BitsAllocated=32"):
        dicom.check_pixel_budget(ds, path, 20000)
    dicom.check_pixel_budget(ds, path, 24576)
    dicom.check_pixel_budget(ds, path, None)


def test_native_pixel_data_longer_than_its_header_is_refused_unread(
    write_mammo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small header over megabytes of pixel data: the budget trusts the header.

    pydicom would read every byte the element holds (and take the excess as
    frames), so the element's length is checked against the header, from the
    deferred element, before anything is read.
    """
    path, _ = write_mammo()
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData + b"\0" * (4 * 2**20)
    ds.save_as(path, enforce_file_format=True)
    deferred: list[str] = []
    real = pydicom.filereader.read_deferred_data_element

    def spy(*args: Any, **kwargs: Any) -> Any:
        deferred.append(str(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(pydicom.filereader, "read_deferred_data_element", spy)
    with pytest.raises(RefusedImage) as exc:
        read_dicom(path, working_spacing_mm=WORKING)
    assert exc.value.reason.startswith(
        f"PixelData holds {128 * 96 * 2 + 4 * 2**20} bytes, a frame or more "
        f"beyond the {128 * 96 * 2} bytes of the header's Rows x Columns"
    )
    assert deferred == []  # refused from the element's length alone
    dicom.check_pixel_budget(ds, path, None)  # None still disables every check
    # less than a frame of trailing padding: pydicom drops it, so do we
    ds.PixelData = ds.PixelData[: 128 * 96 * 2] + b"\0" * 100
    ds.save_as(path, enforce_file_format=True)
    assert read_dicom(path, working_spacing_mm=WORKING).pixels.size


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("NumberOfFrames", "4", "128 x 96 x 4 x 1 = 49152 samples"),
        ("Rows", "abc", "Rows="),
        ("NumberOfFrames", "-3", "NumberOfFrames=-3 is negative"),
    ],
)
def test_budget_reads_frames_and_refuses_bad_numbers(
    write_mammo, field: str, value: str, needle: str
) -> None:
    """Frames multiply the budget; unparsable header numbers are refused by name."""
    path, _ = write_mammo()
    ds = pydicom.dcmread(path)
    with pydicom_config.disable_value_validation():
        ds[field] = pydicom.DataElement(
            pydicom.datadict.tag_for_keyword(field),
            pydicom.datadict.dictionary_VR(field),
            value,
        )
    with pytest.raises(RefusedImage, match=needle):
        dicom.check_pixel_budget(ds, path, 40000)


def test_budget_keeps_peak_memory_small_on_a_real_8mb_bomb(
    tmp_path: Path, factory: ModuleType
) -> None:
    """The full 8.4 MB RLE frame of 16384^2 (512 MB decoded): reading the file
    under the default budget adds almost nothing to the process's peak RSS."""
    path = factory.write_rle_bomb(tmp_path / "bomb.dcm", full=True)
    assert 8_000_000 < path.stat().st_size < 9_000_000
    script = textwrap.dedent(
        f"""
        import json, resource
        from common.imaging.dicom import read_dicom
        from common.errors import RefusedImage
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            read_dicom({str(path)!r}, working_spacing_mm=0.4)
            reason = None
        except RefusedImage as exc:
            reason = exc.reason
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"reason": reason, "grew_kb": after - before}}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["reason"] and "over the pixel budget" in got["reason"]
    assert got["grew_kb"] < 64 * 1024, got  # decoding would add > 512 MB


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"PhotometricInterpretation": "PALETTE COLOR"}, "'PALETTE COLOR'"),
        ({"PhotometricInterpretation": "RGB"}, "PhotometricInterpretation='RGB'"),
        ({"PhotometricInterpretation": "YBR_FULL"}, "'YBR_FULL'"),
        ({"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB"}, "Samples"),
        ({"PhotometricInterpretation": None}, "PhotometricInterpretation='absent'"),
    ],
    ids=["palette", "rgb-1-sample", "ybr", "rgb-3-samples", "absent"],
)
def test_colour_images_are_refused(
    write_mammo, values: dict[str, Any], needle: str
) -> None:
    """Anything but MONOCHROME1/2 with one sample is refused, naming the field."""
    path, _ = write_mammo()
    _edit(path, **values)
    with pytest.raises(RefusedImage, match="not greyscale") as exc:
        read_dicom(path, working_spacing_mm=WORKING)
    assert needle in exc.value.reason


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"RescaleSlope": "NaN"}, "RescaleSlope='NaN' is not a finite"),
        ({"RescaleSlope": "inf"}, "RescaleSlope='inf' is not a finite"),
        ({"RescaleIntercept": "-Infinity"}, "RescaleIntercept='-Infinity'"),
        ({"RescaleSlope": "0"}, "RescaleSlope='0' is not a finite non-zero"),
        ({"RescaleSlope": "1e308"}, "non-finite values"),
        ({"RescaleIntercept": "1e308", "RescaleSlope": "1e308"}, "1e308"),
    ],
    ids=["nan", "inf", "intercept-inf", "zero", "1e308", "both-1e308"],
)
def test_non_finite_modality_lut_is_refused(
    write_mammo, values: dict[str, str], needle: str
) -> None:
    """A slope or intercept giving NaN/Inf is refused, never an all-zero image."""
    path, _ = write_mammo()
    _edit(path, **values)
    with pytest.raises(RefusedImage, match="Modality LUT") as exc:
        read_dicom(path, working_spacing_mm=WORKING)
    assert needle in exc.value.reason


def test_constant_image_has_no_dynamic_range(write_mammo) -> None:
    """Every stored pixel equal: refused, naming the values (not a blank image)."""
    path, _ = write_mammo()
    ds = pydicom.dcmread(path)
    ds.PixelData = np.full((ds.Rows, ds.Columns), 700, np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(RefusedImage, match="no dynamic range") as exc:
        read_dicom(path, working_spacing_mm=WORKING)
    assert "stored values 700..700" in exc.value.reason


def test_normal_file_still_reads(write_mammo) -> None:
    """The checks refuse nothing that is fine: a small greyscale file reads."""
    path, _ = write_mammo()
    img = read_dicom(path, working_spacing_mm=WORKING)
    assert np.isfinite(img.pixels).all() and img.pixels.max() > img.pixels.min()


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        (
            "modality-lut-without-descriptor",
            "Modality LUT cannot be applied: ModalityLUTSequence[0].LUTDescriptor "
            "absent: AttributeError",
        ),
        (
            "modality-lut-12-bit-entries",
            "ModalityLUTSequence[0].LUTDescriptor=[4096, 0, 12]: TypeError",
        ),
        ("rows-3-bytes", r"Rows=b'\x80\x00\x00' is not an integer"),
    ],
)
def test_unusable_header_values_are_refused_naming_field_and_value(
    write_mammo, factory: ModuleType, kind: str, needle: str
) -> None:
    """Values pydicom parses but cannot use: RefusedImage, not its own error."""
    path, _ = write_mammo()
    factory.break_header(path, kind)
    with pytest.raises(RefusedImage) as exc:
        read_any(path, working_spacing_mm=WORKING)
    assert exc.value.path == str(path)
    assert needle in exc.value.reason
    if kind == "rows-3-bytes":  # the header alone is refused the same way
        with pytest.raises(RefusedImage, match="Rows="):
            dicom.read_header(path)


def _no_decode(self: Dataset) -> np.ndarray:
    raise AssertionError("pixel data decoded despite the codestream check")


def test_j2k_codestream_larger_than_its_header_is_refused_before_decoding(
    tmp_path: Path, factory: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Header 256 x 256 (inside the budget), SIZ 20000 x 20000: openjpeg would
    allocate the SIZ's size; the frame's own size is read and refused first."""
    path = factory.write_j2k_size_bomb(tmp_path / "bomb.dcm", declared=20000)
    intact = factory.write_j2k_size_bomb(tmp_path / "ok.dcm", declared=256)
    assert read_dicom(intact, working_spacing_mm=WORKING).pixels.size  # control
    monkeypatch.setattr(Dataset, "pixel_array", property(_no_decode))
    with pytest.raises(RefusedImage) as exc:
        read_dicom(path, working_spacing_mm=WORKING)
    reason = exc.value.reason
    assert "compressed frame 0 (JPEG 2000 Image Compression (Lossless Only))" in reason
    assert "rows x columns x components = 20000 x 20000 x 1 in its codestream" in reason
    assert "Rows x Columns x SamplesPerPixel = 256 x 256 x 1" in reason


def test_every_frame_the_decoder_would_see_is_checked(
    tmp_path: Path, factory: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Basic Offset Table splitting the data in two frames makes pydicom
    decode the second (excess) frame too: its size is checked as well, and
    unreadable frames (no SIZ) are refused."""
    bomb = factory.write_j2k_size_bomb(tmp_path / "bomb.dcm", declared=20000)
    intact = factory.write_j2k_size_bomb(tmp_path / "ok.dcm", declared=256)
    frames = [
        next(generate_frames(pydicom.dcmread(p).PixelData, number_of_frames=1))
        for p in (intact, bomb)
    ]
    ds = pydicom.dcmread(intact)
    ds.PixelData = encapsulate(frames, has_bot=True)
    ds.save_as(tmp_path / "two.dcm", enforce_file_format=True)
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds.save_as(tmp_path / "blank.dcm", enforce_file_format=True)
    monkeypatch.setattr(Dataset, "pixel_array", property(_no_decode))
    with pytest.raises(RefusedImage, match="compressed frame 1 .* 20000 x 20000"):
        read_dicom(tmp_path / "two.dcm", working_spacing_mm=WORKING)
    with pytest.raises(RefusedImage, match="frame 0 .*: no readable SIZ/SOF"):
        read_dicom(tmp_path / "blank.dcm", working_spacing_mm=WORKING)


def _retile(path: Path, xtsiz: int, ytsiz: int) -> Path:
    """Rewrite XTsiz/YTsiz in the SIZ of the file's one JPEG 2000 frame."""
    ds = pydicom.dcmread(path)
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    at = frame.index(b"\xff\x51")  # SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz XTsiz..
    frame[at + 22 : at + 30] = struct.pack(">II", xtsiz, ytsiz)
    ds.PixelData = encapsulate([bytes(frame)])
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize(
    ("tile", "needle"),
    [
        (
            (2, 2),
            "SIZ tiles: XTsiz x YTsiz = 2 x 2 from XTOsiz, YTOsiz = 0, 0 over "
            "Xsiz x Ysiz = 256 x 256 gives 128 x 128 = 16384 tiles, more than "
            f"MAX_J2K_TILES = {MAX_J2K_TILES}",
        ),
        ((0, 256), "SIZ tiles: XTsiz x YTsiz = 0 x 256: a tile size of 0"),
    ],
    ids=["16384-tiles", "xtsiz-0"],
)
def test_j2k_tile_grid_too_fine_is_refused_before_decoding(
    write_mammo, monkeypatch: pytest.MonkeyPatch, tile: tuple[int, int], needle: str
) -> None:
    """Header and SIZ agree on 256 x 256, but SIZ cuts it into 2 x 2 tiles
    (openjpeg allocates a structure per tile) or gives a tile width of 0:
    refused from the SIZ, naming the fields, before any decoding."""
    path, _ = write_mammo(rows=256, cols=256, compress=JPEG2000Lossless)
    assert read_dicom(path, working_spacing_mm=WORKING).pixels.size  # control
    _retile(path, *tile)
    monkeypatch.setattr(Dataset, "pixel_array", property(_no_decode))
    with pytest.raises(RefusedImage) as exc:
        read_dicom(path, working_spacing_mm=WORKING)
    assert exc.value.path == str(path)
    reason = exc.value.reason
    assert "compressed frame 0 (JPEG 2000 Image Compression (Lossless Only))" in reason
    assert needle in reason


def test_a_voi_lut_of_absurd_entry_bits_is_refused_by_name(write_mammo) -> None:
    """``2 ** 2000`` overflowed a float: an OverflowError naming no field."""
    from pydicom.dataelem import DataElement
    from pydicom.sequence import Sequence

    path, _ = write_mammo()
    ds = pydicom.dcmread(path)
    for name in ("WindowCenter", "WindowWidth"):  # the window would win
        if name in ds:
            delattr(ds, name)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 2000]
    item.add(DataElement(0x00283006, "US", list(range(4096))))
    ds.VOILUTSequence = Sequence([item])
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(RefusedImage, match="LUTDescriptor bits per entry = 2000"):
        read_dicom(path, working_spacing_mm=WORKING)


def test_a_view_code_sequence_written_as_text_is_no_view(write_mammo) -> None:
    """A sender's ViewCodeSequence as LO text read as no view, not a crash."""
    from pydicom.dataelem import DataElement

    from client.cad_sr import build_cad_sr

    path, _ = write_mammo()
    ds = pydicom.dcmread(path)
    del ds.ViewPosition
    ds.add(DataElement(0x00540220, "LO", "R-10242"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", "1.2.3.4.5"
    ds.save_as(path, enforce_file_format=True)
    assert dicom.resolve_view(pydicom.dcmread(path)) is None
    read_dicom(path, working_spacing_mm=WORKING)  # no AttributeError
    build_cad_sr([pydicom.dcmread(path, stop_before_pixels=True)], [[]])
