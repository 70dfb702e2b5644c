"""Atomic file writes, and the one way named arrays are stored (``.npz``).

A reader never sees a half-written file; checkpoints and site state use
:func:`save_arrays` / :func:`load_arrays`.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder.

    The temporary file is renamed over ``path`` (``os.replace``), so ``path``
    holds either the old or the new content. ``fsync`` also flushes the data to
    disk before the rename (state that must survive a crash); a failed write
    removes the temporary file.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = True) -> None:
    """UTF-8 text form of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def save_arrays(path: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Atomically write named arrays as an uncompressed ``.npz`` (fsync'd)."""
    buf = io.BytesIO()
    payload = {k: np.asarray(v) for k, v in arrays.items()}
    np.savez(buf, **payload)  # type: ignore[arg-type]
    atomic_write_bytes(path, buf.getvalue())


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file (pickles refused).

    Raises ``OSError`` / ``ValueError`` on a missing or broken file; callers
    wrap them in their own error naming the file.
    """
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


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
        error: the file cannot be read or parsed (``"{path}: unreadable {what}:
            ..."``), is not an object, or (with ``format_id``) names another
            format (``"{path}: field 'format' is ..., expected ..."``).
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
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
