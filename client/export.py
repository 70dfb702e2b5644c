"""Turn a federation's result into a self-describing model checkpoint.

The server keeps one global checkpoint per round
(``RUN/checkpoints/round-NNNNN.npz`` with the SHARED arrays only and
``round-NNNNN.json``, a :class:`common.wire.runfolder.CheckpointMeta` whose
``config`` is the resolved federation config); each site keeps its personal
state on its own disk (:mod:`client.site_model`). :func:`export_model` joins
them into a :mod:`common.detector.checkpoint` file that ``mammofed-client predict`` and
``mammofed-client evaluate`` read, in small steps:

1. :func:`read_global_round`: the round's arrays and its validated config;
2. :func:`global_model`: the detector that config builds, checked against the
   arrays;
3. :func:`site_personal`: the site's personal arrays, checked (a site model
   composes them exactly as the site's own model is during training):
   FedBN norm layers and BatchNorm counters, the FedPer personal head when the
   run has one. The global model (``global_only``) keeps the global head;
   under FedBN the global arrays hold no normalization layers (their
   statistics exist only on the sites), so a site must lend its norm layers.
   In a run whose sites choose their own model (``trainer.options.select``)
   the site's model is the candidate it chose (:func:`site_choice`,
   :func:`client.selection.compose_candidate`);
4. :func:`site_standardizer`: when the run standardized intensities
   (``trainer.options.standardize``) the site's fitted landmarks go to
   ``extra["standardizer"]`` and predict / evaluate apply them before the
   model (:func:`checkpoint_standardizer`); provenance goes to
   ``extra["export"]`` and the sites' patient split (the federation's seed)
   to ``extra["split"]``, which evaluate scores by. No image data is read.

Errors are domain errors naming files and fields; :class:`ExportNeeds` says
which input is missing, and the command line names its flag.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from client.detector_trainer import (
    EXTRA_SPLIT,
    DetectorOptions,
    detector_options,
    training_split,
)
from client.selection import (
    PERSONALIZED,
    Selection,
    SelectionStore,
    arrays_sha256,
    compose_candidate,
)
from client.site_model import SiteModel
from client.state import SiteState, plain_site_name
from common.config.loader import from_mapping
from common.detector.adapt.standardize import HistogramStandardizer
from common.detector.checkpoint import Checkpoint, load_model, save_checkpoint
from common.detector.engine import prepare_model
from common.detector.model import build_detector
from common.errors import CheckpointMismatch, ConfigError, MammofedError
from common.fileio import load_arrays
from common.keys import DETECTOR_TRAINER
from common.wire.faults import ModelVersion
from common.wire.federation import FederationConfig
from common.wire.runfolder import (
    CHECKPOINT_DIR,
    CheckpointMeta,
    RunFolderError,
    complete_rounds,
    round_number,
    round_paths,
)

log = logging.getLogger(__name__)

#: ``extra`` keys of an exported checkpoint.
EXTRA_EXPORT = "export"
EXTRA_STANDARDIZER = "standardizer"
EXPORT_FORMAT = "mammofed-export/1"


class ExportError(MammofedError):
    """An export input that cannot be used; the message names file and field."""


class ExportNeeds(ExportError):
    """An input the export needs was not given.

    ``what``: ``site`` (a site whose personal state to compose, or the global
    model), ``lending-site`` (the global model of a FedBN run needs a site's
    norm layers) or ``state-dir`` (the run does not record its sites' state
    folder).
    """

    def __init__(
        self, what: Literal["site", "lending-site", "state-dir"], message: str
    ) -> None:
        self.what = what
        super().__init__(message)


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

    @property
    def options_source(self) -> str:
        """Where the model's config comes from (for error messages)."""
        return f"{self.json_path}: config.trainer.options"


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote."""

    path: Path
    round: int
    kind: str  # "site" or "global"
    standardized: bool


# --- 1. the server's round files ----------------------------------------------
def resolve_round_files(path: str | Path) -> tuple[Path, Path]:
    """``(round json, round npz)`` named by ``path``.

    ``path`` is a ``round-NNNNN.json`` (or its ``.npz``), a checkpoints folder
    (its last complete round) or a run folder holding ``checkpoints/``.
    """
    p = Path(path)
    if p.is_dir():
        folder = p
        if not complete_rounds(p) and (p / CHECKPOINT_DIR).is_dir():
            folder = p / CHECKPOINT_DIR
        rounds = complete_rounds(folder)
        if not rounds:
            raise ExportError(
                f"{folder}: no complete round checkpoint in this folder "
                "(expected round-NNNNN.json with its round-NNNNN.npz, as the "
                "server writes under RUN/checkpoints/; in a study: "
                "REGIME/server/checkpoints/)"
            )
        npz, js = round_paths(folder, rounds[-1])
        return js, npz
    if p.suffix == ".npz":
        p = p.with_suffix(".json")
    if round_number(p) is None:
        raise ExportError(
            f"{path}: not a round checkpoint: give RUN/checkpoints "
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
        meta = CheckpointMeta.read(json_path)
    except RunFolderError as exc:
        raise ExportError(str(exc)) from exc
    if not meta.config:
        raise ExportError(
            f"{json_path}: field 'config' is missing or empty; the round does "
            "not record the federation config it was trained with"
        )
    # initial_arrays / initial_checkpoint only seeded round 0 and may be gone;
    # nothing here needs them.
    cfg_map = {**meta.config, "initial_arrays": None, "initial_checkpoint": None}
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
    options = detector_options(fed_cfg, str(json_path), "config.trainer.options")
    try:
        arrays = load_arrays(npz_path)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{npz_path}: unreadable round arrays: {exc}") from exc
    names = meta.array_names
    if names is not None and set(names) != set(arrays):
        raise ExportError(
            f"{npz_path}: arrays differ from field 'array_names' of {json_path} "
            f"(only in npz: {sorted(set(arrays) - set(names))[:5]}, only in "
            f"json: {sorted(set(names) - set(arrays))[:5]})"
        )
    return GlobalRound(
        round=meta.round,
        json_path=json_path,
        npz_path=npz_path,
        arrays=arrays,
        fed_cfg=fed_cfg,
        options=options,
        metrics=meta.metrics,
    )


# --- 2. the model and the site ----------------------------------------------------
def global_model(g: GlobalRound, state: SiteState | None) -> SiteModel:
    """The detector ``g``'s config builds (seeded), checked against its arrays.

    ``state``: the site whose personal state will be composed in, if any.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(g.fed_cfg.seed)
        model = build_detector(g.options.model_config())
    site_model = SiteModel(model, g.fed_cfg.personalization, state)
    site_model.check_shared(g.arrays, g.npz_path, g.options_source)
    return site_model


