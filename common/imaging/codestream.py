"""Image size declared inside a compressed frame (JPEG, JPEG-LS, JPEG 2000).

A decoder allocates what the codestream says, not what the DICOM header says:
:func:`codestream_shape` reads the codestream's own size so that the reader can
compare it with Rows/Columns/SamplesPerPixel before anything is decoded, and
:func:`codestream_tiling` a JPEG 2000 codestream's tile grid (openjpeg
allocates per tile: :meth:`Tiling.problem` bounds their number).

Pure and bounds-checked: bytes in, ``(rows, columns, components)`` (or a
:class:`Tiling`) or ``None`` out; they never raise on any input and never read
past ``data``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

#: JPEG Start Of Image, and JPEG 2000 Start Of Codestream + Image and tile SIZe.
JPEG_SOI = b"\xff\xd8"
J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
#: A JP2 file starts with its 12-byte signature box (ISO/IEC 15444-1 I.5.1).
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
#: JPEG Start Of Frame markers: SOF0..SOF15 without DHT (C4), JPG (C8) and DAC
#: (CC), plus JPEG-LS SOF55 (F7). All share the layout P, Y, X, Nf.
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
#: Markers without a length field (TEM, RST0..7, SOI; EOI ends the search).
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9
#: Most tiles a JPEG 2000 frame may declare. openjpeg allocates a tile
#: structure (kilobytes) per tile as it reads SIZ, and SIZ may declare up to
#: 65,535 tiles of one pixel over an image of any size. Real mammography
#: codestreams use one tile or 1024 x 1024 tiles (about 20 for 5000 x 4000).
MAX_J2K_TILES = 4096

Shape = tuple[int, int, int]


@dataclass(frozen=True)
class Tiling:
    """The reference grid and tile grid of a JPEG 2000 SIZ segment.

    ISO/IEC 15444-1 A.5.1, in SIZ order: image extent ``xsiz`` x ``ysiz``,
    image offset ``xosiz``, ``yosiz``, tile size ``xtsiz`` x ``ytsiz``, tile
    grid offset ``xtosiz``, ``ytosiz`` (all on the reference grid).
    """

    xsiz: int
    ysiz: int
    xosiz: int
    yosiz: int
    xtsiz: int
    ytsiz: int
    xtosiz: int
    ytosiz: int

    @property
    def grid(self) -> tuple[int, int]:
        """Tiles across and down: ``ceil((Xsiz - XTOsiz) / XTsiz)``, same for Y.

        ``(0, 0)`` when a tile size is 0.
        """
        if self.xtsiz <= 0 or self.ytsiz <= 0:
            return 0, 0
        across = -(-(self.xsiz - self.xtosiz) // self.xtsiz)
        down = -(-(self.ysiz - self.ytosiz) // self.ytsiz)
        return max(across, 0), max(down, 0)

    @property
    def tiles(self) -> int:
        """Number of tiles (tiles across x tiles down)."""
        across, down = self.grid
        return across * down

    def problem(self, max_tiles: int | None = None) -> str | None:
        """Why a decoder must not be given this tile grid, else ``None``.

        A tile size of 0; a tile grid offset breaking A.5.1 (``XTOsiz <=
        XOsiz < XTOsiz + XTsiz``, same for Y: the first tile must hold the
        image's first sample); more than ``max_tiles`` tiles (default
        :data:`MAX_J2K_TILES`). The text names the SIZ fields and values.
        """
        limit = MAX_J2K_TILES if max_tiles is None else max_tiles
        size = f"XTsiz x YTsiz = {self.xtsiz} x {self.ytsiz}"
        if self.xtsiz == 0 or self.ytsiz == 0:
            return f"{size}: a tile size of 0"
        offset = f"XTOsiz, YTOsiz = {self.xtosiz}, {self.ytosiz}"
        if not (
            self.xtosiz <= self.xosiz < self.xtosiz + self.xtsiz
            and self.ytosiz <= self.yosiz < self.ytosiz + self.ytsiz
        ):
            return (
                f"tile grid offset {offset} with {size} does not put the image "
                f"offset XOsiz, YOsiz = {self.xosiz}, {self.yosiz} in the first "
                "tile (ISO/IEC 15444-1 A.5.1)"
            )
        if self.tiles > limit:
            across, down = self.grid
            return (
                f"{size} from {offset} over Xsiz x Ysiz = {self.xsiz} x "
                f"{self.ysiz} gives {across} x {down} = {self.tiles} tiles, more "
                f"than MAX_J2K_TILES = {limit}"
            )
        return None


def codestream_shape(data: bytes) -> Shape | None:
    """``(rows, columns, components)`` a compressed frame declares, else ``None``.

    Recognised by content: a JPEG 2000 codestream (``FF4F FF51``: its SIZ
    segment, rows = Ysiz - YOsiz, columns = Xsiz - XOsiz, Csiz), a JP2 file
    (the SIZ of its ``jp2c`` box), a JPEG or JPEG-LS stream (``FFD8``: the
    first SOFn segment before the first scan, Y, X and Nf). ``None`` for
    anything else, truncated data or an inconsistent SIZ (offset past size).
    """
    data = bytes(data)
    if data.startswith(J2K_SOC_SIZ):
        return _j2k_shape(data)
    if data.startswith(JP2_SIGNATURE):
        box = _jp2_codestream(data)
        return _j2k_shape(box) if box is not None else None
    if data.startswith(JPEG_SOI):
        return _jpeg_shape(data)
    return None


def codestream_tiling(data: bytes) -> Tiling | None:
    """The SIZ :class:`Tiling` of a JPEG 2000 codestream or JP2 file, else ``None``.

    ``None`` too for JPEG / JPEG-LS (no tiles), truncated data or an
    inconsistent SIZ (image offset past its size), as for
    :func:`codestream_shape`.
    """
    data = bytes(data)
    if data.startswith(JP2_SIGNATURE):
        box = _jp2_codestream(data)
        data = box if box is not None else b""
    if not data.startswith(J2K_SOC_SIZ) or _j2k_shape(data) is None:
        return None
    return Tiling(*struct.unpack_from(">IIIIIIII", data, 8))


def _j2k_shape(data: bytes) -> Shape | None:
    """SIZ of a raw JPEG 2000 codestream (ISO/IEC 15444-1 A.5.1)."""
    # SOC(2) SIZ(2) Lsiz(2) Rsiz(2) Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz
    # YTOsiz (4 each) Csiz(2)
    if len(data) < 42:
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", data, 8)
    (csiz,) = struct.unpack_from(">H", data, 40)
    if xosiz >= xsiz or yosiz >= ysiz:
        return None
    return ysiz - yosiz, xsiz - xosiz, csiz


def _jp2_codestream(data: bytes) -> bytes | None:
    """The contiguous codestream box (``jp2c``) of a JP2 file, if it is one."""
    pos = 0
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if length == 1:  # 64-bit XLBox follows the type
            if pos + 16 > len(data):
                return None
            (length,) = struct.unpack_from(">Q", data, pos + 8)
            header = 16
        elif length == 0:  # the box runs to the end of the data
            length = len(data) - pos
        if length < header:
            return None
        if kind == b"jp2c":
            box = data[pos + header : pos + length]
            return box if box.startswith(J2K_SOC_SIZ) else None
        pos += length
    return None


def _jpeg_shape(data: bytes) -> Shape | None:
    """Y, X, Nf of the first SOFn (or JPEG-LS SOF55) segment (ITU T.81 B.2.2)."""
    pos = 2  # after SOI
    n = len(data)
    while pos < n:
        if data[pos] != 0xFF:
            return None  # not at a marker: corrupt header
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            return None
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE:
            continue
        if marker in (_JPEG_EOI, _JPEG_SOS) or pos + 2 > n:
            return None  # no frame header before the scan / the end
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2:
            return None
        if marker in SOF_MARKERS:
            if length < 8 or pos + 8 > n:
                return None
            rows, cols = struct.unpack_from(">HH", data, pos + 3)
            return rows, cols, data[pos + 7]
        pos += length
    return None
