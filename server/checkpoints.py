"""Global checkpoints: one per round, written atomically, resumable.

``<run_dir>/checkpoints/round-NNNNN.npz`` holds the global shared arrays;
``round-NNNNN.json`` beside it a :class:`common.wire.runfolder.CheckpointMeta`. The
JSON is written last, so a checkpoint counts only once both files are
complete; :meth:`CheckpointStore.latest` ignores half-written ones.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import CheckpointMismatch
from common.fileio import atomic_write_bytes, load_arrays, save_arrays
from common.wire.runfolder import CheckpointMeta, complete_rounds, round_paths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    """A loaded global checkpoint."""

    round: int
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]


class CheckpointStore:
    """Reads and writes the per-round global checkpoints of one run."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def paths(self, server_round: int) -> tuple[Path, Path]:
        """The ``.npz`` and ``.json`` paths of ``server_round``."""
        return round_paths(self.dir, server_round)

    def save(
        self,
        server_round: int,
        arrays: Mapping[str, np.ndarray],
        *,
        metrics: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write round ``server_round``; returns the JSON path."""
        npz, meta_path = self.paths(server_round)
        save_arrays(npz, arrays)
        meta = asdict(
            CheckpointMeta(
                round=int(server_round),
                array_names=list(arrays),
                metrics=dict(metrics or {}),
                config=dict(config or {}),
            )
        )
        atomic_write_bytes(meta_path, json.dumps(meta, indent=2, default=str).encode())
        log.debug("checkpoint round %d written to %s", server_round, npz)
        return meta_path

    def rounds(self) -> list[int]:
        """Rounds with a complete checkpoint, ascending."""
        return complete_rounds(self.dir)

    def load(self, server_round: int) -> Checkpoint:
        """Load round ``server_round``; a broken file raises naming it."""
        npz, meta_path = self.paths(server_round)
        try:
            meta = json.loads(meta_path.read_text())
            arrays = load_arrays(npz)
        except (OSError, ValueError) as exc:
            raise CheckpointMismatch(f"{npz}: unreadable checkpoint: {exc}") from exc
        names = meta.get("array_names")
        if names is not None and set(names) != set(arrays):
            raise CheckpointMismatch(
                f"{npz}: arrays {sorted(arrays)} differ from {meta_path}'s {names}"
            )
        return Checkpoint(round=int(meta["round"]), arrays=arrays, meta=meta)

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, or ``None``."""
        rounds = self.rounds()
        return self.load(rounds[-1]) if rounds else None