def open_site_state(
    g: GlobalRound, site: str, state_dir: str | Path | None
) -> SiteState:
    """The state of ``site`` under ``state_dir`` (default: the run's own).

    Raises:
        ExportNeeds: the run records no state folder and none is given.
        ExportError: the site has no state folder there.
    """
    plain_site_name(site)
    if state_dir is None:
        if g.fed_cfg.state_dir is None:
            raise ExportNeeds(
                "state-dir",
                f"{g.json_path}: config.state_dir is not set: the round does not "
                f"say which folder holds {site}/personal.npz",
            )
        state_dir = g.fed_cfg.state_dir
    site_dir = Path(state_dir) / site
    if not site_dir.is_dir():
        sites = list(g.fed_cfg.sites) or "not recorded"
        raise ExportError(
            f"{site_dir}: no state for site {site!r}: that site never trained "
            f"in this run (sites: {sites}), or the state folder is not the one "
            "its SuperNode used"
        )
    return SiteState(state_dir, site)


def settle_for_export(g: GlobalRound, state: SiteState) -> None:
    """Take the site's pending round for ``g`` when the server kept it.

    A run that sent the site no message after its last round (no evaluation
    there: ``fraction_evaluate: 0``, or the site not sampled or offline)
    leaves that round's personal state pending (:mod:`client.state`). The
    round file's saved :class:`ModelVersion` says whether the server
    aggregated this node's update: then it is committed, as the next message
    would have done; otherwise the last committed state is exported, with a
    warning.
    """
    version = ModelVersion.from_checkpoint_metrics(g.metrics, g.round)
    if state.commit_if_kept(version):
        log.info(
            "site %s: round %d's personal state was pending (no server message "
            "after it); %s shows the server kept its update: committed",
            state.site, g.round, g.json_path,
        )  # fmt: skip
        return
    pend = state.pending()
    if pend is not None and pend["round"] == g.round:
        log.warning(
            "site %s: round %d's personal state is pending and %s does not list "
            "this node (%d) among the updates it kept (%s): exporting the last "
            "committed personal state with round %d's global arrays",
            state.site, g.round, g.json_path, pend["node"],
            list(version.nodes) or "none recorded", g.round,
        )  # fmt: skip


