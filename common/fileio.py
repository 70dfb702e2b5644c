"""Atomic file writes, and the one way named arrays are stored (``.npz``).

A reader never sees a half-written file; checkpoints and site state use
:func:`save_arrays` / :func:`load_arrays`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

#: Mode of a private file (a key): read and write by the owner only.
PRIVATE_MODE = 0o600


def atomic_write(
    path: str | Path,
    write: Callable[[IO[bytes]], object],
    *,
    fsync: bool = True,
    mode: int | None = None,
) -> None:
    """Write ``path`` with ``write(file)`` through a temporary file in its folder.

    The temporary file is renamed over ``path`` (``os.replace``), so ``path``
    holds either the old or the new content. ``fsync`` also flushes the data to
    disk before the rename and the folder's entry after it (state that must
    survive a crash or a power cut); a failed write removes the temporary file.
    The file is readable by its owner only (``mkstemp``'s 0600) unless
    ``mode`` gives its permission bits.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(p.parent)


def fsync_dir(folder: str | Path) -> None:
    """Flush ``folder``'s entries (renames into it) to disk.

    A rename is durable across a power cut only once its folder is flushed;
    a process crash needs no flush. A no-op where folders cannot be opened
    (Windows).
    """
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # a file system that cannot flush folders
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> None:
    """:func:`atomic_write` of ``data``."""
    atomic_write(path, lambda fh: fh.write(data), fsync=fsync)


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = True) -> None:
    """UTF-8 text form of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def refuse_existing(paths: Iterable[Path], error: type[Exception]) -> None:
    """Raise ``error`` naming the first of ``paths`` that exists (a CLI hint)."""
    for p in paths:
        if Path(p).exists():
            raise error(f"{p} exists (pass --overwrite to replace it)")


def write_new_file(
    path: Path, data: bytes, *, private: bool, overwrite: bool, error: type[Exception]
) -> None:
    """Write ``data`` as a new ``path`` (an existing one only with ``overwrite``).

    Mode 0600 if ``private`` (never wider, even briefly), else 0644, whatever
    the umask. An existing ``path`` without ``overwrite`` raises ``error``.
    """
    path = Path(path)
    if not overwrite:
        refuse_existing([path], error)
    path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = PRIVATE_MODE if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)


def has_dicom_preamble(path: str | Path) -> bool:
    """Whether bytes 128..132 of ``path`` are ``DICM`` (unreadable: ``False``).

    The cheap first test of "is this DICOM?", without importing pydicom.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def sha256_file(path: str | Path, *extra: bytes) -> str:
    """Hex SHA-256 of a file's bytes, followed by the ``extra`` bytes if any."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    for b in extra:
        h.update(b)
    return h.hexdigest()


def save_arrays(path: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Atomically write named arrays as an uncompressed ``.npz`` (fsync'd)."""
    payload = {k: np.asarray(v) for k, v in arrays.items()}
    atomic_write(path, lambda fh: np.savez(fh, **payload))  # type: ignore[arg-type]


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file (pickles refused).

    Raises ``OSError`` / ``ValueError`` on a missing or broken file (also a
    truncated or corrupt zip, which numpy reports in other types); callers
    wrap them in their own error naming the file.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise ValueError(f"not a readable .npz: {type(exc).__name__}: {exc}") from exc
    except ValueError as exc:
        if "pickle" not in str(exc):
            raise
        # numpy's words suggest allow_pickle=True, which would run the file
        raise ValueError(
            "not a readable .npz: neither an .npz archive nor arrays without "
            "pickled objects (refused: pickles are never loaded)"
        ) from None


def read_jsonl(path: str | Path) -> list[Any]:
    """The JSON value of every non-blank line of ``path`` (``[]`` if absent)."""
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def read_json_document(
    path: str | Path,
    what: str,
    error: type[Exception],
    *,
    format_id: str | None = None,
) -> dict[str, Any]:
    """A JSON object read from ``path``, optionally with ``"format": format_id``.

    Raises:
        error: the file cannot be read or parsed or nests too deeply
            (``"{path}: unreadable {what}: ..."``), is not an object, or (with
            ``format_id``) names another format (``"{path}: field 'format' is
            ..., expected ..."``).
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise error(f"{p}: unreadable {what}: {exc}") from exc
    if format_id is not None and (
        not isinstance(doc, dict) or doc.get("format") != format_id
    ):
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise error(f"{p}: field 'format' is {got!r}, expected {format_id!r}")
    if not isinstance(doc, dict):
        raise error(f"{p}: {what} is not a JSON object")
    return doc


def tail_text(path: str | Path, lines: int = 30, missing: str | None = None) -> str:
    """The last ``lines`` lines of a text file (a log), for an error message.

    An unreadable file gives ``missing`` (default ``"(<path> not written)"``)
    instead of raising: the caller is already reporting another failure.
    """
    p = Path(path)
    try:
        return "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return missing if missing is not None else f"({p} not written)"


def json_safe(v: Any) -> Any:
    """``v`` with non-finite floats as ``None`` and keys as strings (strict JSON)."""
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [json_safe(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
