"""The size a compressed frame declares: hand-made codestreams and real files."""

from __future__ import annotations

import struct
from pathlib import Path
from types import ModuleType

import numpy as np
import pydicom
import pytest
from pydicom.encaps import generate_frames
from pydicom.uid import JPEG2000Lossless

from common.imaging.codestream import (
    JP2_SIGNATURE,
    MAX_J2K_TILES,
    Tiling,
    codestream_shape,
    codestream_tiling,
)
from common.imaging.dicom import check_codestream, read_dataset


def j2k(
    xsiz: int = 300,
    ysiz: int = 200,
    xo: int = 0,
    yo: int = 0,
    comps: int = 1,
    tile: tuple[int, int] | None = None,
    tile_offset: tuple[int, int] = (0, 0),
) -> bytes:
    """SOC + a SIZ segment (8-bit unsigned components) + EOC.

    One tile of the image's extent unless ``tile`` gives (XTsiz, YTsiz).
    SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz Csiz, then
    Ssiz XRsiz YRsiz per component (ISO/IEC 15444-1 A.5.1).
    """
    lsiz = 38 + 3 * comps
    xt, yt = tile or (xsiz, ysiz)
    siz = struct.pack(
        ">HHIIIIIIIIH", lsiz, 0, xsiz, ysiz, xo, yo, xt, yt, *tile_offset, comps
    )
    return b"\xff\x4f\xff\x51" + siz + b"\x07\x01\x01" * comps + b"\xff\xd9"


def box(kind: bytes, payload: bytes, *, extended: bool = False) -> bytes:
    """A JP2 box (``extended``: LBox 1 and a 64-bit XLBox)."""
    if extended:
        return struct.pack(">I4sQ", 1, kind, 16 + len(payload)) + payload
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def segment(marker: int, payload: bytes) -> bytes:
    """A JPEG marker segment: FF, marker, length (itself included), payload."""
    return bytes([0xFF, marker]) + struct.pack(">H", 2 + len(payload)) + payload


def sof(marker: int, rows: int, cols: int, comps: int = 1, bits: int = 12) -> bytes:
    """A SOFn segment: precision, Y, X, Nf and one 3-byte spec per component."""
    body = struct.pack(">BHHB", bits, rows, cols, comps) + b"\x01\x11\x00" * comps
    return segment(marker, body)


def jpeg(*segments: bytes) -> bytes:
    """SOI + ``segments`` + a scan header + EOI."""
    scan = segment(0xDA, b"\x01\x01\x00\x01\x00\x00")
    return b"\xff\xd8" + b"".join(segments) + scan + b"\x00" * 8 + b"\xff\xd9"


def test_j2k_size_is_the_siz_extent_minus_the_offset() -> None:
    assert j2k()[4:6] == struct.pack(">H", 41)  # Lsiz = 38 + 3 x Csiz
    assert codestream_shape(j2k()) == (200, 300, 1)
    assert codestream_shape(j2k(300, 200, xo=10, yo=20, comps=3)) == (180, 290, 3)
    assert codestream_shape(j2k(20000, 20000)) == (20000, 20000, 1)
    assert codestream_shape(j2k(300, 200, xo=300)) is None  # offset past the size


def test_j2k_tiling_is_read_from_siz() -> None:
    """XTsiz, YTsiz, XTOsiz, YTOsiz; tiles = ceil((Xsiz - XTOsiz) / XTsiz) x
    ceil((Ysiz - YTOsiz) / YTsiz)."""
    one = codestream_tiling(j2k())
    assert one == Tiling(300, 200, 0, 0, 300, 200, 0, 0) and one.tiles == 1
    big = codestream_tiling(j2k(4000, 5000, tile=(1024, 1024)))
    assert big is not None and big.grid == (4, 5) and big.tiles == 20
    assert big.problem() is None
    offset = codestream_tiling(
        j2k(300, 200, xo=10, yo=5, tile=(64, 64), tile_offset=(2, 3))
    )
    assert offset is not None and offset.grid == (5, 4)  # ceil(298/64), ceil(197/64)
    assert offset.problem() is None
    jp2 = JP2_SIGNATURE + box(b"jp2c", j2k(64, 96, tile=(8, 8)))
    assert codestream_tiling(jp2) == Tiling(64, 96, 0, 0, 8, 8, 0, 0)
    assert codestream_tiling(jpeg(sof(0xC3, 64, 80))) is None  # JPEG: no tiles
    assert codestream_tiling(j2k(300, 200, xo=300)) is None  # as codestream_shape
    assert codestream_tiling(j2k()[:41]) is None
    assert codestream_tiling(JP2_SIGNATURE + box(b"jp2c", b"\xff\xd8")) is None


