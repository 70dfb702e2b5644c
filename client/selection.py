"""A site's choice of its own model, on its own validation women (issue 14).

Federated personalization can make a hospital's model worse than the one it
started from (a few labeled women over-fit; docs/federation.md, "Choosing the
site's model"). With ``trainer.options.select`` a site holds some of its labeled
training women out of local training, scores every **candidate** model on them
with the project's FROC / CPM and keeps the **base** model (what it received
first) unless a candidate beats it by more than ``select_margin``.

Candidates (:data:`CANDIDATES`, in the order that breaks ties: simpler first):

=====================  ==========================================================
``base``               the model the site received first: the global shared
                       arrays of its first round (round 1: the federation's
                       initial model) + the server's personal defaults (FedBN:
                       the initial model's norm layers)
``global``             the latest global shared arrays over ``base`` (FedBN:
                       the initial model's norm layers; the global head)
``personalized``       ``global`` + the site's personal state (FedBN norm
                       layers, FedPer head): what the site trains
``base-site-stats``    ``base`` with BatchNorm running statistics re-estimated
                       on the site's training images (no labels needed;
                       ``norm: batch`` only)
``global-site-stats``  the same on ``global``; the final round only
``base-tuned``         ``base`` with its head fine-tuned on the site's training
                       labels (``select_head_epochs``; head only, every other
                       tensor frozen, as the FedPer head is tuned)
``global-tuned``       fine-tuning after federation: ``global`` with its head
                       tuned the same way; the final round only
=====================  ==========================================================

The rule (:func:`choose`): a candidate's score is the mean of its mass and
calcification CPM over the classes with a lesion among the validation women
(mass CPM breaks ties between candidates); the best candidate replaces ``base``
only when its score exceeds the base's by more than the margin. Without
validation women, or without a lesion among them, CPM is undefined and the
site keeps ``base``. So selection can pick a worse model than ``base`` only by
the noise of a small validation set.

Files under ``<state_dir>/<site>/`` (written directly, atomically; never sent)::

    base.npz                    every tensor of the base model (model keys)
    selection.json              the choice (:class:`Selection`)
    selection-<candidate>.npz   an adapted candidate's tensors (tuned head or
                                re-estimated statistics) laid over its start

``mammofed-client export`` composes the chosen model from them with
:func:`compose_candidate` (no image data needed), and the study scores each
site with it.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np

from client.state import SiteState, SiteStateError
from common.fileio import (
    atomic_write_bytes,
    load_arrays,
    read_json_document,
    save_arrays,
)
from common.keys import CLASSES, MASS

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from client.site_model import SiteModel
    from common.detector.model import Personalization

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]

BASE: Final = "base"
GLOBAL: Final = "global"
PERSONALIZED: Final = "personalized"
BASE_SITE_STATS = "base-site-stats"
GLOBAL_SITE_STATS = "global-site-stats"
BASE_TUNED = "base-tuned"
GLOBAL_TUNED = "global-tuned"

BASE_NPZ = "base.npz"
SELECTION_JSON = "selection.json"
SELECTION_FORMAT = "mammofed-selection/1"


@dataclass(frozen=True)
class Candidate:
    """How one candidate model is built.

    Attributes:
        name: the candidate's name (the choice a site records).
        start: the model it starts from: ``base``, ``global`` (latest shared
            arrays over ``base``) or ``personalized`` (``global`` + the site's
            personal state).
        adapt: what the site adapts on top, kept in ``selection-<name>.npz``:
            ``head`` (head fine-tuned on the training labels) or ``norm-stats``
            (BatchNorm statistics of the site's training images); ``""``: none.
    """

    name: str
    start: Literal["base", "global", "personalized"]
    adapt: Literal["", "head", "norm-stats"] = ""

    @property
    def final_only(self) -> bool:
        """Adapted on the latest global model: made in the final round only."""
        return bool(self.adapt) and self.start != BASE


#: Every candidate, in the order that breaks ties (simpler first); a choice's
#: index here is the ``selected-model`` metric a site may report.
CANDIDATES: tuple[Candidate, ...] = (
    Candidate(BASE, BASE),
    Candidate(GLOBAL, GLOBAL),
    Candidate(PERSONALIZED, PERSONALIZED),
    Candidate(BASE_SITE_STATS, BASE, "norm-stats"),
    Candidate(GLOBAL_SITE_STATS, GLOBAL, "norm-stats"),
    Candidate(BASE_TUNED, BASE, "head"),
    Candidate(GLOBAL_TUNED, GLOBAL, "head"),
)
BY_NAME: Mapping[str, Candidate] = {c.name: c for c in CANDIDATES}
NAMES: tuple[str, ...] = tuple(BY_NAME)


def candidate_index(name: str) -> int:
    """Position of ``name`` in :data:`CANDIDATES` (the ``selected-model`` value)."""
    return NAMES.index(name)


def parse_candidates(text: str) -> tuple[str, ...]:
    """``"global,personalized"`` -> candidate names (``""``: every candidate).

    ``base`` is always a candidate (the rule keeps it unless beaten).

    Raises:
        ValueError: an unknown or repeated name, quoting it and the valid ones.
    """
    if not text.strip():
        return NAMES
    names = [n.strip() for n in text.split(",")]
    for n in names:
        if n not in BY_NAME:
            raise ValueError(
                f"unknown candidate {n!r} in {text!r} (valid: {', '.join(NAMES)})"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"a candidate is named twice in {text!r}")
    return tuple(n for n in NAMES if n == BASE or n in names)


def applicable(
    names: Sequence[str],
    personalization: Personalization,
    *,
    batch_norm: bool,
    head_epochs: int,
) -> tuple[tuple[str, ...], dict[str, str]]:
    """``(names this run can build, {name left out: why})``.

    ``personalized`` needs FedBN or FedPer; ``*-site-stats`` a BatchNorm
    model; ``*-tuned`` ``head_epochs > 0``.
    """
    why: dict[str, str] = {}
    for n in names:
        c = BY_NAME[n]
        if c.start == PERSONALIZED and not (
            personalization.local_norm or personalization.personal_head
        ):
            why[n] = "the run keeps no personal state (personalization is off)"
        elif c.adapt == "norm-stats" and not batch_norm:
            why[n] = "the model has no BatchNorm layer (trainer.options.norm)"
        elif c.adapt == "head" and head_epochs == 0:
            why[n] = "trainer.options.select_head_epochs is 0"
    return tuple(n for n in names if n not in why), why


# --- the validation women ---------------------------------------------------------
def validation_women(
    women: Mapping[str, bool], fraction: float, seed: int
) -> frozenset[str]:
    """The labeled training women a site holds out to choose its model.

    ``women``: ``{patient_id: has a lesion}`` of the site's labeled training
    women. They are drawn per stratum (with / without a lesion) by the rule of
    the site's test split (:func:`common.imaging.data.patient_split`: a
    ``fraction`` of each stratum, rounded, at least one of a stratum of two or
    more, never a whole stratum). When that draws nobody and there are at least
    two women, one is drawn, with a lesion when any has one (a validation set
    without a lesion cannot score CPM). Fewer than two women: none is held
    out (and the site keeps ``base``). Deterministic in ``seed``.
    """
    from common.imaging.data import patient_split

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction!r}")
    if len(women) < 2:
        return frozenset()
    split = patient_split(
        {p: (True, lesion) for p, lesion in women.items()}, fraction, seed
    )
    held = frozenset(p for p, s in split.items() if s == "test")
    if held:
        return held
    pool = sorted(p for p, lesion in women.items() if lesion) or sorted(women)
    rng = np.random.default_rng(seed)
    return frozenset({pool[int(rng.integers(len(pool)))]})


# --- the record ---------------------------------------------------------------------
@dataclass(frozen=True)
class Score:
    """A candidate's CPM per class on the validation women (``None``: no lesion)."""

    cpm: dict[str, float | None]

    @property
    def value(self) -> float | None:
        """Mean CPM over the classes with a lesion; ``None`` when none has one."""
        defined = [v for v in self.cpm.values() if v is not None]
        return float(np.mean(defined)) if defined else None

    def key(self) -> tuple[float, float]:
        """Ranking key: the value, then mass CPM (``-inf`` when undefined)."""
        value, mass = self.value, self.cpm.get(MASS)
        return (
            -math.inf if value is None else value,
            -math.inf if mass is None else mass,
        )


