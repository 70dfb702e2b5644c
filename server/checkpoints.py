"""Global checkpoints: one per round, written atomically, resumable.

``<run_dir>/checkpoints/round-NNNNN.npz`` holds the global shared arrays;
``round-NNNNN.json`` beside it a :class:`common.wire.runfolder.CheckpointMeta`. The
JSON is written last, so a checkpoint counts only once both files are
complete; :meth:`CheckpointStore.latest` ignores half-written ones.
:meth:`CheckpointStore.prune` keeps round 0 (the model the run started from)
and the newest rounds when the run's ``keep_checkpoints`` bounds the disk.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import CheckpointMismatch, shown
from common.fileio import atomic_write_bytes, load_arrays, save_arrays
from common.wire.runfolder import (
    CheckpointMeta,
    RunFolderError,
    complete_rounds,
    round_paths,
)

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

    def remove_leftovers(self) -> list[Path]:
        """Delete temporary files an interrupted write left (``.*.tmp``).

        Every write goes to a hidden temporary file that is renamed into
        place; a process killed mid-write leaves one behind, a whole
        checkpoint's size. Only the run's writer calls this, at its start
        (no write of its own is in flight then). Returns what was removed
        (each logged).
        """
        removed = []
        for tmp in sorted(self.dir.glob(".*.tmp")):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                log.info("removed %s, left by an interrupted write", tmp)
                removed.append(tmp)
        return removed

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

    def prune(self, keep: int) -> list[int]:
        """Delete all but round 0 and the ``keep`` newest complete checkpoints.

        ``keep`` 0 keeps every round. Each pruned round's ``.json`` goes
        first, so a prune cut short leaves a ``.npz`` no reader counts
        (:meth:`rounds`), never a record naming a missing file. Only the
        run's writer calls this, after a round's checkpoint is written.
        Returns the rounds removed.
        """
        if keep <= 0:
            return []
        rounds = self.rounds()
        doomed = [r for r in rounds[:-keep] if r != 0]
        for rnd in doomed:
            npz, meta_path = self.paths(rnd)
            meta_path.unlink(missing_ok=True)
            npz.unlink(missing_ok=True)
        if doomed:
            log.debug("checkpoints of rounds %s pruned (keep %d)", doomed, keep)
        return doomed

    def rounds(self) -> list[int]:
        """Rounds with a complete checkpoint, ascending."""
        return complete_rounds(self.dir)

    def load(self, server_round: int) -> Checkpoint:
        """Load round ``server_round``.

        Raises:
            CheckpointMismatch: a file that is missing, unreadable (truncated,
                not a ``.npz``), malformed (a field of the ``.json``) or for
                another round; the message names the file and the field.
        """
        npz, meta_path = self.paths(server_round)
        try:
            record = CheckpointMeta.read(meta_path)
        except RunFolderError as exc:
            raise CheckpointMismatch(str(exc)) from exc
        if record.round != server_round:
            raise CheckpointMismatch(
                f"{meta_path}: field 'round' is {record.round}, the file name "
                f"says {server_round}"
            )
        try:
            arrays = load_arrays(npz)
        except (OSError, ValueError) as exc:  # a broken zip too (load_arrays)
            raise CheckpointMismatch(f"{npz}: unreadable checkpoint: {exc}") from exc
        names = record.array_names
        if names is not None and set(names) != set(arrays):
            raise CheckpointMismatch(
                f"{npz}: arrays {sorted(arrays)[:5]} differ from field 'array_names' "
                f"of {meta_path}: {shown(names)}"
            )
        return Checkpoint(round=record.round, arrays=arrays, meta=asdict(record))

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, or ``None``."""
        rounds = self.rounds()
        return self.load(rounds[-1]) if rounds else None

    def latest_readable(self) -> Checkpoint | None:
        """The newest checkpoint that loads, or ``None`` when there is none.

        A newer one that cannot be loaded (truncated by a crash, edited) is
        skipped with a warning naming the file and why, so a resumed run
        repeats that round rather than stopping or starting over.

        Raises:
            CheckpointMismatch: checkpoints exist but none loads (the newest's
                error): a run never silently restarts from scratch.
        """
        first: CheckpointMismatch | None = None
        for rnd in reversed(self.rounds()):
            try:
                return self.load(rnd)
            except CheckpointMismatch as exc:
                log.warning("checkpoint of round %d skipped: %s", rnd, exc)
                first = first or exc
        if first is not None:
            raise first
        return None
