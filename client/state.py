"""A site's federation state on its own disk (survives a daemon restart).

Layout under ``<state_dir>/<site>/``::

    personal.npz   personal arrays (FedBN norm layers, FedPer head, ...)
    meta.json      {"site", "last_round", "last_phase", "history": [...],
                    "committed_round", "discarded_rounds"}
    pending.json   {"round", "node"} while a trained round awaits the server,
                   plus "committing": true once its commit has begun
    pending/       that round's personal files (personal.npz, teacher...)

Every write goes to a temporary file in the same folder and is moved into place
with :func:`os.replace`, so a crash leaves either the old or the new file, never
a torn one; data and folder entries are flushed to disk (``fsync``) before the
next step relies on them, so a power cut does too. ``context.state`` in the
ClientApp is only a cache of this.

**A round the server threw away is not kept.** While the ClientApp trains round
``R`` (:meth:`SiteState.begin_round`), personal files are written under
``pending/`` (:meth:`SiteState.write_path`), not over the committed ones, and
reads keep seeing the committed files. The next message from the server says
which aggregation made its global arrays (:class:`common.wire.faults.ModelVersion`);
:meth:`SiteState.settle` then commits the pending files when that aggregation
is round ``R`` and used this node's update, and discards them otherwise (the
round had no aggregation, this node's reply was rejected or lost, or a later
round superseded it). The last round of a run is settled by its evaluate
message; with ``fraction_evaluate: 0`` it stays pending until the next message
(a new run starting at ``model-round`` 0 discards it). The DP accountant is
never rolled back: privacy spent on a sent update stays spent.

**A commit is all or nothing.** Committing moves several files one by one, so
``pending.json`` is first rewritten (atomically) with ``"committing": true``;
the marker is removed only after every file is in place and ``meta.json``
names the round. A commit cut short (a crash, a full disk) is finished by the
next call that reads the pending state (:meth:`SiteState.pending`,
:meth:`SiteState.settle`, :meth:`SiteState.begin_round`,
:meth:`SiteState.write_path`, :meth:`SiteState.commit_if_kept`), whatever model
version the next message names: the round was kept, and it is never
discarded half moved.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common.config.loader import check_plain_name
from common.errors import MammofedError, shown
from common.fileio import (
    atomic_write_bytes,
    fsync_dir,
    load_arrays,
    read_json_document,
    save_arrays,
)
from common.wire.faults import ModelVersion

log = logging.getLogger(__name__)

PERSONAL_NPZ = "personal.npz"
META_JSON = "meta.json"
PENDING_JSON = "pending.json"
PENDING_DIR = "pending"
#: what :meth:`SiteState.settle` did with a pending round
COMMITTED = "committed"
DISCARDED = "discarded"


def _round_number(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= -1


#: Fields of ``meta.json`` and the check each value must pass when present.
_META_FIELDS: dict[str, Any] = {
    "site": lambda v: isinstance(v, str),
    "last_round": _round_number,
    "committed_round": _round_number,
    "last_phase": lambda v: v is None or isinstance(v, str),
    "history": lambda v: isinstance(v, list) and all(isinstance(h, dict) for h in v),
    "discarded_rounds": lambda v: isinstance(v, list) and all(map(_round_number, v)),
}


class SiteStateError(MammofedError):
    """A state file that exists but cannot be read; the message names it."""


def plain_site_name(site: str, root: str | Path = "") -> str:
    """``site`` when it is a plain word (it names a sub-folder), else raise.

    The configs' own rule (:func:`common.config.loader.check_plain_name`).

    Raises:
        SiteStateError: empty, a path (``/``, a backslash), ``.``/``..``, a
            NUL or padded with spaces.
    """
    try:
        check_plain_name(site)
    except ValueError:
        where = f"{root}: " if root else ""
        raise SiteStateError(
            f"{where}site name must be a plain word: {site!r} (not empty, '.' or "
            "'..'; no '/', backslash, NUL or surrounding spaces)"
        ) from None
    return site


def _to_commit(pend: Mapping[str, Any], version: ModelVersion) -> bool:
    """Whether the pending round ``pend`` is committed given ``version``.

    Yes when the server's model of that round was aggregated with this
    node's update, and always when its commit already began (it was kept).
    """
    kept = version.round == pend["round"] and pend["node"] in version.nodes
    return kept or bool(pend["committing"])


class SiteState:
    """Persistent per-site state under ``root/<site>/``.

    Args:
        root: the state directory (``SiteConfig.state_dir`` or node config).
        site: the site name (a plain word; keys the sub-folder).

    Attributes:
        dir: ``root/<site>/`` (created); personal_path, meta_path: its
            committed personal arrays and metadata; pending_path, pending_dir:
            the pending round's marker and personal files.
    """

    def __init__(self, root: str | Path, site: str) -> None:
        self.site = plain_site_name(site, root)
        self.dir = Path(root) / site
        self.dir.mkdir(parents=True, exist_ok=True)
        self.personal_path = self.dir / PERSONAL_NPZ
        self.meta_path = self.dir / META_JSON
        self.pending_path = self.dir / PENDING_JSON
        self.pending_dir = self.dir / PENDING_DIR

    def save_personal(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Atomically replace the personal arrays (pending ones during a round).

        Raises:
            SiteStateError: an array holds NaN or Inf (a diverged round, or
                absurd global arrays from the server): nothing is written, so
                the site keeps its last finite personal state.
        """
        for name, value in arrays.items():
            a = np.asarray(value)
            if np.issubdtype(a.dtype, np.number) and not np.isfinite(a).all():
                raise SiteStateError(
                    f"{self.dir}: personal array {shown(name)} has NaN or Inf "
                    "values; not saved (the last finite personal state is kept)"
                )
        save_arrays(self.write_path(PERSONAL_NPZ), arrays)

    def abandon_round(self, why: str) -> None:
        """Discard the pending round: its reply was never sent (``why``).

        A round whose commit already began is finished instead (it was kept).
        """
        if self.pending_path.is_file():
            self._drop_pending(why)

    # --- pending rounds ------------------------------------------------------
    def write_path(self, name: str) -> Path:
        """Where a personal file ``name`` is written now (pending while a round is).

        An interrupted commit is finished first (:meth:`pending`).
        """
        if self.pending() is not None:
            return self.pending_dir / name
        return self.dir / name

    def pending(self) -> dict[str, int] | None:
        """``{"round", "node"}`` of the round awaiting the server, or ``None``.

        A round whose commit was interrupted is committed here first, so it
        is not pending any more (``None``).

        Raises:
            SiteStateError: ``pending.json`` unreadable, or the interrupted
                commit cannot be finished; the message names the file.
        """
        rec = self._pending_record()
        if rec is not None and rec["committing"]:
            self._commit(rec)
            return None
        return None if rec is None else {"round": rec["round"], "node": rec["node"]}

    def _pending_record(self) -> dict[str, Any] | None:
        """``pending.json`` as ``{"round", "node", "committing"}``, or ``None``.

        As strict as ``meta.json``: ``round`` and ``node`` must be JSON
        integers ``>= 0`` (never a string, a float or a bool coerced), and
        ``committing``, when present, ``true`` or ``false``.

        Raises:
            SiteStateError: unreadable, not a JSON object, nested too deeply,
                or a field missing or malformed; names the file, the field and
                the value.
        """
        if not self.pending_path.is_file():
            return None
        data = read_json_document(self.pending_path, "pending round", SiteStateError)
        rec: dict[str, Any] = {}
        for key in ("round", "node"):
            if key not in data:
                raise SiteStateError(f"{self.pending_path}: field {key!r} is missing")
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SiteStateError(
                    f"{self.pending_path}: field {key!r} must be an integer >= 0, "
                    f"got {shown(value)}"
                )
            rec[key] = value
        committing = data.get("committing", False)
        if not isinstance(committing, bool):
            raise SiteStateError(
                f"{self.pending_path}: field 'committing' must be true or false, "
                f"got {shown(committing)}"
            )
        rec["committing"] = committing
        return rec

    def begin_round(self, server_round: int, node_id: int) -> None:
        """Start writing round ``server_round``'s personal files under ``pending/``.

        A pending round left unsettled is discarded first (the caller settles
        before it begins; this only happens after a crash); one whose commit
        was interrupted is committed instead.
        """
        if self.pending_path.is_file():
            self._drop_pending(f"superseded by round {server_round}")
        self.pending_dir.mkdir(exist_ok=True)
        for old in self.pending_dir.iterdir():
            old.unlink()
        record = {"round": int(server_round), "node": int(node_id)}
        atomic_write_bytes(self.pending_path, json.dumps(record).encode())

    def settle(self, version: ModelVersion) -> str | None:
        """Commit or discard the pending round given the server's model version.

        Commits when ``version.round`` is the pending round and lists the
        pending round's node; discards otherwise. A round whose commit was
        interrupted is always committed (whatever ``version`` says: the
        server kept it). Returns :data:`COMMITTED`, :data:`DISCARDED`, or
        ``None`` when nothing was pending.

        Raises:
            SiteStateError: the state files cannot be read or moved (named);
                a commit cut short is finished by the next call.
        """
        pend = self._pending_record()
        if pend is None:
            return None
        if _to_commit(pend, version):
            self._commit(pend)
            return COMMITTED
        if version.round < pend["round"]:
            why = f"the server kept model round {version.round} (no aggregation)"
        elif version.round == pend["round"]:
            why = "the server did not use this node's update"
        else:
            why = f"superseded by model round {version.round}"
        self._drop_pending(why)
        return DISCARDED

    def commit_if_kept(self, version: ModelVersion) -> bool:
        """Commit the pending round when ``version`` kept this node's update.

        For readers of a finished run (``export``): the last round of a run
        that sent this site no evaluate message after it is still pending,
        and the server's round file (its saved :class:`ModelVersion`) says
        whether it was aggregated with this node's update. Unlike
        :meth:`settle` it never discards: a reader may hold an older round.
        An interrupted commit is finished whatever ``version`` says. Returns
        whether round ``version.round`` is now committed from pending.
        """
        pend = self._pending_record()
        if pend is None or not _to_commit(pend, version):
            return False
        self._commit(pend)
        return version.round == pend["round"]

    def _commit(self, pend: Mapping[str, Any]) -> None:
        """Move the pending files of ``pend`` into place, then drop the marker.

        The marker is first rewritten with ``"committing": true`` (atomically),
        so a commit cut short anywhere after it is finished by the next reader
        of the pending state rather than discarded: every step below may run
        again (files already moved are no longer under ``pending/``).
        """
        rnd = int(pend["round"])
        try:
            if pend["committing"]:
                log.warning(
                    "site %s: finishing the interrupted commit of round %d",
                    self.site,
                    rnd,
                )
            else:
                record = {"round": rnd, "node": int(pend["node"]), "committing": True}
                atomic_write_bytes(self.pending_path, json.dumps(record).encode())
            if self.pending_dir.is_dir():
                for path in sorted(self.pending_dir.iterdir()):
                    os.replace(path, self.dir / path.name)
                fsync_dir(self.dir)  # the moves reach the disk before meta says so
            meta = self.read_meta()
            meta["committed_round"] = rnd
            self.write_meta(meta)
            self.pending_path.unlink()
        except OSError as exc:
            raise SiteStateError(
                f"{self.pending_path}: commit of round {rnd} cut short (the next "
                f"access finishes it): {exc}"
            ) from exc
        log.info("site %s: committed round %d", self.site, rnd)

    def _drop_pending(self, why: str) -> None:
        """Discard the pending round (never one whose commit began: finished)."""
        pend = self._pending_record()
        if pend is not None and pend["committing"]:
            self._commit(pend)
            return
        rnd = pend["round"] if pend is not None else -1
        if self.pending_dir.is_dir():
            for path in self.pending_dir.iterdir():
                path.unlink()
        self.pending_path.unlink(missing_ok=True)
        meta = self.read_meta()
        meta["discarded_rounds"] = [*meta.get("discarded_rounds", []), rnd][-100:]
        self.write_meta(meta)
        log.warning(
            "site %s: discarded the personal state of round %d: %s",
            self.site,
            rnd,
            why,
        )

    def load_personal(self) -> dict[str, np.ndarray] | None:
        """The saved personal arrays, or ``None`` when none were saved yet.

        Raises:
            SiteStateError: the file is unreadable, or an array holds NaN or
                Inf (which :meth:`save_personal` refuses to write); the
                message names the file and the array.
        """
        if not self.personal_path.is_file():
            return None
        try:
            arrays = load_arrays(self.personal_path)
        except (OSError, ValueError) as exc:
            raise SiteStateError(f"{self.personal_path}: unreadable: {exc}") from exc
        for name, a in arrays.items():
            if np.issubdtype(a.dtype, np.number) and not np.isfinite(a).all():
                raise SiteStateError(
                    f"{self.personal_path}: personal array {shown(name)} has NaN "
                    "or Inf values (save_personal never writes them: the file is "
                    "damaged)"
                )
        return arrays

    def read_meta(self) -> dict[str, Any]:
        """The metadata mapping (empty when none was written yet).

        Raises:
            SiteStateError: the file is unreadable, or a field this module
                writes has another type (naming the file, field and value).
        """
        if not self.meta_path.is_file():
            return {}
        meta = read_json_document(self.meta_path, "site metadata", SiteStateError)
        for key, ok in _META_FIELDS.items():
            if key in meta and not ok(meta[key]):
                raise SiteStateError(
                    f"{self.meta_path}: field {key!r} is malformed: {shown(meta[key])}"
                )
        return meta

    def write_meta(self, meta: Mapping[str, Any]) -> None:
        """Atomically replace the metadata."""
        payload = json.dumps(dict(meta), indent=2, sort_keys=True).encode()
        atomic_write_bytes(self.meta_path, payload)

    def record_round(
        self, server_round: int, phase: str, metrics: Mapping[str, float | int]
    ) -> None:
        """Remember that ``phase`` of ``server_round`` completed with ``metrics``.

        ``last_round`` is the round of the latest message, not the largest
        ever: a later run counts from round 1 again, and its model is the
        one the site now holds.
        """
        meta = self.read_meta()
        meta["site"] = self.site
        meta["last_round"] = int(server_round)
        meta["last_phase"] = phase
        history = list(meta.get("history", []))
        history.append({"round": int(server_round), "phase": phase, **dict(metrics)})
        meta["history"] = history[-1000:]
        self.write_meta(meta)
        log.debug("site %s: recorded %s of round %d", self.site, phase, server_round)
