"""A site's federation state on its own disk (survives a daemon restart).

Layout under ``<state_dir>/<site>/``::

    personal.npz   personal arrays (FedBN norm layers, FedPer head, ...)
    meta.json      {"site", "last_round", "last_phase", "history": [...]}

Every write goes to a temporary file in the same folder and is moved into place
with :func:`os.replace`, so a crash leaves either the old or the new file, never
a torn one. ``context.state`` in the ClientApp is only a cache of this.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import MammofedError
from common.fileio import atomic_write_bytes, load_arrays, save_arrays

log = logging.getLogger(__name__)

PERSONAL_NPZ = "personal.npz"
META_JSON = "meta.json"


class SiteStateError(MammofedError):
    """A state file that exists but cannot be read; the message names it."""


class SiteState:
    """Persistent per-site state under ``root/<site>/``.

    Args:
        root: the state directory (``SiteConfig.state_dir`` or node config).
        site: the site name (a plain word; keys the sub-folder).
    """

    def __init__(self, root: str | Path, site: str) -> None:
        if not site or "/" in site or site in (".", ".."):
            raise SiteStateError(f"{root}: site name must be a plain word: {site!r}")
        self.site = site
        self.dir = Path(root) / site
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def personal_path(self) -> Path:
        """Path of the personal arrays file."""
        return self.dir / PERSONAL_NPZ

    @property
    def meta_path(self) -> Path:
        """Path of the JSON metadata file."""
        return self.dir / META_JSON

    def save_personal(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Atomically replace the personal arrays."""
        save_arrays(self.personal_path, arrays)

    def load_personal(self) -> dict[str, np.ndarray] | None:
        """The saved personal arrays, or ``None`` when none were saved yet."""
        if not self.personal_path.is_file():
            return None
        try:
            return load_arrays(self.personal_path)
        except (OSError, ValueError) as exc:
            raise SiteStateError(f"{self.personal_path}: unreadable: {exc}") from exc

    def read_meta(self) -> dict[str, Any]:
        """The metadata mapping (empty when none was written yet)."""
        if not self.meta_path.is_file():
            return {}
        try:
            data = json.loads(self.meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise SiteStateError(f"{self.meta_path}: unreadable: {exc}") from exc
        if not isinstance(data, dict):
            raise SiteStateError(f"{self.meta_path}: must hold an object, got {data!r}")
        return data

    def write_meta(self, meta: Mapping[str, Any]) -> None:
        """Atomically replace the metadata."""
        payload = json.dumps(dict(meta), indent=2, sort_keys=True).encode()
        atomic_write_bytes(self.meta_path, payload)

    @property
    def last_round(self) -> int:
        """Last server round this site completed (0 if none)."""
        return int(self.read_meta().get("last_round", 0))

    def record_round(
        self, server_round: int, phase: str, metrics: Mapping[str, float | int]
    ) -> None:
        """Remember that ``phase`` of ``server_round`` completed with ``metrics``."""
        meta = self.read_meta()
        meta["site"] = self.site
        meta["last_round"] = max(int(meta.get("last_round", 0)), int(server_round))
        meta["last_phase"] = phase
        history = list(meta.get("history", []))
        history.append({"round": int(server_round), "phase": phase, **dict(metrics)})
        meta["history"] = history[-1000:]
        self.write_meta(meta)
        log.debug("site %s: recorded %s of round %d", self.site, phase, server_round)
