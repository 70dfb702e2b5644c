"""Turn a federation's result into a self-describing model checkpoint.

The server keeps one global checkpoint per round
(``RUN/server/checkpoints/round-NNNNN.npz`` with the SHARED arrays only and
``round-NNNNN.json`` whose ``config`` is the resolved federation config); each
site keeps its personal arrays on its own disk (``<state_dir>/<site>/``, see
:class:`client.state.SiteState`). :func:`export_model` joins them into a
:mod:`common.checkpoint` file that ``mammofed-client predict`` and
``mammofed-client evaluate`` read:

* with a site: the global shared arrays + the site's personal arrays (FedBN
  norm layers and BatchNorm counters, the FedPer personal head when the run has
  one), composed by :func:`client.detector_trainer.load_site_arrays` exactly as
  the site's own model is during federated evaluation;
* ``global_only``: the global model. Under FedBN the global arrays hold no
  normalization layers (their statistics exist only on the sites), so a site
  must be named to lend its norm layers; its personal head is NOT used.

When the run standardized intensities (``trainer.options.standardize``) the
site's fitted landmarks go to ``extra["standardizer"]`` and predict / evaluate
apply them before the model (:func:`checkpoint_standardizer`). Provenance goes
to ``extra["export"]``. No image data is read.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.detector_trainer import (
    PERSONAL_HEAD_PREFIX,
    STANDARDIZER_FILE,
    DetectorOptions,
    load_site_arrays,
)
from client.state import SiteState
from common.adapt.standardize import HistogramStandardizer
from common.checkpoint import Checkpoint, save_checkpoint
from common.config.loader import from_mapping
from common.errors import CheckpointMismatch, ConfigError, MammofedError
from common.federation import CHECKPOINT_DIR, FederationConfig
from common.fileio import load_arrays
from common.model import (
    Personalization,
    build_detector,
    head_keys,
    shared_and_personal,
)

log = logging.getLogger(__name__)

#: ``extra`` keys of an exported checkpoint.
EXTRA_EXPORT = "export"
EXTRA_STANDARDIZER = "standardizer"
EXPORT_FORMAT = "mammofed-export/1"
#: The only trainer whose arrays form a detector checkpoint.
DETECTOR_TRAINER = "detector"

_ROUND_JSON = re.compile(r"^round-(\d{5,})\.json$")


class ExportError(MammofedError):
    """An export input that cannot be used; the message names file and field."""


@dataclass(frozen=True)
class GlobalRound:
    """One complete server checkpoint and the run config recorded with it."""

    round: int
    json_path: Path
    npz_path: Path
    arrays: dict[str, np.ndarray]
    fed_cfg: FederationConfig
    options: DetectorOptions
    metrics: dict[str, Any]


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote."""

    path: Path
    round: int
    site: str | None
    kind: str  # "site" or "global"
    head: str  # "personal" or "global"
    standardized: bool
    extra: dict[str, Any]


# --- the server's round files ----------------------------------------------------
def _complete_rounds(folder: Path) -> list[int]:
    out = []
    for p in folder.iterdir():
        m = _ROUND_JSON.match(p.name)
        if m and p.with_suffix(".npz").is_file():
            out.append(int(m.group(1)))
    return sorted(out)


def resolve_round_files(path: str | Path) -> tuple[Path, Path]:
    """``(round json, round npz)`` named by ``path``.

    ``path`` is a ``round-NNNNN.json`` (or its ``.npz``), a checkpoints folder
    (its last complete round) or a run folder holding ``checkpoints/``.
    """
    p = Path(path)
    if p.is_dir():
        folder = p
        if not _complete_rounds(p) and (p / CHECKPOINT_DIR).is_dir():
            folder = p / CHECKPOINT_DIR
        rounds = _complete_rounds(folder)
        if not rounds:
            raise ExportError(
                f"{folder}: no complete round checkpoint in this folder "
                "(expected round-NNNNN.json with its round-NNNNN.npz, as the "
                "server writes under RUN/server/checkpoints/)"
            )
        stem = f"round-{rounds[-1]:05d}"
        return folder / f"{stem}.json", folder / f"{stem}.npz"
    if p.suffix == ".npz":
        p = p.with_suffix(".json")
    if not _ROUND_JSON.match(p.name):
        raise ExportError(
            f"{path}: not a round checkpoint: give RUN/server/checkpoints "
            "(last complete round) or one round-NNNNN.json in it"
        )
    npz = p.with_suffix(".npz")
    if not p.is_file():
        raise ExportError(f"{p}: round file does not exist")
    if not npz.is_file():
        raise ExportError(
            f"{npz}: round arrays file does not exist (the round is incomplete; "
            f"{p.name} names arrays that were never written or were removed)"
        )
    return p, npz


