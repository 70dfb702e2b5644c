"""Exceptions raised at the boundaries; the CLIs turn them into one-line messages."""

from __future__ import annotations

import reprlib
from typing import Any


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (only ``Type`` when it has none)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for a message, about ``limit`` characters at most.

    The one way an error or a log line quotes a value from outside: a long
    string keeps its head and tail and says its length; a big container shows
    its first items (its full repr is never built); an integer past Python's
    digit limit for ``str`` is named, not shown.
    """
    r = reprlib.Repr()
    r.maxstring = r.maxother = max(limit, 8)
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = 10
    r.maxlevel = 3
    try:
        text = r.repr(value)
    except ValueError:  # an int past the digit limit for str()
        return f"<{type(value).__name__} too long to show>"
    if isinstance(value, str | bytes) and len(repr(value)) > r.maxstring:
        text += f" ({len(value)} chars)"
    return text


class MammofedError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(MammofedError, ValueError):
    """A configuration file or value is invalid.

    The message names the file, the key path and the bad value.
    """

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source = source
        self.key = key
        self.detail = message
        super().__init__(f"{source}: {key}: {message}")

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, str, str]]:
        # rebuilt from its fields, so the error a worker process raises (a
        # study's seeds run in spawned processes) reaches the parent whole
        return type(self), (self.source, self.key, self.detail)


class RefusedImage(MammofedError):
    """An input image that must not be guessed at (not a mammogram, undecodable...).

    ``reason`` is one line, suitable for ``ingest_report.json``.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self) -> tuple[type[RefusedImage], tuple[str, str]]:
        return type(self), (self.path, self.reason)  # as ConfigError's


class AnnotationError(MammofedError, ValueError):
    """A broken row of an annotation file; the message names the file and row."""


class CheckpointMismatch(MammofedError, ValueError):
    """A checkpoint that does not fit the requested model.

    The message names the differing field and both values.
    """


class UnsafeCheckpoint(CheckpointMismatch):
    """A model file that holds objects other than tensors and plain containers.

    Raised before anything in the file is executed (``weights_only`` loading).
    """
