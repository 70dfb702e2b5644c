"""Deflated data sets (Deflated Explicit VR Little Endian) and deflate bombs.

pydicom inflates a deflated data set whole, without a limit: a file of a few
hundred kB may say gigabytes. ``common.imaging.dicom`` inflates it first in
steps, keeping nothing, and refuses it over ``MAX_INFLATED_BYTES``; a
legitimate deflated file reads exactly as before.
"""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    DigitalMammographyXRayImageStorageForPresentation,
    generate_uid,
)

from common.errors import RefusedImage
from common.imaging import dicom
from common.imaging.image_io import read_any

WORKING = 0.2
MiB = 2**20
DEFLATED = str(DeflatedExplicitVRLittleEndian)


def _file_meta(*, preamble: bool = True) -> bytes:
    """Preamble + ``DICM`` (optional) + a file meta group saying "deflated"."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalMammographyXRayImageStorageForPresentation
    # one fixed UID: a random one varies in length, and a test measures the
    # file's data set as its size minus this group's
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["deflate-test"])
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = DicomBytesIO()
    write_file_meta_info(buf, meta, enforce_standard=True)
    return (b"\0" * 128 + b"DICM" if preamble else b"") + buf.getvalue()


def _deflate_bomb(path: Path, inflated_mib: int, *, preamble: bool = True) -> Path:
    """A file meta group, then a raw deflate stream of an OB element of
    ``inflated_mib`` MiB of zeros (about 1 kB of file per MiB inflated).

    Built without inflating anything: one fully flushed block of 1 MiB of
    zeros needs no earlier data, so it is repeated as compressed bytes.
    """
    size = inflated_mib * MiB
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    element = struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, size)
    head = deflater.compress(element) + deflater.flush(zlib.Z_FULL_FLUSH)
    zeros = deflater.compress(b"\0" * MiB) + deflater.flush(zlib.Z_FULL_FLUSH)
    body = head + zeros * inflated_mib + deflater.flush()
    path.write_bytes(_file_meta(preamble=preamble) + body)
    return path


def _refusal_and_peak(call: Callable[[], Any]) -> tuple[str, int]:
    """``(reason, peak)``: the refusal ``call()`` raises and the peak Python
    heap (tracemalloc, bytes) while it ran."""
    tracemalloc.start()
    try:
        with pytest.raises(RefusedImage) as exc:
            call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return exc.value.reason, peak


def test_bomb_built_here_really_inflates_to_its_size(tmp_path: Path) -> None:
    """The test bomb is what it claims: its body inflates to 4 MiB + a header."""
    path = _deflate_bomb(tmp_path / "bomb.dcm", 4)
    data = path.read_bytes()
    body = data[len(_file_meta()) :]
    assert len(zlib.decompress(body, -zlib.MAX_WBITS)) == 4 * MiB + 12
    assert len(data) < 16_000


def test_legitimate_deflated_file_reads_as_before(
    write_mammo: Callable[..., tuple[Path, Any]], tmp_path: Path
) -> None:
    """A deflated copy of a mammogram: same pixels, geometry and header facts."""
    plain, _ = write_mammo(rows=400, cols=300)
    ds = pydicom.dcmread(plain)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated = tmp_path / "deflated.dcm"
    ds.save_as(deflated, enforce_file_format=True)
    assert deflated.stat().st_size < plain.stat().st_size // 10
    assert pydicom.dcmread(deflated).file_meta.TransferSyntaxUID == DEFLATED

    dicom.check_deflated(deflated)  # under the bound: no refusal
    assert dicom.is_dicom(deflated)
    before = dicom.read_dicom(plain, working_spacing_mm=WORKING)
    after = dicom.read_dicom(deflated, working_spacing_mm=WORKING)
    assert np.array_equal(before.pixels, after.pixels)
    assert before.geometry == after.geometry
    assert before.meta.laterality == after.meta.laterality
    assert before.meta.stored_spacing_mm == after.meta.stored_spacing_mm
    header = dicom.read_header(deflated)
    assert (header.rows, header.cols) == (400, 300)
    raw = dicom.read_dataset(deflated)
    assert np.array_equal(raw.pixel_array, pydicom.dcmread(plain).pixel_array)


def test_deflate_bomb_is_refused_before_pydicom_inflates_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """64 MiB behind 64 kB, bound patched to 1 MiB: refused naming the file,
    TransferSyntaxUID and the bound, with the heap never near 64 MiB."""
    path = _deflate_bomb(tmp_path / "bomb.dcm", 64)
    monkeypatch.setattr(dicom, "MAX_INFLATED_BYTES", MiB)

    def inflate(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pydicom was handed the deflate bomb")

    monkeypatch.setattr(pydicom.filereader.zlib, "decompress", inflate)
    with pytest.raises(RefusedImage) as exc:
        dicom.read_dataset(path)
    assert exc.value.path == str(path)
    reason = exc.value.reason
    assert f"TransferSyntaxUID={DEFLATED} (Deflated Explicit VR Little Endian)" in (
        reason
    )
    assert f"inflates to more than MAX_INFLATED_BYTES = {MiB} bytes" in reason
    assert f"({path.stat().st_size - len(_file_meta())} bytes from byte" in reason
    for read in (
        lambda: dicom.read_header(path),
        lambda: dicom.read_dicom(path, working_spacing_mm=WORKING),
        lambda: read_any(path, working_spacing_mm=WORKING),
        lambda: dicom.dcmread_bounded(path, stop_before_pixels=True),
    ):
        with pytest.raises(RefusedImage, match="MAX_INFLATED_BYTES"):
            read()
    reason, peak = _refusal_and_peak(lambda: dicom.read_dataset(path))
    assert "MAX_INFLATED_BYTES" in reason
    assert peak < 8 * MiB, peak


def test_deflate_bomb_at_the_default_bound(tmp_path: Path) -> None:
    """600 MiB behind 0.6 MB, default 512 MiB bound: refused, heap peak a few
    MiB (pydicom would hold the whole 600 MiB at once)."""
    assert 256 * MiB <= dicom.MAX_INFLATED_BYTES <= 1024 * MiB
    path = _deflate_bomb(tmp_path / "bomb.dcm", 600)
    assert path.stat().st_size < 1_000_000
    reason, peak = _refusal_and_peak(lambda: dicom.read_dataset(path))
    assert "MAX_INFLATED_BYTES = 536870912 bytes" in reason
    assert peak < 16 * MiB, peak


def test_deflate_bomb_without_preamble_is_dicom_and_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No preamble: ``is_dicom`` parses by content, which is where pydicom
    would inflate; the file counts as DICOM and the reader says why not."""
    path = _deflate_bomb(tmp_path / "bomb.bin", 8, preamble=False)
    monkeypatch.setattr(dicom, "MAX_INFLATED_BYTES", MiB)
    assert dicom.is_dicom(path)
    with pytest.raises(RefusedImage, match="MAX_INFLATED_BYTES = 1048576"):
        read_any(path, working_spacing_mm=WORKING)