def choose(
    scores: Mapping[str, Score], margin: float, order: Sequence[str] = NAMES
) -> tuple[str, str]:
    """The conservative rule: ``(choice, reason)``.

    ``base`` is kept unless the best other candidate (by :meth:`Score.key`,
    earlier in ``order`` among equals) scores more than ``margin`` above it.
    """
    base = scores.get(BASE)
    if base is None or base.value is None:
        return BASE, "no lesion among the validation women: CPM undefined, base kept"
    others = [n for n in order if n != BASE and n in scores]
    if not others:
        return BASE, "no other candidate"
    rank = {n: i for i, n in enumerate(order)}
    best = max(others, key=lambda n: (*scores[n].key(), -rank[n]))
    b, v = base.value, scores[best].value
    if v is not None and v > b + margin + 1e-12:
        return best, f"{best} {v:.3f} > base {b:.3f} + margin {margin:g}"
    shown = "undefined" if v is None else f"{v:.3f}"
    return BASE, f"best other {best} {shown} <= base {b:.3f} + margin {margin:g}"


def _bad(path: Path, field_name: str, value: Any, why: str) -> SiteStateError:
    return SiteStateError(f"{path}: field {field_name!r} is {value!r}: {why}")


def _cpm_value(path: Path, where: str, v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _bad(path, where, v, "must be a number or null")
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise _bad(path, where, v, "must be a CPM in [0, 1]")
    return float(v)


@dataclass(frozen=True)
class Selection:
    """``selection.json``: what a site chose, on which arrays, and why.

    Attributes:
        round: the server round of the global arrays it chose on.
        choice: a name of :data:`CANDIDATES`.
        reason: the rule's one-line reason.
        margin: the margin the rule used.
        shared_sha256: :func:`arrays_sha256` of those global shared arrays.
        scores: ``{candidate: Score}`` on the validation women.
        validation: ``{"women", "images", "<class>-lesions"}`` counts.
        base_sha256: :func:`arrays_sha256` of the base model it scored.
        validation_sha256: digest of the validation images' cache keys. The
            scores of the candidates built on ``base`` are reused while both
            digests stay the same.
    """

    round: int
    choice: str
    reason: str
    margin: float
    shared_sha256: str
    scores: dict[str, Score] = field(default_factory=dict)
    validation: dict[str, int] = field(default_factory=dict)
    base_sha256: str = ""
    validation_sha256: str = ""

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``selection.json``."""
        return {
            "format": SELECTION_FORMAT,
            "round": self.round,
            "choice": self.choice,
            "reason": self.reason,
            "margin": self.margin,
            "shared_sha256": self.shared_sha256,
            "scores": {n: {**s.cpm, "score": s.value} for n, s in self.scores.items()},
            "validation": dict(self.validation),
            "base_sha256": self.base_sha256,
            "validation_sha256": self.validation_sha256,
        }

    @classmethod
    def read(cls, path: Path) -> Selection:
        """Read and check a ``selection.json``.

        Raises:
            SiteStateError: unreadable, another format, or a field of the
                wrong kind (an unknown choice, a score outside [0, 1], ...),
                naming the file, the field and the value.
        """
        d = read_json_document(
            path, "site model choice", SiteStateError, format_id=SELECTION_FORMAT
        )
        choice = d.get("choice")
        if not isinstance(choice, str) or choice not in BY_NAME:
            raise _bad(path, "choice", choice, f"not a candidate ({', '.join(NAMES)})")
        rnd = d.get("round")
        if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
            raise _bad(path, "round", rnd, "must be an integer >= 0")
        margin = d.get("margin")
        if (
            isinstance(margin, bool)
            or not isinstance(margin, int | float)
            or not math.isfinite(margin)
            or margin < 0
        ):
            raise _bad(path, "margin", margin, "must be a finite number >= 0")
        digests = {
            k: _sha256_field(path, d, k, required=k == "shared_sha256")
            for k in ("shared_sha256", "base_sha256", "validation_sha256")
        }
        reason = d.get("reason", "")
        if not isinstance(reason, str):
            raise _bad(path, "reason", reason, "must be a string")
        raw_scores = d.get("scores", {})
        if not isinstance(raw_scores, dict):
            raise _bad(path, "scores", raw_scores, "must be an object")
        scores: dict[str, Score] = {}
        for name, s in raw_scores.items():
            if name not in BY_NAME:
                raise _bad(path, "scores", name, "names no candidate")
            if not isinstance(s, dict):
                raise _bad(path, f"scores.{name}", s, "must be an object")
            scores[name] = Score(
                {c: _cpm_value(path, f"scores.{name}.{c}", s.get(c)) for c in CLASSES}
            )
        raw_val = d.get("validation", {})
        if not isinstance(raw_val, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for v in raw_val.values()
        ):
            raise _bad(path, "validation", raw_val, "must map names to counts")
        return cls(
            round=rnd,
            choice=choice,
            reason=reason,
            margin=float(margin),
            shared_sha256=digests["shared_sha256"],
            scores=scores,
            validation=dict(raw_val),
            base_sha256=digests["base_sha256"],
            validation_sha256=digests["validation_sha256"],
        )


def _sha256_field(path: Path, d: Mapping[str, Any], key: str, *, required: bool) -> str:
    """A SHA-256 hex digest field (``""`` allowed when not ``required``)."""
    v = d.get(key, "")
    if not required and v == "":
        return ""
    if not (
        isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)
    ):
        raise _bad(path, key, v, "must be 64 hex digits")
    return v


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """Digest of named arrays (names, dtypes, shapes and bytes, name order)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# --- files ----------------------------------------------------------------------
class SelectionStore:
    """The selection's files in a site's state folder (see the module docstring)."""

    def __init__(self, state: SiteState) -> None:
        self.state = state
        self.base_path = state.dir / BASE_NPZ
        self.selection_path = state.dir / SELECTION_JSON

    def adapted_path(self, name: str) -> Path:
        """``selection-<name>.npz``: what candidate ``name`` lays over its start."""
        if name not in BY_NAME:
            raise ValueError(f"unknown candidate {name!r} (valid: {', '.join(NAMES)})")
        return self.state.dir / f"selection-{name}.npz"

    def _load(self, path: Path, what: str) -> Arrays | None:
        if not path.is_file():
            return None
        try:
            return load_arrays(path)
        except (OSError, ValueError) as exc:
            raise SiteStateError(f"{path}: unreadable {what}: {exc}") from exc

    def save_base(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Keep the base model; adapted base candidates made before are dropped."""
        save_arrays(self.base_path, arrays)
        for c in CANDIDATES:
            if c.start == BASE and c.adapt:
                self.adapted_path(c.name).unlink(missing_ok=True)

    def load_base(self) -> Arrays | None:
        """The base model's tensors, or ``None`` when none was kept yet."""
        return self._load(self.base_path, "base model")

    def save_adapted(self, name: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Keep what candidate ``name`` lays over its start."""
        save_arrays(self.adapted_path(name), arrays)

    def load_adapted(self, name: str) -> Arrays | None:
        """What candidate ``name`` lays over its start (``None``: not made yet)."""
        return self._load(self.adapted_path(name), f"{name} candidate")

    def write(self, selection: Selection) -> None:
        """Atomically replace ``selection.json``."""
        import json

        payload = json.dumps(selection.to_json(), indent=2, sort_keys=True)
        atomic_write_bytes(self.selection_path, payload.encode())

    def read(self) -> Selection | None:
        """The recorded choice (``None`` when the site never chose)."""
        if not self.selection_path.is_file():
            return None
        return Selection.read(self.selection_path)


# --- composing ------------------------------------------------------------------
def compose_candidate(
    site_model: SiteModel,
    shared: Mapping[str, np.ndarray],
    name: str,
    store: SelectionStore,
) -> nn.Module:
    """Load candidate ``name`` into ``site_model.model`` (the one rule for each).

    Used when the site scores candidates, evaluates its chosen model, and when
    ``mammofed-client export`` writes it.

    Raises:
        SiteStateError: the base model or the candidate's adapted tensors are
            not in the state folder (file named).
        CheckpointMismatch: stored tensors that do not fit the model.
    """
    c = BY_NAME[name]
    base = store.load_base()
    if base is None:
        raise SiteStateError(
            f"{store.base_path}: does not exist: the site kept no base model "
            "(it never took part in a round with trainer.options.select on)"
        )
    site_model.load_arrays(base, store.base_path, complete=True)
    if c.start != BASE:
        site_model.load_arrays(shared, "the global shared arrays")
    if c.start == PERSONALIZED:
        site_model.compose(shared)
    if c.adapt:
        extra = store.load_adapted(name)
        if extra is None:
            raise SiteStateError(
                f"{store.adapted_path(name)}: does not exist: candidate {name!r} "
                "was never made on this site"
            )
        site_model.load_arrays(extra, store.adapted_path(name))
    return site_model.model


def reestimate_norm_stats(
    model: nn.Module, images: Dataset[Any], device: torch.device
) -> Arrays:
    """Re-estimate every BatchNorm layer's running statistics on ``images``.

    The model runs in inference mode, one image at a time, with its BatchNorm
    layers collecting a cumulative average (``momentum=None``) from fresh
    statistics; no label is read and no weight changes. Returns the new
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` tensors
    (model keys); the layers keep them.
    """
    import torch
    from torch import nn

    bns = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    n = len(images)  # type: ignore[arg-type]
    if not bns or n == 0:
        return {}
    momenta = {name: m.momentum for name, m in bns.items()}
    model.to(device).eval()
    for m in bns.values():
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad():
            for i in range(n):
                image, _ = images[i]
                model([image.to(device)])
    finally:
        for name, m in bns.items():
            m.momentum = momenta[name]
        model.eval()
    sd = model.state_dict()
    return {
        k: sd[k].detach().cpu().numpy().copy()
        for name in bns
        for k in (
            f"{name}.running_mean",
            f"{name}.running_var",
            f"{name}.num_batches_tracked",
        )  # fmt: skip
    }


# --- choosing ---------------------------------------------------------------------
@dataclass(frozen=True)
class SelectSettings:
    """How a site chooses (``trainer.options.select_*``, validated there).

    Attributes:
        fraction: share of labeled training women held out (per stratum).
        margin: CPM a candidate must beat ``base`` by.
        candidates: the candidate names this run can build (``base`` first).
        head_epochs: epochs of head tuning of the ``*-tuned`` candidates.
        final_round: the run's last round (``*-global`` adapted candidates are
            made from then on).
    """

    fraction: float
    margin: float
    candidates: tuple[str, ...]
    head_epochs: int
    final_round: int


#: ``evaluate(model, view) -> {class: CPM}`` (NaN: no lesion of the class)
EvaluateFn = Callable[["nn.Module", "Dataset[Any]"], Mapping[str, float]]


class Selector:
    """Makes, records and applies one site's choice.

    The trainer gives it the data and the training it needs:

    Args:
        site_model: the site's model (candidates are composed into it).
        store: the site's selection files.
        settings: the options.
        validation: the validation women's labeled images (may be empty).
        train_images: the site's training images (no labels read) for
            re-estimated statistics.
        evaluate: scores a model on a view (see :data:`EvaluateFn`).
        tune_head: fine-tunes the head of ``site_model.model`` as loaded on
            the training labels; returns the head tensors (model keys).
        device: where the model runs.
    """

    def __init__(
        self,
        site_model: SiteModel,
        store: SelectionStore,
        settings: SelectSettings,
        *,
        validation: Dataset[Any],
        train_images: Dataset[Any],
        evaluate: EvaluateFn,
        tune_head: Callable[[], Arrays],
        device: torch.device,
    ) -> None:
        self.site_model = site_model
        self.store = store
        self.settings = settings
        self.validation = validation
        self.train_images = train_images
        self.evaluate = evaluate
        self.tune_head = tune_head
        self.device = device

    def remember_base(
        self,
        fresh: Callable[[], Mapping[str, np.ndarray]],
        shared: Mapping[str, np.ndarray],
        *,
        first_round: bool,
    ) -> None:
        """Keep ``fresh()`` + the server's personal defaults + ``shared`` as ``base``.

        ``fresh()``: every tensor of a freshly built model (what neither the
        server's arrays nor its defaults hold, e.g. FedBN norm layers when no
        defaults come). Written when no base is kept yet, or at a run's first
        round (a new run in the same state folder starts a new base).
        """
        if not first_round and self.store.base_path.is_file():
            return
        base = {
            **{k: np.asarray(v) for k, v in fresh().items()},
            **self.site_model.defaults,
            **{k: np.asarray(v) for k, v in shared.items()},
        }
        self.store.save_base(base)
        log.info(
            "site %s: base model kept (%d tensors)", self.store.state.site, len(base)
        )

    def compose(self, shared: Mapping[str, np.ndarray], name: str) -> nn.Module:
        """Candidate ``name`` in the site model, on the device, in eval mode."""
        model = compose_candidate(self.site_model, shared, name, self.store)
        return model.to(self.device).eval()

    def _adapt(self, shared: Mapping[str, np.ndarray], c: Candidate) -> None:
        """Make ``c``'s adapted tensors (from its start) and keep them."""
        model = self.compose(shared, c.start)
        if c.adapt == "head":
            arrays = self.tune_head()
        else:
            arrays = reestimate_norm_stats(model, self.train_images, self.device)
        self.store.save_adapted(c.name, arrays)
        log.info("site %s: candidate %s made", self.store.state.site, c.name)

    def select(
        self, shared: Mapping[str, np.ndarray], server_round: int | None
    ) -> Selection:
        """Score the candidates on the validation women and record the choice.

        A choice already recorded for the same arrays (and ``server_round``,
        when given) is returned as it is; ``None`` takes new arrays for the
        final round's. Adapted candidates of ``base`` are made once; those of
        the latest global model only from the final round on.
        """
        from common.imaging.data import item_targets

        digest = arrays_sha256(shared)
        base = self.store.load_base()
        base_digest = "" if base is None else arrays_sha256(base)
        targets = item_targets(self.validation)
        keys = hashlib.sha256(
            "\n".join(sorted(str(t["key"]) for t in targets)).encode()
        )
        val_digest = keys.hexdigest()
        old = self.store.read()
        same_base = (
            old is not None
            and old.base_sha256 == base_digest
            and old.validation_sha256 == val_digest
        )
        if (
            old is not None
            and same_base
            and old.shared_sha256 == digest
            and server_round in (None, old.round)
        ):
            return old
        if server_round is None:
            server_round = self.settings.final_round
        final = server_round >= self.settings.final_round
        names = [
            n for n in self.settings.candidates if final or not BY_NAME[n].final_only
        ]
        n_val = len(targets)
        scores: dict[str, Score] = {}
        counts: dict[str, int] = {"images": n_val}
        if n_val:
            counts["women"] = len({str(t["patient_id"]) for t in targets})
            for cls in CLASSES:
                label = CLASSES.index(cls)
                counts[f"{cls}-lesions"] = sum(
                    int((np.asarray(t["labels"]) == label).sum()) for t in targets
                )
            for name in names:
                c = BY_NAME[name]
                adapted = not c.adapt or self.store.adapted_path(name).is_file()
                if (
                    old is not None
                    and same_base
                    and c.start == BASE
                    and adapted
                    and name in old.scores
                ):
                    # built on the base alone: the same model as last time
                    scores[name] = old.scores[name]
                    continue
                if not adapted or c.final_only:
                    self._adapt(shared, c)
                per_class = self.evaluate(self.compose(shared, name), self.validation)
                scores[name] = Score(
                    {
                        cls: None if math.isnan(cpm) else float(cpm)
                        for cls, cpm in per_class.items()
                    }
                )
            choice, reason = choose(scores, self.settings.margin)
        else:
            counts["women"] = 0
            choice, reason = BASE, "no validation women (fewer than two labeled)"
        sel = Selection(
            round=int(server_round),
            choice=choice,
            reason=reason,
            margin=self.settings.margin,
            shared_sha256=digest,
            scores=scores,
            validation=counts,
            base_sha256=base_digest,
            validation_sha256=val_digest,
        )
        self.store.write(sel)
        log.info(
            "site %s round %d: chose %s (%s); validation %s",
            self.store.state.site,
            server_round,
            choice,
            reason,
            counts,
        )
        return sel


__all__ = [
    "BASE",
    "CANDIDATES",
    "Candidate",
    "SelectSettings",
    "Selection",
    "SelectionStore",
    "Selector",
    "choose",
    "compose_candidate",
    "validation_women",
]
