"""The run-folder contract: the files a run folder holds, as typed records.

Each record is one frozen dataclass used by the writer and by every reader,
with ``to_json`` / ``from_json`` (a malformed file raises
:class:`RunFolderError` naming it).

Server run folder (``server.federation.run_federation`` writes it; export,
model cards, ``mammofed-server status`` and the study read it)::

    rounds.jsonl                      one line per round (``server.federation``)
    checkpoints/round-NNNNN.npz       the global SHARED arrays of round NNNNN
    checkpoints/round-NNNNN.json      :class:`CheckpointMeta`, written last (a
                                      round counts once both files exist)
    outcome.json                      ``common.wire.faults.run_outcome``

Study run folder (``simulation.run`` writes it, ``simulation.report`` reads
it)::

    run.json                          :class:`StudyRun`
    configs/*.yaml                    the resolved configs used
    <regime>/metrics.json             :class:`RegimeMetrics`
    <regime>/detections.json          {site: [FrocImage.to_json()]}: every scored
                                      test image, model space
    <regime>/rounds.jsonl             federated only: one :class:`StudyRound`
                                      per (round, site)
    <regime>/server/                  the server run folder of that regime
    <regime>/site-state/<site>/       each site's state (``client.site_model``)
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from common.detector.froc import ClassMetrics, FrocResult
from common.errors import MammofedError, shown
from common.fileio import read_json_document

log = logging.getLogger(__name__)
_R = TypeVar("_R")

# --- file names -------------------------------------------------------------------
RUN_JSON = "run.json"
METRICS_JSON = "metrics.json"
DETECTIONS_JSON = "detections.json"
ROUNDS_JSONL = "rounds.jsonl"
CONFIGS_DIR = "configs"
#: Sub-folders of a federated regime: the server's run folder, the sites' state.
SERVER_DIR = "server"
SITE_STATE_DIR = "site-state"
CHECKPOINT_DIR = "checkpoints"


class RunFolderError(MammofedError):
    """A run-folder file that cannot be read; the message names it and the key."""


def read_json(path: Path) -> Any:
    """The JSON value of ``path``; unreadable files raise :class:`RunFolderError`."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise RunFolderError(f"{path}: cannot read JSON: {exc}") from exc