#: The first half of a raw deflate stream of 4 kB of noise.
_TRUNCATED = zlib.compress(np.random.default_rng(0).bytes(4096), wbits=-15)[:2048]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"\xff" * 64, "is not a valid deflate stream: error: "),
        (_TRUNCATED, "unreadable DICOM (truncated or corrupt)"),
    ],
    ids=["invalid-block-type", "truncated"],
)
def test_corrupt_deflate_stream_is_refused(
    tmp_path: Path, body: bytes, needle: str
) -> None:
    """A corrupt or cut stream is a refusal, never ``zlib.error`` passed on."""
    path = tmp_path / "corrupt.dcm"
    path.write_bytes(_file_meta() + body)
    with pytest.raises(RefusedImage) as exc:
        dicom.read_dataset(path)
    assert needle in exc.value.reason


def test_files_not_deflated_are_left_to_pydicom(
    write_mammo: Callable[..., tuple[Path, Any]], tmp_path: Path
) -> None:
    """Native files, files without a file meta group and non-files pass the
    check untouched; pydicom's own errors stay what they were."""
    plain, _ = write_mammo()
    dicom.check_deflated(plain)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x01" * 300)
    dicom.check_deflated(junk)
    with pytest.raises(FileNotFoundError):
        dicom.check_deflated(tmp_path / "absent.dcm")
    with pytest.raises(RefusedImage, match="file not found"):
        dicom.read_dataset(tmp_path / "absent.dcm")