def read_global_round(path: str | Path) -> GlobalRound:
    """Load a complete server round and validate its recorded run config.

    Raises:
        ExportError / ConfigError: missing or unreadable files, no ``config``,
            a trainer other than ``detector``; messages name file and field.
    """
    json_path, npz_path = resolve_round_files(path)
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{json_path}: unreadable round file: {exc}") from exc
    if not isinstance(meta, dict):
        raise ExportError(f"{json_path}: must hold a JSON object, got {meta!r}")
    try:
        rnd = int(meta["round"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(
            f"{json_path}: field 'round' is missing or not an integer"
        ) from exc
    raw_cfg = meta.get("config")
    if not isinstance(raw_cfg, Mapping) or not raw_cfg:
        raise ExportError(
            f"{json_path}: field 'config' is missing or empty; the round does "
            "not record the federation config it was trained with"
        )
    # initial_arrays / initial_checkpoint only seeded round 0 and may be gone;
    # nothing here needs them.
    cfg_map = {**raw_cfg, "initial_arrays": None, "initial_checkpoint": None}
    fed_cfg = from_mapping(
        cfg_map, FederationConfig, source=str(json_path), prefix="config"
    )
    if fed_cfg.trainer.name != DETECTOR_TRAINER:
        raise ConfigError(
            str(json_path),
            "config.trainer.name",
            f"is {fed_cfg.trainer.name!r}; only runs of the {DETECTOR_TRAINER!r} "
            "trainer produce a lesion detector that can be exported",
        )
    options = from_mapping(
        dict(fed_cfg.trainer.options),
        DetectorOptions,
        source=str(json_path),
        prefix="config.trainer.options",
    )
    try:
        arrays = load_arrays(npz_path)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{npz_path}: unreadable round arrays: {exc}") from exc
    names = meta.get("array_names")
    if names is not None and set(names) != set(arrays):
        raise ExportError(
            f"{npz_path}: arrays differ from field 'array_names' of {json_path} "
            f"(only in npz: {sorted(set(arrays) - set(names))[:5]}, only in "
            f"json: {sorted(set(names) - set(arrays))[:5]})"
        )
    metrics = meta.get("metrics")
    return GlobalRound(
        round=rnd,
        json_path=json_path,
        npz_path=npz_path,
        arrays=arrays,
        fed_cfg=fed_cfg,
        options=options,
        metrics=dict(metrics) if isinstance(metrics, Mapping) else {},
    )


# --- checks -------------------------------------------------------------------
def _check_shapes(
    arrays: Mapping[str, np.ndarray],
    names: Mapping[str, str],
    sd: Mapping[str, torch.Tensor],
    source: Path,
    what: str,
) -> None:
    """``names`` maps array name in ``arrays`` -> model key; shapes must agree."""
    for name, key in names.items():
        have = tuple(np.shape(arrays[name]))
        want = tuple(sd[key].shape)
        if have != want:
            raise CheckpointMismatch(
                f"{source}: array {name!r} has shape {have} but the model "
                f"built from {what} needs {want}"
            )


def _plain_site(site: str) -> str:
    if not site or "/" in site or site in (".", "..") or site.strip() != site:
        raise ConfigError("command line", "--site", f"must be a plain word: {site!r}")
    return site


# --- export -------------------------------------------------------------------
def export_model(
    checkpoint: str | Path,
    out: str | Path,
    *,
    site: str | None = None,
    state_dir: str | Path | None = None,
    global_only: bool = False,
) -> ExportResult:
    """Write the site's personalized (or the global) model as a checkpoint.

    Args:
        checkpoint: a server round file, checkpoints folder or run folder
            (see :func:`resolve_round_files`).
        out: the checkpoint file to write (replaced if present).
        site: the site whose personal state is composed in; required unless
            ``global_only`` on a run without FedBN.
        state_dir: the state folder holding ``<site>/``; default the run's
            ``state_dir`` as recorded in the round file.
        global_only: the global model (shared arrays + global head); under
            FedBN the named site lends only its norm layers.

    Raises:
        MammofedError: every unusable input, naming the file and field.
    """
    g = read_global_round(checkpoint)
    cfg, opts = g.fed_cfg, g.options
    what = f"{g.json_path}: config.trainer.options"
    out_path = Path(out)
    if out_path.is_dir():
        raise ConfigError(
            "command line", "--out", f"{out_path} is a folder, not a file"
        )
    local_norm = cfg.personalization.local_norm
    if site is None and not global_only:
        raise ConfigError(
            "command line",
            "--site",
            "name the site whose personalized model to export (--site NAME "
            "[--state-dir DIR] or --site-config FILE), or give --global-only",
        )
    if site is None and local_norm:
        raise ConfigError(
            str(g.json_path),
            "config.personalization.local_norm",
            "is true (FedBN): the global arrays hold no normalization layers, "
            "their statistics exist only on each site; --global-only needs a "
            "site too (--site NAME or --site-config FILE) to lend its norm layers",
        )

    model_cfg = opts.model_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_detector(model_cfg)
    personalization = Personalization(
        local_norm=local_norm, personal_head=cfg.personalization.personal_head
    )
    shared_keys, personal_keys = shared_and_personal(model, personalization)
    hkeys = head_keys(model)
    sd = model.state_dict()

    unknown = sorted(set(g.arrays) - set(sd))
    if unknown:
        raise CheckpointMismatch(
            f"{g.npz_path}: array {unknown[0]!r} is not a tensor of the "
            f"{model_cfg.arch!r} model built from {what} ({len(unknown)} such)"
        )
    missing = [k for k in shared_keys if k not in g.arrays]
    if missing:
        raise CheckpointMismatch(
            f"{g.npz_path}: lacks {len(missing)} shared arrays the "
            f"{model_cfg.arch!r} model built from {what} needs, e.g. {missing[:3]}"
        )
    _check_shapes(g.arrays, {k: k for k in g.arrays}, sd, g.npz_path, what)

    personal: dict[str, np.ndarray] | None = None
    state: SiteState | None = None
    site_last_round: int | None = None
    use_personal_head = False
    if site is not None:
        _plain_site(site)
        if state_dir is None:
            if cfg.state_dir is None:
                raise ConfigError(
                    str(g.json_path),
                    "config.state_dir",
                    "is not set; give --state-dir (the folder holding "
                    f"{site}/personal.npz) or --site-config",
                )
            state_dir = cfg.state_dir
        site_dir = Path(state_dir) / site
        if not site_dir.is_dir():
            raise ExportError(
                f"{site_dir}: no state for site {site!r}: that site never trained "
                f"in this run (sites: {list(cfg.sites) or 'not recorded'}), or the "
                "state folder is not the one its SuperNode used"
            )
        state = SiteState(state_dir, site)
        personal = state.load_personal()
        meta = state.read_meta()
        if "last_round" in meta:
            site_last_round = int(meta["last_round"])
        needs_head = cfg.personalization.personal_head and not global_only
        if personal is None and (local_norm or needs_head or not meta):
            parts = [
                n for n, on in (("norm layers", local_norm), ("head", needs_head)) if on
            ]
            raise ExportError(
                f"{state.personal_path}: does not exist: site {site!r} has no "
                "personal state, so it never trained in this run"
                + (
                    f" (its personal {' and '.join(parts)} exist nowhere else)"
                    if parts
                    else ""
                )
            )
        own = personal or {}
        if local_norm:
            lacking = [k for k in personal_keys if k not in own]
            if lacking:
                raise CheckpointMismatch(
                    f"{state.personal_path}: lacks {len(lacking)} personal norm "
                    f"arrays the FedBN model needs, e.g. {lacking[:3]}"
                )
        _check_shapes(
            own,
            {k: k for k in personal_keys if k in own},
            sd,
            state.personal_path,
            what,
        )
        if needs_head:
            have = [k for k in hkeys if PERSONAL_HEAD_PREFIX + k in own]
            if have and len(have) != len(hkeys):
                lacking = [PERSONAL_HEAD_PREFIX + k for k in hkeys if k not in have]
                raise CheckpointMismatch(
                    f"{state.personal_path}: personal head incomplete, lacks "
                    f"{lacking[:3]} ({len(lacking)} in all)"
                )
            if have:
                use_personal_head = True
                _check_shapes(
                    own,
                    {PERSONAL_HEAD_PREFIX + k: k for k in hkeys},
                    sd,
                    state.personal_path,
                    what,
                )
            else:
                log.warning(
                    "%s: no personal head stored (trainer.options.head_epochs "
                    "0?); the global head is used",
                    state.personal_path,
                )
        if site_last_round is not None and site_last_round > g.round:
            log.warning(
                "site %s last trained in round %d but round %d is exported: its "
                "personal arrays are newer than the global ones",
                site,
                site_last_round,
                g.round,
            )

    # the one composition rule (the same call builds the site's model in training)
    composed = site is not None and (local_norm or not global_only)
    load_site_arrays(
        model,
        g.arrays,
        personal if composed else None,
        personal_keys=personal_keys,
        personal_head_keys=hkeys if use_personal_head else (),
    )
    model.eval()

    std = _site_standardizer(opts, state, g.json_path)
    kind = "global" if global_only else "site"
    provenance: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "kind": kind,
        "run": cfg.name,
        "round": g.round,
        "round_file": str(g.json_path.resolve()),
        "site": site,
        "state_dir": str(Path(state.dir).parent.resolve()) if state else None,
        "site_last_round": site_last_round,
        "strategy": cfg.strategy.name,
        "personalization": {
            "local_norm": local_norm,
            "personal_head": cfg.personalization.personal_head,
        },
        "head": "personal" if use_personal_head else "global",
        "norm": "site" if (local_norm and site is not None) else "global",
        "standardized": std is not None,
        "trainer_options": dict(cfg.trainer.options),
        "round_metrics": g.metrics,
    }
    extra: dict[str, Any] = {EXTRA_EXPORT: provenance}
    if std is not None:
        extra[EXTRA_STANDARDIZER] = std.to_dict()
    path = save_checkpoint(out_path, model, model_cfg, extra=extra)
    log.info(
        "exported %s model of round %d%s (head %s%s) to %s",
        kind,
        g.round,
        f", site {site}" if site else "",
        provenance["head"],
        ", standardized" if std is not None else "",
        path,
    )
    return ExportResult(
        path=path,
        round=g.round,
        site=site,
        kind=kind,
        head=str(provenance["head"]),
        standardized=std is not None,
        extra=extra,
    )


def _site_standardizer(
    opts: DetectorOptions, state: SiteState | None, json_path: Path
) -> HistogramStandardizer | None:
    """The site's fitted standardizer when the run used one."""
    if not opts.standardize:
        return None
    if state is None:
        log.warning(
            "%s: the run standardized intensities (trainer.options.standardize) "
            "but no site is named, so the checkpoint carries no standardizer; "
            "give --site to store that site's landmarks",
            json_path,
        )
        return None
    path = state.dir / STANDARDIZER_FILE
    if not path.is_file():
        raise ExportError(
            f"{path}: does not exist: the run standardized intensities "
            f"({json_path}: config.trainer.options.standardize) but site "
            f"{state.site!r} has no fitted standardizer, so it never trained in "
            "this run"
        )
    try:
        return HistogramStandardizer.load(path)
    except ValueError as exc:
        msg = str(exc)
        raise ExportError(msg if str(path) in msg else f"{path}: {msg}") from exc


# --- use of an exported checkpoint ---------------------------------------------
def checkpoint_standardizer(ck: Checkpoint) -> HistogramStandardizer | None:
    """The intensity standardizer a checkpoint carries (``extra.standardizer``).

    Raises:
        CheckpointMismatch: the field is present but malformed.
    """
    data = ck.extra.get(EXTRA_STANDARDIZER)
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise CheckpointMismatch(
            f"{ck.path}: field 'extra.{EXTRA_STANDARDIZER}' must be a mapping, "
            f"got {type(data).__name__}"
        )
    try:
        return HistogramStandardizer.from_dict(data)
    except ValueError as exc:
        raise CheckpointMismatch(
            f"{ck.path}: field 'extra.{EXTRA_STANDARDIZER}': {exc}"
        ) from exc