def _parse(path: Path, build: Any, data: Any) -> Any:
    try:
        return build(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RunFolderError(f"{path}: malformed record: {exc!r}") from exc


# --- server checkpoints -------------------------------------------------------------
_ROUND_JSON = re.compile(r"^round-(\d{5,})\.json$")


def round_paths(folder: Path, server_round: int) -> tuple[Path, Path]:
    """``(round-NNNNN.npz, round-NNNNN.json)`` of ``server_round`` in ``folder``."""
    stem = f"round-{server_round:05d}"
    return Path(folder) / f"{stem}.npz", Path(folder) / f"{stem}.json"


def round_number(path: Path) -> int | None:
    """The round a ``round-NNNNN.json`` names, or ``None`` for any other name."""
    m = _ROUND_JSON.match(Path(path).name)
    return int(m.group(1)) if m else None


def complete_rounds(folder: Path) -> list[int]:
    """Rounds in ``folder`` whose ``.json`` and ``.npz`` both exist, ascending."""
    found = (round_number(p) for p in Path(folder).iterdir())
    return sorted(
        n for n in found if n is not None and round_paths(folder, n)[0].is_file()
    )


@dataclass(frozen=True)
class CheckpointMeta:
    """``checkpoints/round-NNNNN.json``: what the round's ``.npz`` holds.

    ``array_names``: the shared arrays in the ``.npz`` (``None`` in files that
    predate it); ``metrics``: the round's aggregated metrics; ``config``: the
    resolved federation config the run was trained with.
    """

    round: int
    array_names: list[str] | None
    metrics: dict[str, Any]
    config: dict[str, Any]

    @classmethod
    def read(cls, path: Path) -> CheckpointMeta:
        """Read a round file; errors name the file and the field."""
        d = read_json_document(path, "round file", RunFolderError)
        try:
            rnd = int(d["round"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RunFolderError(
                f"{path}: field 'round' is missing or not an integer"
            ) from exc
        names, metrics, config = d.get("array_names"), d.get("metrics"), d.get("config")
        if names is not None and (
            not isinstance(names, list) or not all(isinstance(n, str) for n in names)
        ):
            raise RunFolderError(
                f"{path}: field 'array_names' is not a list of names: {shown(names)}"
            )
        for key, value in (("metrics", metrics), ("config", config)):
            if value is not None and not isinstance(value, Mapping):
                raise RunFolderError(
                    f"{path}: field {key!r} is not an object: {shown(value)}"
                )
        return cls(
            round=rnd,
            array_names=None if names is None else list(names),
            metrics=dict(metrics or {}),
            config=dict(config or {}),
        )


# --- server rounds.jsonl -----------------------------------------------------------
#: ``mammofed-server status`` reads at most this many bytes from the end of
#: ``rounds.jsonl`` to find its last row.
ROUNDS_TAIL_BYTES = 1 << 20
#: A ``rounds.jsonl`` line longer than this is not a row (skipped, logged).
MAX_ROW_BYTES = 16 << 20


def _round_row(where: str, raw: bytes) -> dict[str, Any] | None:
    """One ``rounds.jsonl`` line as a row, or ``None`` (logged) when it is not one.

    A row is a JSON object whose ``round`` is an integer >= 0. A line torn by
    a crash, edited or not UTF-8 is skipped with a warning naming ``where``.
    """
    try:
        row = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        log.warning("%s: not a JSON line, skipped: %s", where, exc)
        return None
    if not isinstance(row, dict):
        log.warning("%s: not a JSON object, skipped: %s", where, shown(row))
        return None
    rnd = row.get("round")
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
        log.warning(
            "%s: field 'round' is not a round number, skipped: %s", where, shown(rnd)
        )
        return None
    return row


def iter_round_rows(path: Path) -> Iterable[dict[str, Any]]:
    """The rows of a server's ``rounds.jsonl``, read one line at a time.

    Blank lines are ignored; a line that is not a row (torn by a crash,
    edited, over :data:`MAX_ROW_BYTES`) is skipped with a warning naming the
    file and the line. A missing file has no rows.
    """
    path = Path(path)
    if not path.is_file():
        return
    with path.open("rb") as fh:
        i = 0
        while raw := fh.readline(MAX_ROW_BYTES + 1):
            i += 1
            if len(raw) > MAX_ROW_BYTES and not raw.endswith(b"\n"):
                while (rest := fh.readline(MAX_ROW_BYTES)) and not rest.endswith(b"\n"):
                    pass
                log.warning(
                    "%s line %d: over %d bytes, skipped", path, i, MAX_ROW_BYTES
                )
                continue
            if raw.strip():
                row = _round_row(f"{path} line {i}", raw)
                if row is not None:
                    yield row


def last_round_row(
    path: Path, max_bytes: int = ROUNDS_TAIL_BYTES
) -> dict[str, Any] | None:
    """The last row of a server's ``rounds.jsonl`` (``None`` when it has none).

    Reads at most ``max_bytes`` from the end of the file, whatever its size;
    lines that are not rows are skipped as by :func:`iter_round_rows`.
    """
    path = Path(path)
    if not path.is_file():
        return None
    with path.open("rb") as fh:
        size = fh.seek(0, 2)
        start = max(0, size - max_bytes)
        fh.seek(start)
        lines = fh.read(size - start).split(b"\n")
    if start > 0:
        lines = lines[1:]  # the first may be the end of a longer line
    for raw in reversed(lines):
        if raw.strip():
            row = _round_row(f"{path} (last lines)", raw)
            if row is not None:
                return row
    return None


def append_round_row(path: Path, row: Mapping[str, Any]) -> None:
    """Append ``row`` as one line of a server's ``rounds.jsonl``.

    A file whose last line was torn by a crash (no final newline) is first
    ended with one, so the torn line stays alone and the new row is whole.
    """
    path = Path(path)
    line = (json.dumps(row, sort_keys=True) + "\n").encode("utf-8")
    with path.open("ab+") as fh:
        if fh.seek(0, 2) > 0:
            fh.seek(-1, 2)
            if fh.read(1) != b"\n":
                log.warning("%s: last line is incomplete (torn by a crash?)", path)
                line = b"\n" + line
        fh.write(line)


# --- metrics ----------------------------------------------------------------------
@dataclass(frozen=True)
class SiteMetrics:
    """One site's test evaluation: images scored and a FROC record per class."""

    n_images: int
    classes: dict[str, ClassMetrics]

    @classmethod
    def from_results(cls, per_class: Mapping[str, FrocResult]) -> SiteMetrics:
        """From ``EvalResult.per_class`` (curves kept: the report plots them)."""
        classes = {
            k: ClassMetrics.from_result(r, curve=True) for k, r in per_class.items()
        }
        return cls(max((c.n_images for c in classes.values()), default=0), classes)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SiteMetrics:
        """Inverse of ``asdict``."""
        classes = {k: ClassMetrics.from_json(c) for k, c in d["classes"].items()}
        return cls(int(d["n_images"]), classes)


@dataclass(frozen=True)
class RegimeMetrics:
    """``<regime>/metrics.json``: every scored site of one regime.

    ``kind`` is ``central``, ``federated`` or ``ensemble``; ``dp`` the privacy
    record of a DP regime (``{"epsilon", "delta", "spent": {site: eps},
    "sites"}``), else None.
    """

    regime: str
    kind: str
    sites: dict[str, SiteMetrics]
    dp: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RegimeMetrics:
        """Inverse of ``asdict``."""
        sites = {k: SiteMetrics.from_json(s) for k, s in d["sites"].items()}
        return cls(str(d["regime"]), str(d["kind"]), sites, d.get("dp"))


@dataclass(frozen=True)
class StudyRun:
    """``run.json``: what a study ran, and how long each regime took (seconds).

    ``dp_epsilon``: the target of the DP regime, when one ran; ``reused``:
    ``{regime: run folder (absolute)}`` of the regimes read from an earlier
    run (``mammofed-sim run --reuse``) rather than trained.
    """

    scenario: str
    sites: list[str]
    regimes: list[str]
    working_spacing_mm: float
    base_sites: list[str]
    dp_epsilon: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    reused: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> StudyRun:
        """Inverse of ``asdict``."""
        return cls(**d)


def write_record(path: Path, record: Any) -> Path:
    """Write a record of this module (a dataclass) as ``path``; returns it."""
    Path(path).write_text(json.dumps(asdict(record), indent=1))
    return Path(path)


def read_record(cls: type[_R], path: Path) -> _R:
    """Read ``path`` as a ``cls`` record; a malformed file raises, naming it."""
    return _parse(path, cls.from_json, read_json(path))  # type: ignore[attr-defined,no-any-return]


# --- per-round rows of a federated regime -------------------------------------------
@dataclass(frozen=True)
class StudyRound:
    """One (round, site) line of ``<regime>/rounds.jsonl``.

    ``metrics``: the site's reply metrics (``num-examples`` left out, NaN as
    None) plus ``train_seconds`` / ``evaluate_seconds`` (the site's own compute
    time); ``bytes_sent``: nbytes of the shared arrays it sent (train rounds);
    ``error``: the site's error reply, if any.
    """

    round: int
    site: str
    bytes_sent: int | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The flat line: ``{"round", "site", "bytes_sent", <metrics>, "error"}``."""
        out: dict[str, Any] = {"round": self.round, "site": self.site}
        if self.bytes_sent is not None:
            out["bytes_sent"] = self.bytes_sent
        out.update(self.metrics)
        if self.error is not None:
            out["error"] = self.error
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> StudyRound:
        """Inverse of :meth:`to_json`; non-numeric extra keys are dropped."""
        known = {"round", "site", "bytes_sent", "error"}
        metrics = {
            str(k): None if v is None else float(v)
            for k, v in d.items()
            if k not in known and (v is None or isinstance(v, int | float))
        }
        b = d.get("bytes_sent")
        err = d.get("error")
        return cls(
            round=int(d["round"]),
            site=str(d["site"]),
            bytes_sent=None if b is None else int(b),
            metrics=metrics,
            error=None if err is None else str(err),
        )


def write_rounds(path: Path, rows: Iterable[StudyRound]) -> None:
    """Write ``rows`` as ``rounds.jsonl`` (one JSON object a line)."""
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row.to_json()) + "\n")


def read_rounds(path: Path) -> list[StudyRound]:
    """The rows of a regime's ``rounds.jsonl``.

    A line that is not JSON is skipped (logged); a malformed record raises.
    """
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                data = json.loads(line)
            except ValueError:
                # a line torn by a crash must not hide the others
                log.warning("%s line %d: not JSON, skipped", path, i)
                continue
            rows.append(_parse(Path(f"{path} line {i}"), StudyRound.from_json, data))
    return rows
