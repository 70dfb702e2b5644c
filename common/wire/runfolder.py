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
from common.errors import MammofedError
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
        return cls(
            round=rnd,
            array_names=None if names is None else list(names),
            metrics=dict(metrics) if isinstance(metrics, Mapping) else {},
            config=dict(config) if isinstance(config, Mapping) else {},
        )


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