@pytest.mark.parametrize(
    ("siz", "needle"),
    [
        (
            j2k(256, 256, tile=(1, 1)),
            "XTsiz x YTsiz = 1 x 1 from XTOsiz, YTOsiz = 0, 0 over Xsiz x Ysiz = "
            f"256 x 256 gives 256 x 256 = 65536 tiles, more than MAX_J2K_TILES = "
            f"{MAX_J2K_TILES}",
        ),
        (j2k(4000, 5000, tile=(60, 60)), "gives 67 x 84 = 5628 tiles"),
        (j2k(256, 256, tile=(0, 256)), "XTsiz x YTsiz = 0 x 256: a tile size of 0"),
        (j2k(256, 256, tile=(256, 0)), "XTsiz x YTsiz = 256 x 0: a tile size of 0"),
        (
            j2k(256, 256, xo=0, tile=(64, 64), tile_offset=(8, 0)),
            "tile grid offset XTOsiz, YTOsiz = 8, 0 with XTsiz x YTsiz = 64 x 64 "
            "does not put the image offset XOsiz, YOsiz = 0, 0 in the first tile",
        ),
        (
            j2k(256, 256, yo=100, tile=(64, 64)),
            "XOsiz, YOsiz = 0, 100 in the first tile",
        ),
    ],
    ids=["1x1-tiles", "60x60-tiles", "xtsiz-0", "ytsiz-0", "offset-past", "first-tile"],
)
def test_tile_grids_a_decoder_must_not_see(siz: bytes, needle: str) -> None:
    """Too many tiles (openjpeg allocates per tile), a tile size of 0, a grid
    that breaks A.5.1: a problem naming the SIZ fields and values."""
    tiling = codestream_tiling(siz)
    assert tiling is not None
    problem = tiling.problem()
    assert problem is not None and needle in problem, problem


def test_tile_limit_is_inclusive_and_configurable() -> None:
    at_limit = codestream_tiling(j2k(256, 256, tile=(4, 4)))  # 64 x 64 tiles
    assert at_limit is not None and at_limit.tiles == 4096 == MAX_J2K_TILES
    assert at_limit.problem() is None
    assert "more than MAX_J2K_TILES = 4095" in str(at_limit.problem(4095))


def test_jp2_reads_the_codestream_box() -> None:
    ihdr = box(b"ihdr", struct.pack(">IIHBBBB", 7, 7, 1, 7, 7, 0, 0))
    head = JP2_SIGNATURE + box(b"ftyp", b"jp2 \0\0\0\0jp2 ") + box(b"jp2h", ihdr)
    assert codestream_shape(head + box(b"jp2c", j2k(64, 96))) == (96, 64, 1)
    both = head + box(b"jp2c", j2k(64, 96), extended=True)
    assert codestream_shape(both) == (96, 64, 1)
    last = head + struct.pack(">I4s", 0, b"jp2c") + j2k(64, 96)  # to the end
    assert codestream_shape(last) == (96, 64, 1)
    assert codestream_shape(head) is None  # no codestream box
    assert codestream_shape(head + box(b"jp2c", b"\xff\xd8")) is None


