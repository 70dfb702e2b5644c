"""Exceptions raised at the boundaries; the CLIs turn them into one-line messages."""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (only ``Type`` when it has none)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


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


class RefusedImage(MammofedError):
    """An input image that must not be guessed at (not a mammogram, undecodable...).

    ``reason`` is one line, suitable for ``ingest_report.json``.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


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