def site_personal(
    g: GlobalRound, site_model: SiteModel, *, global_only: bool
) -> tuple[dict[str, np.ndarray] | None, bool]:
    """``(personal arrays, use the personal head)`` of the site, checked.

    Raises:
        ExportError: the site has no personal state although the run needs it.
        CheckpointMismatch: arrays missing or of the wrong shape.
    """
    state = site_model.state
    assert state is not None
    local_norm = site_model.personalization.local_norm
    needs_head = site_model.personalization.personal_head and not global_only
    personal = state.load_personal()
    meta = state.read_meta()
    if personal is None and (local_norm or needs_head or not meta):
        parts = [
            n for n, on in (("norm layers", local_norm), ("head", needs_head)) if on
        ]
        raise ExportError(
            f"{state.personal_path}: does not exist: site {state.site!r} has no "
            "personal state, so it never trained in this run"
            + (
                f" (its personal {' and '.join(parts)} exist nowhere else)"
                if parts
                else ""
            )
        )
    head = site_model.check_personal(
        personal or {}, head=needs_head, what=g.options_source
    )
    if needs_head and not head:
        log.warning(
            "%s: no personal head stored (trainer.options.head_epochs 0?); the "
            "global head is used",
            state.personal_path,
        )
    last = meta.get("last_round")
    if last is not None and int(last) > g.round:
        log.warning(
            "site %s last trained in round %d but round %d is exported: its "
            "personal arrays are newer than the global ones",
            state.site,
            int(last),
            g.round,
        )
    return personal, head


def site_choice(g: GlobalRound, state: SiteState) -> Selection:
    """The model the site chose (``trainer.options.select``), checked.

    Raises:
        ExportError: the site never recorded a choice (``selection.json``).
        SiteStateError: an unreadable or malformed choice file (file, field
            and value named).
    """
    store = SelectionStore(state)
    choice = store.read()
    if choice is None:
        raise ExportError(
            f"{store.selection_path}: does not exist: the run chose each site's "
            f"model on its validation women ({g.json_path}: config.trainer.options."
            f"select) but site {state.site!r} never recorded a choice (it never "
            "evaluated a round)"
        )
    if choice.shared_sha256 != arrays_sha256(g.arrays):
        log.warning(
            "%s: site %s chose %r on the global arrays of round %d, not on those "
            "of the exported round %d",
            store.selection_path,
            state.site,
            choice.choice,
            choice.round,
            g.round,
        )
    return choice


