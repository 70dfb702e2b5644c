"""What the federation's two sides agree on: config schema, record keys, metrics.

Both ``server/`` and ``client/`` import this module; neither imports the other.

* :class:`FederationConfig` is the typed form of ``configs/federation/*.yaml``
  (frozen dataclasses, validated by :func:`common.config.load_config`).
* Run-config and node-config keys (what ``flwr run --run-config`` and
  ``flower-supernode --node-config`` carry) are constants here.
* :class:`FitInstructions` is the typed form of the ``ConfigRecord`` the server
  sends with every train/evaluate message.
* :data:`METRIC_WHITELIST` is the only set of metric names a site may send.
* :func:`arrays_to_record` / :func:`record_to_arrays` convert between
  ``dict[str, numpy.ndarray]`` and Flower's ``ArrayRecord``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

from common.config.loader import (
    bounded,
    check_bounds,
    check_plain_name,
    from_mapping,
    load_config,
    load_yaml,
    path_field,
)
from common.errors import ConfigError, shown
from common.keys import (
    CPM_CALCIFICATION,
    CPM_MASS,
    CPM_MEAN,
    DP_EPSILON,
    LOCAL_EPOCHS,
    NUM_EXAMPLES,
    PROXIMAL_MU,
    SERVER_ROUND,
    SKIPPED_STEPS,
    TRAIN_LOSS,
)

if TYPE_CHECKING:  # Flower is imported where records are built, not at import
    from flwr.app import Array, ArrayRecord, ConfigRecord

# --- metric names only the federation uses --------------------------------
EVAL_LOSS = "eval-loss"
ACCURACY = "accuracy"
#: Evaluate metric of a site that chooses its own model (``trainer.options.
#: select``): the index of its choice in ``client.selection.CANDIDATES``, a
#: small integer that names no image, woman or file.
SELECTED_MODEL = "selected-model"

#: Every scalar metric name a site may put in a reply's MetricRecord. A reply
#: with any other name is refused by the client guard and dropped by the server.
METRIC_WHITELIST: frozenset[str] = frozenset(
    {
        NUM_EXAMPLES,
        TRAIN_LOSS,
        SKIPPED_STEPS,
        EVAL_LOSS,
        ACCURACY,
        CPM_MASS,
        CPM_CALCIFICATION,
        CPM_MEAN,
        DP_EPSILON,
        SELECTED_MODEL,
    }
)

#: The values each whitelisted metric can take, ``[low, high]``: a CPM or an
#: accuracy is a fraction, a loss, a count or an epsilon is not negative, a
#: chosen model is a small index. A site's value outside is refused by its
#: guard and the server (:func:`metric_fault`): one site's 1e308 would set the
#: federation's reported figure, and its weighted sum overflow to Infinity.
METRIC_RANGES: Mapping[str, tuple[float, float]] = {
    NUM_EXAMPLES: (0, 2**31 - 1),
    TRAIN_LOSS: (0.0, 1e6),
    SKIPPED_STEPS: (0, 1e9),
    EVAL_LOSS: (0.0, 1e6),
    ACCURACY: (0.0, 1.0),
    CPM_MASS: (0.0, 1.0),
    CPM_CALCIFICATION: (0.0, 1.0),
    CPM_MEAN: (0.0, 1.0),
    DP_EPSILON: (0.0, 1e9),
    SELECTED_MODEL: (0, 1000),
}


def metric_fault(name: str, value: object) -> str | None:
    """The one rule for a metric a site sends: ``None``, or why it is refused.

    Whitelisted name (:data:`METRIC_WHITELIST`), a finite int or float (not a
    bool, not a list) inside :data:`METRIC_RANGES`.
    """
    if name not in METRIC_WHITELIST:
        return f"metric {name!r} is not whitelisted"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"metric {name!r} is not a scalar: {shown(value)}"
    if not math.isfinite(value):
        return f"metric {name!r} is not finite: {value!r}"
    low, high = METRIC_RANGES[name]
    if not low <= value <= high:
        return f"metric {name!r} = {value:.6g} is outside [{low:g}, {high:g}]"
    return None


# --- ConfigRecord keys (server -> client instructions) ---------------------
LEARNING_RATE = "learning-rate"
BATCH_SIZE = "batch-size"
LOCAL_NORM = "local-norm"
PERSONAL_HEAD = "personal-head"
TRAINER = "trainer"

# --- run config keys ([tool.flwr.app.config], `flwr run --run-config`) ------
RUN_FEDERATION_CONFIG = "federation-config"
RUN_FEDERATION_JSON = "federation-json"
RUN_DIR = "run-dir"

# --- node config keys (`flower-supernode --node-config`) ------------------
NODE_SITE_CONFIG = "site-config"
NODE_SITE = "site"
NODE_DATA_DIR = "data-dir"
NODE_STATE_DIR = "state-dir"
PARTITION_ID = "partition-id"


def round_problems(row: Mapping[str, Any], *, rejected: bool = True) -> list[str]:
    """One line per node that failed (train or evaluate) in a ``rounds.jsonl`` row.

    ``"round R PHASE node N (CHECK): REASON"``; with ``rejected`` also the
    train updates the server's validation dropped; sampled nodes that never
    replied read ``(silent)``. Missing sections are empty.
    """
    kinds = [(phase, "failed") for phase in ("train", "evaluate")]
    if rejected:
        kinds.append(("train", "rejected"))
    lines = [
        f"round {row.get('round')} {phase} node {f.get('node')} "
        f"({f.get('check')}): {f.get('reason')}"
        for phase, kind in kinds
        for f in (row.get(phase) or {}).get(kind) or []
    ]
    return lines + [
        f"round {row.get('round')} {phase} node {node} (silent): no reply before "
        "the round timeout"
        for phase in ("train", "evaluate")
        for node in (row.get(phase) or {}).get("silent") or []
    ]


@dataclass(frozen=True)
class PersonalizationConfig:
    """Which state each site keeps to itself (alias ``detector.model.Personalization``).

    Attributes:
        local_norm: FedBN: normalization layers (weights and running
            statistics) stay on the site and are never sent.
        personal_head: FedPer: the site keeps a personal copy of the prediction
            head; the global head is still shared and aggregated.
    """

    local_norm: bool = False
    personal_head: bool = False


@dataclass(frozen=True)
class StrategyConfig:
    """Server strategy choice (registry name in ``server.strategies``).

    Attributes:
        name: ``fedavg``, ``fedprox``, ``personalized``, or a robust aggregator:
            ``fedmedian`` (coordinate-wise median) or ``fedtrimmedavg``
            (coordinate-wise trimmed mean); the robust ones work with or
            without personalization (they aggregate the shared arrays only);
            or a server optimizer over FedAvg: ``fedavgm``, ``fedadam`` (any
            personalization; docs/federation.md, "Server optimizers").
        proximal_mu: FedProx proximal weight (sent to clients; they apply it).
            Only ``fedprox`` takes one: another strategy with a weight above 0
            is refused (the sites would silently train as FedProx).
        trim_beta: ``fedtrimmedavg`` cuts ``floor(trim_beta * n)`` of the ``n``
            values at each end of every coordinate; the default 0.34 cuts one
            of 3 or 4 updates, two of 6 (0.2, Flower's default, cuts none below
            5 updates).
        server_learning_rate, server_momentum: ``fedavgm`` (Hsu et al. 2019):
            ``m_t = server_momentum * m_{t-1} + (avg_t - x_t)``, ``x_{t+1} =
            x_t + server_learning_rate * m_t``; momentum 0 and rate 1 is FedAvg.
        eta, beta_1, beta_2, tau: ``fedadam`` (Reddi et al. 2021, Flower's
            ``FedAdam``): server step size, first and second moment decay, and
            the adaptivity floor added to ``sqrt(v_t)``. The client learning
            rate (Flower's ``eta_l``) is ``trainer.learning_rate``. A ``tau``
            far below the default (Flower's 1e-9) lets Adam amplify float32
            rounding in the average into steps of about ``eta`` per
            coordinate even when no site moved; keep it near 1e-3.
    """

    name: str = "fedavg"
    proximal_mu: float = field(default=0.0, metadata=bounded(0.0, None))
    trim_beta: float = field(default=0.34, metadata=bounded(0.0, 0.49))
    server_learning_rate: float = field(default=1.0, metadata=bounded(1e-6, 10.0))
    server_momentum: float = field(default=0.7, metadata=bounded(0.0, 0.999))
    eta: float = field(default=0.03, metadata=bounded(1e-6, 10.0))
    beta_1: float = field(default=0.9, metadata=bounded(0.0, 0.9999))
    beta_2: float = field(default=0.99, metadata=bounded(0.0, 0.99999))
    tau: float = field(default=1e-3, metadata=bounded(1e-9, 1.0))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name}: must be finite, got {value!r}")
        if self.proximal_mu > 0 and self.name != "fedprox":
            raise ValueError(
                f"proximal_mu: {self.proximal_mu!r}, but only fedprox takes a "
                f"proximal term (strategy {self.name!r}); set it to 0 or use fedprox"
            )


@dataclass(frozen=True)
class ParticipationConfig:
    """Who takes part in a round, and how long anyone waits.

    Attributes:
        fraction_train: fraction of connected nodes sampled for training.
        fraction_evaluate: fraction sampled for evaluation (0 skips it).
        min_train_nodes: at least this many nodes are sampled for training.
        min_evaluate_nodes: at least this many for evaluation.
        min_available_nodes: a round starts only when this many are connected.
        wait_for_nodes_s: longest wait for ``min_available_nodes`` per round;
            after it the round is skipped (previous global kept). Never infinite.
        round_timeout_s: longest wait for replies in one phase of a round.
        min_valid_updates: a round with fewer valid updates keeps the previous
            global model.
        evaluate_every: federated evaluation in every N-th round and always in
            the last one (1: every round). Evaluation scores each site's test
            women, so a study with large test sets sets it higher; the final
            models are scored either way.
    """

    fraction_train: float = field(default=1.0, metadata=bounded(0.0, 1.0))
    fraction_evaluate: float = field(default=1.0, metadata=bounded(0.0, 1.0))
    min_train_nodes: int = field(default=2, metadata=bounded(1, None))
    min_evaluate_nodes: int = field(default=1, metadata=bounded(0, None))
    min_available_nodes: int = field(default=2, metadata=bounded(1, None))
    wait_for_nodes_s: float = field(default=120.0, metadata=bounded(0.0, 86400.0))
    round_timeout_s: float = field(default=600.0, metadata=bounded(1.0, 86400.0))
    min_valid_updates: int = field(default=1, metadata=bounded(1, None))
    evaluate_every: int = field(default=1, metadata=bounded(1, 100_000))

    def evaluates(self, server_round: int, num_rounds: int) -> bool:
        """Whether ``server_round`` of ``num_rounds`` runs federated evaluation."""
        return server_round % self.evaluate_every == 0 or server_round >= num_rounds


@dataclass(frozen=True)
class ValidationConfig:
    """Checks every update passes before aggregation (``server.validation``).

    Attributes:
        max_relative_update_norm: ``||w_site - w_global|| / max(||w_global||,
            eps)`` over all shared arrays must not exceed this.
        max_abs_value: no array value may exceed this in magnitude.
        max_num_examples: a reply claiming more examples is dropped (an
            inflated weight would let one site dominate the average).
        clip_factor: robust aggregation: every accepted update whose delta
            ``||w_site - w_global||_2`` (all shared arrays) exceeds
            ``clip_factor x`` the round's lower median of the valid updates'
            delta norms (the smallest nonzero norm when that median is 0) is
            scaled down to that bound (``0`` turns clipping off).
        cap_num_examples: robust aggregation: a node's ``num-examples`` is
            capped at what it declared in its first accepted train reply of the
            run (trust on first use; see docs/federation.md).
    """

    max_relative_update_norm: float = field(default=5.0, metadata=bounded(1e-9, None))
    max_abs_value: float = field(default=1e6, metadata=bounded(1e-9, None))
    max_num_examples: int = field(default=10_000_000, metadata=bounded(1, None))
    clip_factor: float = field(default=2.0, metadata=bounded(0.0, None))
    cap_num_examples: bool = True


@dataclass(frozen=True)
class TrainerConfig:
    """Local training settings sent to sites each round.

    Attributes:
        name: registry name in ``client.trainer.TRAINERS`` (``toy``, ...).
        local_epochs: epochs per round on each site.
        learning_rate: local optimizer step size.
        batch_size: local batch size.
        lr_schedule: how the server changes the learning rate it sends over
            the rounds: ``constant`` (every round ``learning_rate``) or
            ``cosine`` (``learning_rate`` in round 1, falling along a half
            cosine to ``lr_min_factor * learning_rate`` in the last round,
            ``num_rounds``). The round number counts across resumes, so a
            resumed run continues the same schedule.
        lr_min_factor: the last round's fraction of ``learning_rate`` under
            ``cosine``.
        options: trainer-specific settings (scalars only), e.g. the toy
            trainer's ``num_examples``.
    """

    name: str = "toy"
    local_epochs: int = field(default=1, metadata=bounded(1, 1000))
    learning_rate: float = field(default=0.05, metadata=bounded(0.0, 10.0))
    batch_size: int = field(default=16, metadata=bounded(1, 4096))
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_min_factor: float = field(default=0.1, metadata=bounded(0.0, 1.0))
    options: dict[str, Any] = field(default_factory=dict)

    def round_learning_rate(self, server_round: int, num_rounds: int) -> float:
        """The learning rate the server sends in ``server_round`` (from 1).

        ``constant``: ``learning_rate``. ``cosine``: ``learning_rate * (m + (1
        - m) * (1 + cos(pi * t)) / 2)`` with ``m = lr_min_factor`` and ``t =
        (server_round - 1) / (num_rounds - 1)`` clipped to [0, 1] (a round past
        ``num_rounds`` keeps the last rate; one round: ``learning_rate``).
        """
        if self.lr_schedule == "constant" or num_rounds <= 1:
            return self.learning_rate
        t = min(max((server_round - 1) / (num_rounds - 1), 0.0), 1.0)
        m = self.lr_min_factor
        return self.learning_rate * (m + (1.0 - m) * (1.0 + math.cos(math.pi * t)) / 2)


@dataclass(frozen=True)
class FederationConfig:
    """One federated run (``configs/federation/*.yaml``).

    Attributes:
        name: run name (default run directory ``runs/<name>``).
        num_rounds: total rounds, counted across resumes.
        seed: seed of model initialization and node sampling.
        strategy, participation, validation, trainer, personalization: see
            the nested classes.
        sites: simulation only: ``partition-id`` ``i`` plays ``sites[i]``.
        state_dir: where sites keep their state when their node config names
            none (simulation and tests); ``<state_dir>/<site>/``.
        run_dir: where the server writes checkpoints and ``rounds.jsonl``.
        resume: continue from the last checkpoint in ``run_dir`` if present.
        keep_checkpoints: 0 keeps every round's checkpoint; ``N`` >= 2 keeps
            round 0 (the initial model) and the ``N`` newest, so a long run's
            disk use is bounded. At least 2, so that a resume still has an
            older round when the newest will not load.
        initial_arrays: optional ``.npz`` of initial shared arrays (names and
            shapes must equal the model's shared arrays).
        initial_checkpoint: optional detector checkpoint
            (:mod:`common.detector.checkpoint`) whose weights start the run; its model
            config must match ``trainer.options``. Without either, the server
            builds the model from ``trainer`` with ``seed``; a node never
            supplies the initial model.
    """

    name: str = "demo"
    num_rounds: int = field(default=3, metadata=bounded(1, 100_000))
    seed: int = 0
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    participation: ParticipationConfig = field(default_factory=ParticipationConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    personalization: PersonalizationConfig = field(
        default_factory=PersonalizationConfig
    )
    sites: tuple[str, ...] = ()
    state_dir: Path | None = field(default=None, metadata=path_field(False))
    run_dir: Path | None = field(default=None, metadata=path_field(False))
    resume: bool = True
    keep_checkpoints: int = field(default=0, metadata=bounded(0, 1_000_000))
    initial_arrays: Path | None = field(default=None, metadata=path_field(True))
    initial_checkpoint: Path | None = field(default=None, metadata=path_field(True))

    def __post_init__(self) -> None:
        if self.initial_arrays is not None and self.initial_checkpoint is not None:
            raise ValueError(
                "initial_checkpoint: set initial_arrays or initial_checkpoint, not "
                f"both (got {str(self.initial_checkpoint)!r} and "
                f"{str(self.initial_arrays)!r})"
            )
        if self.keep_checkpoints == 1:
            raise ValueError(
                "keep_checkpoints: 0 (every round) or at least 2, so that a "
                "resume has an older round when the newest will not load; got 1"
            )
        # the run's and each site's name become folder names (runs/, state)
        for key, name in (("name", self.name), *(
            (f"sites[{i}]", site) for i, site in enumerate(self.sites)
        )):  # fmt: skip
            try:
                check_plain_name(name)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        if len(set(self.sites)) != len(self.sites):
            raise ValueError(f"sites: names must be unique, got {list(self.sites)!r}")
        p = self.participation
        if p.min_train_nodes > p.min_available_nodes:
            raise ValueError(
                "participation.min_train_nodes: must be <= min_available_nodes "
                f"({p.min_available_nodes}), got {p.min_train_nodes!r}"
            )
        if p.min_valid_updates > p.min_train_nodes:
            raise ValueError(
                "participation.min_valid_updates: must be <= min_train_nodes "
                f"({p.min_train_nodes}), got {p.min_valid_updates!r}"
            )
        for key, value in self.trainer.options.items():
            if not isinstance(value, int | float | str | bool):
                raise ValueError(
                    f"trainer.options.{key}: must be a scalar, got {value!r}"
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(
                    f"trainer.options.{key}: must be a finite number, got {value!r}"
                )


def load_federation_config(path: str | Path) -> FederationConfig:
    """Load and validate a federation YAML (errors name file, key and value)."""
    return load_config(path, FederationConfig)


#: Fields only the server reads (round 0's model); a site never looks at them.
SERVER_ONLY_PATHS: tuple[str, ...] = ("initial_arrays", "initial_checkpoint")


def _site_view(data: Any) -> Any:
    """``data`` without :data:`SERVER_ONLY_PATHS` (a mapping; else as it is).

    They must exist where loaded; checked on a site, a run naming any path
    would learn from the reply whether it exists on the site's disk.
    """
    if not isinstance(data, Mapping):
        return data
    return {k: v for k, v in data.items() if k not in SERVER_ONLY_PATHS}


def federation_config_from_run_config(
    run_config: Mapping[str, Any], app_root: Path, *, site: bool = False
) -> FederationConfig:
    """Typed :class:`FederationConfig` from a Flower ``run_config``.

    ``federation-json`` (a JSON object, as ``mammofed-server run`` sends it)
    wins over ``federation-config`` (a YAML path, relative to ``app_root``, the
    folder holding ``configs/``, and inside it: a run may not make a site read
    another file). ``run-dir``, when non-empty, overrides the file's
    ``run_dir``. ``site``: read for a site, which leaves out (never checks)
    the server-only :data:`SERVER_ONLY_PATHS`.

    Raises:
        ConfigError: ``federation-json`` is not JSON or is nested too deeply,
            the YAML path is missing or outside the app, or a value is
            invalid; names the source, the key and the value.
    """
    inline = str(run_config.get(RUN_FEDERATION_JSON, "") or "")
    if inline:
        try:
            data = json.loads(inline)
        except ValueError as exc:  # also an integer past Python's digit limit
            raise ConfigError(
                "run_config", RUN_FEDERATION_JSON, f"is not valid JSON: {exc}"
            ) from exc
        except RecursionError:
            # as load_yaml does for a YAML file: a clear refusal, not a crash
            raise ConfigError(
                "run_config", RUN_FEDERATION_JSON, "is nested too deeply"
            ) from None
        try:
            cfg = from_mapping(
                _site_view(data) if site else data,
                FederationConfig,
                source=f"run_config:{RUN_FEDERATION_JSON}",
            )
        except RecursionError:  # parsed, yet too deep for the checks
            raise ConfigError(
                "run_config", RUN_FEDERATION_JSON, "is nested too deeply"
            ) from None
    else:
        raw = str(run_config.get(RUN_FEDERATION_CONFIG, "") or "")
        if not raw:
            raise ConfigError(
                "run_config",
                RUN_FEDERATION_CONFIG,
                f"is missing (set {RUN_FEDERATION_CONFIG} or {RUN_FEDERATION_JSON})",
            )
        path = Path(raw)
        if not path.is_absolute():
            path = app_root / path
        # whoever launches a run sets this: it may only name a file of the app
        # (its configs/), not any YAML file on the site's machine
        root = Path(app_root).resolve()
        if not path.resolve().is_relative_to(root):
            raise ConfigError(
                "run_config",
                RUN_FEDERATION_CONFIG,
                f"{shown(raw)} is outside the app ({root}): only the app's own "
                f"config files may be named (or send {RUN_FEDERATION_JSON})",
            )
        if site:
            cfg = from_mapping(
                _site_view(load_yaml(path)),
                FederationConfig,
                source=str(path),
                base_dir=path.resolve().parent,
            )
        else:
            cfg = load_federation_config(path)
    run_dir = str(run_config.get(RUN_DIR, "") or "")
    if run_dir:
        cfg = dataclasses.replace(cfg, run_dir=Path(run_dir).expanduser())
    return cfg


def federation_config_to_json(cfg: FederationConfig) -> str:
    """JSON form of ``cfg`` (absolute paths) for ``federation-json``."""
    from common.config.loader import config_to_dict

    return json.dumps(config_to_dict(cfg), sort_keys=True)


#: A ConfigRecord number: an int is accepted where a float is expected.
_NUMBER = (int, float)
#: ConfigRecord key -> (FitInstructions field, accepted type).
_RECORD_FIELDS: dict[str, tuple[str, type | tuple[type, ...]]] = {
    SERVER_ROUND: ("server_round", int),
    LOCAL_EPOCHS: ("local_epochs", int),
    LEARNING_RATE: ("learning_rate", _NUMBER),
    BATCH_SIZE: ("batch_size", int),
    PROXIMAL_MU: ("proximal_mu", _NUMBER),
    LOCAL_NORM: ("local_norm", bool),
    PERSONAL_HEAD: ("personal_head", bool),
    TRAINER: ("trainer", str),
}
#: ConfigRecord key -> (config class, field) whose ``bounded`` range a received
#: value must keep: a message may ask no more of a site than a loaded
#: federation config could. A round number is one of ``1..num_rounds`` (round
#: 0 is the initial model; no train or evaluate message carries it).
_RECORD_BOUNDS: dict[str, tuple[type, str]] = {
    SERVER_ROUND: (FederationConfig, "num_rounds"),
    LOCAL_EPOCHS: (TrainerConfig, "local_epochs"),
    LEARNING_RATE: (TrainerConfig, "learning_rate"),
    BATCH_SIZE: (TrainerConfig, "batch_size"),
    PROXIMAL_MU: (StrategyConfig, "proximal_mu"),
}


@dataclass(frozen=True)
class FitInstructions:
    """What the server tells a site for one round (the message's ConfigRecord).

    Attributes:
        server_round: round number, from 1.
        local_epochs, learning_rate, batch_size: local training settings.
        proximal_mu: FedProx weight; 0 means no proximal term.
        local_norm, personal_head: personalization the server expects.
        trainer: registry name of the local trainer.
    """

    server_round: int
    local_epochs: int = 1
    learning_rate: float = 0.05
    batch_size: int = 16
    proximal_mu: float = 0.0
    local_norm: bool = False
    personal_head: bool = False
    trainer: str = "toy"

    @classmethod
    def from_federation(
        cls, cfg: FederationConfig, server_round: int
    ) -> FitInstructions:
        """Instructions for ``server_round`` from the run's config.

        The learning rate follows ``trainer.lr_schedule``
        (:meth:`TrainerConfig.round_learning_rate`).
        """
        return cls(
            server_round=server_round,
            local_epochs=cfg.trainer.local_epochs,
            learning_rate=cfg.trainer.round_learning_rate(server_round, cfg.num_rounds),
            batch_size=cfg.trainer.batch_size,
            proximal_mu=cfg.strategy.proximal_mu,
            local_norm=cfg.personalization.local_norm,
            personal_head=cfg.personalization.personal_head,
            trainer=cfg.trainer.name,
        )

    def check_split(self, personalization: PersonalizationConfig, site: str) -> None:
        """Refuse a round whose personalization split is not ``site``'s own.

        What stays at home and what is shared would differ from what both
        sides think.

        Raises:
            ConfigError: ``local-norm`` / ``personal-head`` differ (both named).
        """
        mine = (personalization.local_norm, personalization.personal_head)
        if (self.local_norm, self.personal_head) != mine:
            raise ConfigError(
                "server message config",
                "local-norm/personal-head",
                f"server sent ({self.local_norm}, {self.personal_head}) but "
                f"{site}'s run config says {mine}",
            )

    def to_config_record(self) -> ConfigRecord:
        """The ConfigRecord form (keys from :mod:`common.keys` / this module)."""
        from flwr.app import ConfigRecord

        return ConfigRecord(
            {
                key: float(getattr(self, attr))
                if tp == _NUMBER
                else getattr(self, attr)
                for key, (attr, tp) in _RECORD_FIELDS.items()
            }
        )

    @classmethod
    def from_config_record(
        cls, record: Mapping[str, Any], source: str = "message"
    ) -> FitInstructions:
        """Parse a received ConfigRecord; missing optional keys take defaults.

        Each value must have its field's type, be finite, and keep the range
        a federation config file enforces for the same setting
        (``trainer.local_epochs``, ``trainer.learning_rate``,
        ``trainer.batch_size``, ``strategy.proximal_mu``; ``server-round`` in
        ``1..`` the largest ``num_rounds``).

        Raises:
            ConfigError: a missing ``server-round``, or a value of the wrong
                type or out of range; names ``source``, the key and the value.
        """
        if SERVER_ROUND not in record:
            raise ConfigError(source, SERVER_ROUND, "is required but missing")
        kwargs: dict[str, Any] = {}
        for key, (attr, tp) in _RECORD_FIELDS.items():
            if key not in record:
                continue
            value = record[key]
            bad_bool = tp is int and isinstance(value, bool)
            if not isinstance(value, tp) or bad_bool:
                raise ConfigError(source, key, f"has the wrong type: {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(source, key, f"must be finite, got {value!r}")
            if key in _RECORD_BOUNDS:
                check_bounds(*_RECORD_BOUNDS[key], value, source, key)
            kwargs[attr] = float(cast(float, value)) if tp == _NUMBER else value
        return cls(**kwargs)


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """ArrayRecord holding exactly ``arrays`` (names kept, order kept)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord(
        {name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()}
    )


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``{name: ndarray}`` from an ArrayRecord."""
    return {name: arr.numpy() for name, arr in record.items()}


class ArrayDecodeError(ValueError):
    """A received array that is not the one expected; the message names it.

    Raised by :func:`decode_array` before anything of the size the sender
    declares is allocated; each side raises its own error with the message.
    """


#: The npy header versions :func:`decode_array` reads (what ``np.save`` writes
#: for numeric arrays).
_NPY_HEADERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def decode_array(
    name: str,
    arr: Array,
    shape: tuple[int, ...],
    dtypes: tuple[np.dtype, ...] | np.dtype,
) -> np.ndarray:
    """Array ``name`` of a received record, decoded only if it has the expected form.

    Checked in this order, each before anything is allocated: the declared
    serialization (numpy's ``.npy``, never pickle), the record's declared
    shape (``shape``) and dtype (one of ``dtypes``), then the ``.npy``
    header inside the bytes (its own shape and dtype must be the declared
    ones: a 2-element record whose header says ``(10**12,)`` would make
    ``np.load`` allocate 4 TB) and the byte count it implies. The values
    themselves (finite, ...) are :func:`array_fault`'s to check.

    Returns:
        A writable C-ordered array of ``shape`` in the declared dtype.

    Raises:
        ArrayDecodeError: the first mismatch, naming the array, what it has
            and what is expected; the sender's text only through
            :func:`common.errors.shown`.
    """
    from flwr.common.constant import SType

    allowed = [
        np.dtype(d) for d in (dtypes if isinstance(dtypes, tuple) else (dtypes,))
    ]
    want_dtypes = " or ".join(str(d) for d in allowed)
    label = f"array {shown(name)}"
    if arr.stype != SType.NUMPY:
        raise ArrayDecodeError(
            f"{label} is serialized as {shown(arr.stype)}, expected {SType.NUMPY!r}"
        )
    try:
        declared = tuple(int(d) for d in arr.shape)
    except (TypeError, ValueError, OverflowError):
        raise ArrayDecodeError(
            f"{label} declares a shape that is no tuple of integers: {shown(arr.shape)}"
        ) from None
    if declared != tuple(shape):
        raise ArrayDecodeError(f"{label} has shape {declared}, expected {tuple(shape)}")
    try:
        dtype = np.dtype(arr.dtype)
    except (TypeError, ValueError, SyntaxError, RecursionError):
        raise ArrayDecodeError(
            f"{label} declares an unknown dtype {shown(arr.dtype)}, "
            f"expected {want_dtypes}"
        ) from None
    if dtype not in allowed:
        raise ArrayDecodeError(f"{label} has dtype {dtype}, expected {want_dtypes}")
    data = arr.data
    if not isinstance(data, bytes):
        raise ArrayDecodeError(f"{label} carries {type(data).__name__}, not bytes")
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        read_header = _NPY_HEADERS.get(version)
        if read_header is None:
            raise ArrayDecodeError(f"{label}: npy format version {version} not read")
        h_shape, fortran, h_dtype = read_header(buf)
    except ArrayDecodeError:
        raise
    except (ValueError, TypeError, SyntaxError, OverflowError, RecursionError) as exc:
        raise ArrayDecodeError(
            f"{label}: its bytes are not a numpy array ({type(exc).__name__})"
        ) from None
    if tuple(h_shape) != declared or np.dtype(h_dtype) != dtype:
        raise ArrayDecodeError(
            f"{label}: its bytes hold shape {shown(tuple(h_shape))} and dtype "
            f"{shown(str(h_dtype))}, but it declares {declared} and {dtype}"
        )
    count = math.prod(declared)
    offset = buf.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise ArrayDecodeError(
            f"{label}: its bytes hold {len(data) - offset} bytes of values, "
            f"{count * dtype.itemsize} expected for shape {declared} and {dtype}"
        )
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(declared, order="F" if fortran else "C").copy(order="C")


def spec_of(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of a dict of arrays."""
    return {name: tuple(int(d) for d in a.shape) for name, a in arrays.items()}


#: The dtypes a site loads model arrays from the server in (float32 models;
#: float64 loads into them exactly). float16 would quantise them, and float128
#: no torch tensor can hold.
WIRE_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def array_fault(
    name: str,
    value: np.ndarray,
    shape: tuple[int, ...],
    dtypes: tuple[np.dtype, ...] | np.dtype,
) -> tuple[Literal["shape", "dtype", "finite"], str] | None:
    """The one rule for an array that crosses the wire (a model's or a site's).

    ``value`` must have ``shape``, one of ``dtypes``, and only finite values;
    a normalization layer's running variance (a name ending ``running_var``)
    none below 0, which no training makes and which turns the layer's output
    into NaN at every site once averaged in (0, a channel that never varied,
    is harmless: the layer adds its epsilon).
    Returns ``None``, or the first fault as ``(kind, why)``: ``kind`` is
    ``"shape"``, ``"dtype"`` or ``"finite"`` and ``why`` names the array and
    its value (``"array 'w' has dtype float16, expected float32"``); each
    caller raises its own error with it.
    """
    allowed = dtypes if isinstance(dtypes, tuple) else (dtypes,)
    got = tuple(int(d) for d in value.shape)
    if got != tuple(shape):
        return "shape", f"array {name!r} has shape {got}, expected {tuple(shape)}"
    if np.dtype(value.dtype) not in [np.dtype(d) for d in allowed]:
        want = " or ".join(str(np.dtype(d)) for d in allowed)
        return "dtype", f"array {name!r} has dtype {value.dtype}, expected {want}"
    if not np.issubdtype(value.dtype, np.number) or not np.all(np.isfinite(value)):
        return "finite", f"array {name!r} has NaN or Inf values"
    if name.endswith("running_var") and value.size and float(np.min(value)) < 0:
        return "finite", (
            f"array {name!r} holds a negative variance ({float(np.min(value)):.3g})"
        )
    return None
