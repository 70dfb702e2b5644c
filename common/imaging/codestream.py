"""Image size declared inside a compressed frame (JPEG, JPEG-LS, JPEG 2000).

A decoder allocates what the codestream says, not what the DICOM header says:
:func:`codestream_shape` reads the codestream's own size so that the reader can
compare it with Rows/Columns/SamplesPerPixel before anything is decoded.

Pure and bounds-checked: bytes in, ``(rows, columns, components)`` or ``None``
out; it never raises on any input and never reads past ``data``.
"""

from __future__ import annotations

import struct

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

Shape = tuple[int, int, int]


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
        return _jp2_shape(data)
    if data.startswith(JPEG_SOI):
        return _jpeg_shape(data)
    return None


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


def _jp2_shape(data: bytes) -> Shape | None:
    """The SIZ of the contiguous codestream box (``jp2c``) of a JP2 file."""
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
            return _j2k_shape(box) if box.startswith(J2K_SOC_SIZ) else None
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