def site_standardizer(
    g: GlobalRound, site_model: SiteModel
) -> HistogramStandardizer | None:
    """The site's fitted standardizer when the run used one (and a site is named)."""
    if not g.options.standardize:
        return None
    if site_model.state is None:
        log.warning(
            "%s: the run standardized intensities (trainer.options.standardize) "
            "but no site is named, so the checkpoint carries no standardizer",
            g.json_path,
        )
        return None
    path = site_model.standardizer_path
    if not path.is_file():
        raise ExportError(
            f"{path}: does not exist: the run standardized intensities "
            f"({g.json_path}: config.trainer.options.standardize) but site "
            f"{site_model.state.site!r} has no fitted standardizer, so it never "
            "trained in this run"
        )
    try:
        return HistogramStandardizer.load(path)
    except ValueError as exc:
        msg = str(exc)
        raise ExportError(msg if str(path) in msg else f"{path}: {msg}") from exc


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
        ExportNeeds: a missing input (which one: ``ExportNeeds.what``).
        MammofedError: every unusable input, naming the file and field.
    """
    g = read_global_round(checkpoint)
    out_path = Path(out)
    if out_path.is_dir():
        raise ExportError(f"{out_path}: is a folder; the export writes one file")
    local_norm = g.fed_cfg.personalization.local_norm
    if site is None and not global_only:
        raise ExportNeeds(
            "site", "no site named: name the site whose personalized model to "
            "export, or export the global model"
        )  # fmt: skip
    if site is None and local_norm:
        raise ExportNeeds(
            "lending-site",
            f"{g.json_path}: config.personalization.local_norm is true (FedBN): "
            "the global arrays hold no normalization layers, their statistics "
            "exist only on each site; the global model needs a site to lend "
            "its norm layers",
        )
    state = None if site is None else open_site_state(g, site, state_dir)
    if state is not None:
        settle_for_export(g, state)
    site_model = global_model(g, state)
    personal, use_head = None, False
    if state is not None:
        personal, use_head = site_personal(g, site_model, global_only=global_only)
    choice = None
    if state is not None and g.options.select and not global_only:
        # the site chose its own model on its validation women: compose that
        choice = site_choice(g, state)
        model = compose_candidate(
            site_model, g.arrays, choice.choice, SelectionStore(state)
        )
        use_head = use_head and choice.choice == PERSONALIZED
    else:
        # the one composition rule (the same call builds the site's model in
        # training)
        composed = site is not None and (local_norm or not global_only)
        model = site_model.compose(
            g.arrays, personal_head=use_head, personal=personal if composed else {}
        )
    model.eval()
    std = site_standardizer(g, site_model)
    kind = "global" if global_only else "site"
    provenance = _provenance(g, site, state, kind, use_head, std is not None)
    if choice is not None:
        provenance["selection"] = choice.to_json()
    extra: dict[str, Any] = {
        EXTRA_EXPORT: provenance,
        # the sites' split (the federation's seed): evaluate scores its test women
        EXTRA_SPLIT: training_split(g.fed_cfg.seed),
    }
    if std is not None:
        extra[EXTRA_STANDARDIZER] = std.to_dict()
    path = save_checkpoint(out_path, model, g.options.model_config(), extra=extra)
    log.info(
        "exported %s model of round %d%s (head %s%s) to %s",
        kind,
        g.round,
        f", site {site}" if site else "",
        provenance["head"],
        ", standardized" if std is not None else "",
        path,
    )
    return ExportResult(path, g.round, kind, standardized=std is not None)


def _provenance(
    g: GlobalRound,
    site: str | None,
    state: SiteState | None,
    kind: str,
    personal_head: bool,
    standardized: bool,
) -> dict[str, Any]:
    """``extra["export"]``: where every part of the exported model came from."""
    cfg = g.fed_cfg
    last = None if state is None else state.read_meta().get("last_round")
    return {
        "format": EXPORT_FORMAT,
        "kind": kind,
        "run": cfg.name,
        "round": g.round,
        "round_file": str(g.json_path.resolve()),
        "site": site,
        "state_dir": str(Path(state.dir).parent.resolve()) if state else None,
        "site_last_round": None if last is None else int(last),
        "strategy": cfg.strategy.name,
        "personalization": asdict(cfg.personalization),
        "head": "personal" if personal_head else "global",
        "norm": "site" if (cfg.personalization.local_norm and site) else "global",
        "standardized": standardized,
        "trainer_options": dict(cfg.trainer.options),
        "round_metrics": g.metrics,
    }


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


def load_detector(
    checkpoint: str | Path,
    device: torch.device,
    *,
    use_ema: bool = False,
    score_floor: float | None = None,
) -> tuple[nn.Module, Checkpoint, HistogramStandardizer | None]:
    """``(model on device in eval mode, checkpoint, its standardizer)``.

    ``score_floor``, when given, replaces the model's own score threshold.

    Raises:
        CheckpointMismatch: an unusable checkpoint or standardizer field.
    """
    model, ck = load_model(checkpoint, use_ema=use_ema)
    std = checkpoint_standardizer(ck)
    prepare_model(model, device)
    if score_floor is not None:
        model.score_thresh = float(score_floor)  # type: ignore[assignment]
    return model, ck, std


def checkpoint_paths(checkpoints: str | Path | Sequence[str | Path]) -> list[Path]:
    """One checkpoint path or several, as a list of paths (in order)."""
    if isinstance(checkpoints, str | Path):
        return [Path(checkpoints)]
    return [Path(c) for c in checkpoints]


def load_detectors(
    checkpoints: str | Path | Sequence[str | Path],
    device: torch.device,
    *,
    use_ema: bool = False,
    score_floor: float | None = None,
    pairs_breasts: bool = False,
) -> list[tuple[nn.Module, Checkpoint, HistogramStandardizer | None]]:
    """:func:`load_detector` of one checkpoint or several run together.

    Models whose findings are fused must see the same model-space image.
    ``pairs_breasts``: the caller gives each image its other breast (a
    cache's ``SiteDataset(contralateral=True)``, as ``evaluate`` does); without
    it a model trained with ``model.contralateral`` is refused.

    Raises:
        CheckpointMismatch: an unusable checkpoint, none given, checkpoints
            that work at different spacings or that differ in
            ``contralateral`` or ``speck_clusters`` (both named), or a
            contralateral model where the caller cannot pair the breasts.
    """
    paths = checkpoint_paths(checkpoints)
    if not paths:
        raise CheckpointMismatch("no checkpoint given")
    loaded = [
        load_detector(c, device, use_ema=use_ema, score_floor=score_floor)
        for c in paths
    ]
    spacing = loaded[0][1].model_config.working_spacing_mm
    paired = loaded[0][1].model_config.contralateral
    specks = loaded[0][1].model_config.speck_clusters
    for c, (_, ck, _) in zip(paths, loaded, strict=True):
        if ck.model_config.contralateral != paired:
            raise CheckpointMismatch(
                f"{c}: field 'model_config.contralateral' is "
                f"{ck.model_config.contralateral}, {paths[0]}'s is {paired}: "
                "models run together must see the same images"
            )
        if ck.model_config.contralateral and not pairs_breasts:
            raise CheckpointMismatch(
                f"{c}: field 'model_config.contralateral' is true: the model "
                "reads each image beside the same woman's other breast, which "
                "only a site cache pairs (mammofed-client evaluate); predict, "
                "the DICOM node and train-local's teachers take images one by one"
            )
        if ck.model_config.speck_clusters != specks:
            raise CheckpointMismatch(
                f"{c}: field 'model_config.speck_clusters' is "
                f"{ck.model_config.speck_clusters}, {paths[0]}'s is {specks}: "
                "models run together report their clusters one way"
            )
        if ck.model_config.working_spacing_mm != spacing:
            raise CheckpointMismatch(
                f"{c}: works at {ck.model_config.working_spacing_mm} mm, "
                f"{paths[0]} at {spacing} mm: models run together must share "
                "the working spacing"
            )
    return loaded