@pytest.mark.parametrize(
    "marker", [0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC7, 0xC9, 0xCB, 0xCF, 0xF7]
)
def test_jpeg_size_is_the_first_frame_header(marker: int) -> None:
    """Every SOFn (and JPEG-LS SOF55) gives Y, X, Nf; DHT/DAC/APP are skipped."""
    dht = segment(0xC4, b"\x00" + b"\x01" + b"\x00" * 15 + b"\x05")
    dac = segment(0xCC, b"\x00\x10")
    app = segment(0xE0, b"JFIF\0\1\2\0\0\1\0\1\0\0")
    data = jpeg(app, dht, dac, sof(marker, 788, 1318))
    assert codestream_shape(data) == (788, 1318, 1)
    # fill bytes before a marker are allowed
    filled = data.replace(b"\xff\xc4", b"\xff\xff\xff\xc4", 1)
    assert codestream_shape(filled) == (788, 1318, 1)


def test_jpeg_without_a_frame_header_before_the_scan_is_none() -> None:
    assert codestream_shape(jpeg(segment(0xE0, b"x"))) is None
    assert codestream_shape(jpeg(segment(0xC4, b"\x00" * 17))) is None
    assert codestream_shape(b"\xff\xd8\xff\xd9") is None
    assert codestream_shape(b"\xff\xd8\x00\x00") is None  # not at a marker
    assert codestream_shape(b"\xff\xd8" + segment(0xE0, b"")[:3]) is None
    assert codestream_shape(b"\xff\xd8\xff\xe0\x00\x01") is None  # length < 2


def test_truncated_or_foreign_data_is_none_and_never_raises() -> None:
    # (stream, its shape, the shortest prefix that still shows it)
    app = segment(0xE0, b"JFIF\0")
    streams = [
        (j2k(), (200, 300, 1), 42),
        (jpeg(app, sof(0xC3, 64, 80)), (64, 80, 1), 2 + len(app) + 10),
        (JP2_SIGNATURE + box(b"jp2c", j2k(), extended=True), (200, 300, 1), 70),
    ]
    for full, shape, shortest in streams:
        assert codestream_shape(full) == shape
        for n in range(len(full)):
            got = codestream_shape(full[:n])
            assert got == (shape if n >= shortest else None), (full[:n].hex(), got)
    assert codestream_shape(b"") is None
    assert codestream_shape(b"\x00\x01\x02\x03" * 20) is None  # RLE header, raw
    rng = np.random.default_rng(0)
    for full, _, _ in streams:  # random byte flips after the magic: no exception
        for _ in range(300):
            bad = bytearray(full)
            for i in rng.integers(2, len(bad), size=3):
                bad[i] = int(rng.integers(0, 256))
            codestream_shape(bytes(bad))
            tiling = codestream_tiling(bytes(bad))
            if tiling is not None:
                tiling.problem()


def test_pydicom_j2k_frames_declare_their_header_size(
    tmp_path: Path, factory: ModuleType
) -> None:
    path = tmp_path / "j2k.dcm"
    factory.write_mammo(path, rows=130, cols=98, compress=JPEG2000Lossless)
    ds = pydicom.dcmread(path)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    assert codestream_shape(frame) == (130, 98, 1)
    check_codestream(read_dataset(path), path)


@pytest.mark.parametrize(
    "name", ["nema-wg04/MG1_J2KI.dcm", "fo-dicom/OutOfBoundsOverlay.dcm"]
)
def test_real_compressed_files_declare_their_header_size(
    shared_data: Path, name: str
) -> None:
    """JPEG 2000 (digitised film) and JPEG Lossless (Siemens): the check passes.

    That they still decode is ``test_shared_files``' business.
    """
    path = shared_data / "dicom" / name
    if not path.is_file():
        pytest.skip(f"{path} not in the shared data")
    ds = read_dataset(path)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    assert codestream_shape(frame) == (ds.Rows, ds.Columns, ds.SamplesPerPixel)
    tiling = codestream_tiling(frame)
    if tiling is not None:  # JPEG 2000: one tile, well inside the limit
        assert tiling.tiles == 1 and tiling.problem() is None
    check_codestream(ds, path)
