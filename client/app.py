"""The Flower ``ClientApp`` of a site (``clientapp = "client.app:app"``).

Which site this node plays comes from ``context.node_config``:

* deployment: ``site-config`` = path of a ``configs/sites/*.yaml``
  (:class:`common.config.site.SiteConfig`; its ``name`` and ``state_dir``, and
  its ``cache_dir``/``data_dir`` when the run sets ``trainer.options.
  cache_root``: the run never chooses a configured site's folders), or the
  keys ``site`` and ``state-dir`` (required; ``data-dir`` too when the run
  sets ``cache_root``) directly;
* simulation: ``partition-id`` indexes the run's ``sites`` list, and the
  state lives under the federation config's ``state_dir``.

The run's :class:`common.wire.federation.FederationConfig` comes from
``context.run_config``. Replies carry only the trainer's declared shared arrays
(train, query) and one MetricRecord with the trainer's declared metric names;
:func:`client.guard.check_reply` refuses anything else before it is sent. A
metric that is not finite (CPM of a class with no lesion in the site's test
split) is left out of the reply rather than sent as NaN. When the run's sites
choose their own model (``trainer.options.select``), the trainer makes that
choice at each evaluate message and keeps it in the site's state
(:mod:`client.selection`); the reply carries only its index
(``selected-model``).

Faults: a handler that fails replies a Flower ``Error`` with one of the codes
of :mod:`common.wire.faults` and its fixed message; the exception itself (whose
text may name the site, its paths or a patient) is logged here, on the site,
and never sent. Every train and evaluate message carries the server's
:class:`common.wire.faults.ModelVersion`: the site settles the personal state of
its previous round with it (committed only if the server kept this node's
update) and trains the new round into a pending copy
(:meth:`client.state.SiteState.begin_round`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from client.guard import PrivacyGuardError, check_reply
from client.state import SiteState, SiteStateError
from client.trainer import LocalTrainer, build_trainer, check_privacy_floor
from common.config.site import SitePrivacy, load_site_config
from common.errors import CheckpointMismatch, ConfigError, MammofedError, shown
from common.keys import (
    ARRAYS_KEY,
    CONFIG_KEY,
    LOCAL_SECONDS,
    METRICS_KEY,
    NUM_EXAMPLES,
    PERSONAL_DEFAULTS_KEY,
    SERVER_ROUND,
)
from common.wire.faults import (
    SITE_CONFIG,
    SITE_DATA,
    SITE_GUARD,
    SITE_INTERNAL,
    SITE_PRIVACY,
    SITE_STATE,
    ModelVersion,
    drop_non_finite,
    reply_error_message,
)
from common.wire.federation import (
    NODE_DATA_DIR,
    NODE_SITE,
    NODE_SITE_CONFIG,
    NODE_STATE_DIR,
    PARTITION_ID,
    WIRE_FLOATS,
    ArrayDecodeError,
    FederationConfig,
    FitInstructions,
    array_fault,
    arrays_to_record,
    decode_array,
    federation_config_from_run_config,
)

if TYPE_CHECKING:  # torch: imported where a trainer is built, not here
    from client.site_model import SiteModel

log = logging.getLogger(__name__)

#: The folder holding ``configs/`` (the repo root, or the installed FAB).
APP_ROOT = Path(__file__).resolve().parents[1]
_STATE_CACHE = "mammofed-site"


@dataclass(frozen=True)
class SiteBinding:
    """Which site a node plays and where its state and data live."""

    site: str
    state_dir: Path
    data_dir: Path | None = None
    #: the site config's ``adapt`` overrides (deployment only; validated)
    adapt: Mapping[str, Any] = field(default_factory=dict)
    #: the site config's own privacy floor, and that file (deployment only)
    privacy: SitePrivacy | None = None
    source: str = "node_config"


def resolve_site(node_config: dict, fed_cfg: FederationConfig) -> SiteBinding:
    """Map a node config to a :class:`SiteBinding` (errors name key and value)."""
    src = "node_config"
    if NODE_SITE_CONFIG in node_config:
        path = Path(str(node_config[NODE_SITE_CONFIG])).expanduser()
        site_cfg = load_site_config(path)
        if site_cfg.state_dir is None:
            raise ConfigError(str(path), "state_dir", "is required for federation")
        data = site_cfg.cache_dir or site_cfg.data_dir
        cache_root = fed_cfg.trainer.options.get("cache_root")
        if data is None and cache_root:
            # the run's launcher would choose which folder this site reads
            raise ConfigError(
                str(path),
                "cache_dir",
                "is required: the site's images are named by its own config, "
                f"not by the run's trainer.options.cache_root = {shown(cache_root)}",
            )
        return SiteBinding(
            site_cfg.name,
            site_cfg.state_dir,
            data,
            site_cfg.adapt,
            site_cfg.privacy,
            str(path),
        )
    if NODE_SITE in node_config:
        site = str(node_config[NODE_SITE])
        # the node's own folder, never the run's state_dir: whoever launches a
        # run could point the site at a fresh DP accountant or any folder
        state = node_config.get(NODE_STATE_DIR)
        if not state:
            raise ConfigError(src, NODE_STATE_DIR, f"missing for site {site!r}")
        data = node_config.get(NODE_DATA_DIR)
        cache_root = fed_cfg.trainer.options.get("cache_root")
        if not data and cache_root:
            # as for a site config: the run's launcher would choose its images
            raise ConfigError(
                src,
                NODE_DATA_DIR,
                f"missing for site {site!r}: the site's images are named by its "
                "node, not by the run's trainer.options.cache_root = "
                f"{shown(cache_root)}",
            )
        return SiteBinding(site, Path(str(state)), Path(str(data)) if data else None)
    if PARTITION_ID in node_config:
        pid = node_config[PARTITION_ID]
        if not isinstance(pid, int) or not 0 <= pid < len(fed_cfg.sites):
            raise ConfigError(
                src,
                PARTITION_ID,
                f"{pid!r} does not index the run's sites {list(fed_cfg.sites)!r}",
            )
        if fed_cfg.state_dir is None:
            raise ConfigError(
                "federation config", "state_dir", "required in simulation"
            )
        return SiteBinding(fed_cfg.sites[pid], fed_cfg.state_dir)
    raise ConfigError(
        src,
        "<root>",
        f"names no site: expected {NODE_SITE_CONFIG}, {NODE_SITE} or {PARTITION_ID}, "
        f"got keys {sorted(node_config)}",
    )


def _setup(context: Context) -> tuple[FederationConfig, SiteBinding, LocalTrainer]:
    fed_cfg = federation_config_from_run_config(context.run_config, APP_ROOT, site=True)
    binding = resolve_site(dict(context.node_config), fed_cfg)
    check_privacy_floor(fed_cfg, binding.privacy, binding.source)
    trainer = build_trainer(
        fed_cfg.trainer.name,
        binding.site,
        binding.state_dir,
        fed_cfg,
        data_dir=binding.data_dir,
        adapt_overrides=binding.adapt,
    )
    return fed_cfg, binding, trainer


def _instructions(msg: Message, fed_cfg: FederationConfig) -> FitInstructions:
    """The round's instructions, checked against the site's run config.

    Raises:
        ConfigError: another trainer, or another personalization split
            (``local-norm`` / ``personal-head``) than the site runs: what stays
            at home and what is shared would differ from what both sides think.
    """
    cfg = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    ins = FitInstructions.from_config_record(cfg, source="server message config")
    trainer_name = fed_cfg.trainer.name
    if ins.trainer != trainer_name:
        raise ConfigError(
            "server message config",
            "trainer",
            f"server asks for {ins.trainer!r}, run config says {trainer_name!r}",
        )
    ins.check_split(fed_cfg.personalization, "the site")
    return ins


def _received_shared(msg: Message, trainer: LocalTrainer) -> dict[str, np.ndarray]:
    """The message's global arrays, decoded only once each has the model's form.

    Names must be exactly :meth:`LocalTrainer.shared_spec`'s; each array is
    decoded by :func:`common.wire.federation.decode_array` (numpy
    serialization, the expected shape and a :data:`WIRE_FLOATS` dtype, both
    declared and in its ``.npy`` header, checked before anything is
    allocated), then checked by :func:`array_fault` (finite values). The
    server's personal defaults, when the trainer keeps a site model, are
    decoded the same way against that model's personal norm arrays.

    Raises:
        ConfigError: the first fault (``server message``, the record key),
            naming the array, what it has and what the model expects.
    """
    record = msg.content.array_records.get(ARRAYS_KEY)
    if record is None:
        raise ConfigError("server message", ARRAYS_KEY, "no ArrayRecord received")
    want = trainer.shared_spec()
    unknown = sorted(set(record.keys()) - set(want))
    missing = [k for k in want if k not in record]
    if unknown or missing:
        raise ConfigError(
            "server message",
            ARRAYS_KEY,
            f"global arrays do not fit the model: unknown {shown(unknown)}, "
            f"missing {shown(missing)}",
        )
    arrays: dict[str, np.ndarray] = {}
    for name, arr in record.items():
        arrays[name] = _decoded(name, arr, want[name], ARRAYS_KEY)
    defaults = msg.content.array_records.get(PERSONAL_DEFAULTS_KEY)
    site_model = getattr(trainer, "site_model", None)
    if defaults is not None and site_model is not None:
        site_model.set_defaults(
            _personal_defaults(defaults, site_model), "server message"
        )
    return arrays


def _decoded(name: str, arr: Array, shape: tuple[int, ...], key: str) -> np.ndarray:
    """Array ``name`` of the server's record ``key``: decoded, finite, or raise.

    Raises:
        ConfigError: ``server message``, ``key``, and the fault naming the
            array, what it has and what is expected (``shape``).
    """
    try:
        value = decode_array(name, arr, shape, WIRE_FLOATS)
    except ArrayDecodeError as exc:
        raise ConfigError("server message", key, str(exc)) from None
    fault = array_fault(name, value, shape, WIRE_FLOATS)
    if fault is not None:
        raise ConfigError("server message", key, fault[1])
    return value


def _personal_defaults(
    record: ArrayRecord, site_model: SiteModel
) -> dict[str, np.ndarray]:
    """The server's personal defaults, each decoded against the site model's shape.

    Only the model's float personal arrays may be sent (as
    :meth:`client.site_model.SiteModel.set_defaults` requires); each is
    decoded by :func:`_decoded` before anything is allocated.

    Raises:
        ConfigError: ``server message``, ``personal defaults``: an array that
            is no personal norm array of the model, or does not fit it.
    """
    sd = site_model.model.state_dict()
    personal = set(site_model.personal_keys)
    out: dict[str, np.ndarray] = {}
    for name, arr in record.items():
        if name not in personal or not sd[name].is_floating_point():
            why = f"{shown(name)} is not a personal norm array of this model"
            raise ConfigError("server message", "personal defaults", why)
        shape = tuple(int(d) for d in sd[name].shape)
        out[name] = _decoded(name, arr, shape, "personal defaults")
    return out


def _settle(msg: Message, state: SiteState) -> ModelVersion | None:
    """Commit or discard the previous round's pending personal state.

    Returns the message's model version (``None`` from a server that sends
    none: personal state is then written directly, as before versions).
    """
    cfg = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    version = ModelVersion.from_config(cfg)
    if version is not None:
        state.settle(version)
    return version


def _finite_metrics(metrics: Mapping[str, Any], site: str) -> dict[str, Any]:
    kept, dropped = drop_non_finite(metrics)
    if dropped:
        log.info("site %s: metrics %s undefined here; left out", site, dropped)
    return kept


def _cache(context: Context, site: str, server_round: int) -> None:
    context.state[_STATE_CACHE] = ConfigRecord(
        {"site": site, "last-round": server_round}
    )


def handle_train(msg: Message, context: Context) -> Message:
    """Train on the site from the received global arrays; reply shared + metrics."""
    fed_cfg, binding, trainer = _setup(context)
    ins = _instructions(msg, fed_cfg)
    shared = _received_shared(msg, trainer)
    state = SiteState(binding.state_dir, binding.site)
    if _settle(msg, state) is None:
        return _train(msg, context, binding, trainer, shared, ins, state)
    state.begin_round(ins.server_round, int(context.node_id))
    try:
        return _train(msg, context, binding, trainer, shared, ins, state)
    except BaseException:
        # no reply of this round leaves the site: whatever model version a
        # later message names, nothing of this round may become its state
        state.abandon_round(f"round {ins.server_round} failed on this site")
        raise


def _train(
    msg: Message,
    context: Context,
    binding: SiteBinding,
    trainer: LocalTrainer,
    shared: dict,
    ins: FitInstructions,
    state: SiteState,
) -> Message:
    """:func:`handle_train` from the training on (a failure here sends no reply)."""
    t0 = time.perf_counter()
    new_shared, metrics = trainer.fit(shared, ins)
    seconds = time.perf_counter() - t0
    content = RecordDict(
        {
            ARRAYS_KEY: arrays_to_record(new_shared),
            METRICS_KEY: MetricRecord(_finite_metrics(metrics, binding.site)),
        }
    )
    check_reply(
        content,
        site=binding.site,
        shared_spec=trainer.shared_spec(),
        metric_names=trainer.metric_names("train"),
    )
    # withheld values (DP) are recorded here, on the site's disk, never sent
    local = {**metrics, **getattr(trainer, "withheld", {})}
    state.record_round(
        ins.server_round, "train", {**local, LOCAL_SECONDS: round(seconds, 3)}
    )
    _cache(context, binding.site, ins.server_round)
    log.info("site %s: trained round %d: %s", binding.site, ins.server_round, metrics)
    return Message(content=content, reply_to=msg)


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global arrays + personal state; reply metrics only."""
    fed_cfg, binding, trainer = _setup(context)
    ins = _instructions(msg, fed_cfg)
    shared = _received_shared(msg, trainer)
    state = SiteState(binding.state_dir, binding.site)
    _settle(msg, state)
    t0 = time.perf_counter()
    metrics = _finite_metrics(trainer.evaluate(shared, ins), binding.site)
    seconds = time.perf_counter() - t0
    content = RecordDict({METRICS_KEY: MetricRecord(dict(metrics))})
    check_reply(
        content,
        site=binding.site,
        shared_spec=None,
        metric_names=trainer.metric_names("evaluate"),
    )
    state.record_round(
        ins.server_round, "evaluate", {**metrics, LOCAL_SECONDS: round(seconds, 3)}
    )
    _cache(context, binding.site, ins.server_round)
    return Message(content=content, reply_to=msg)


def handle_query(msg: Message, context: Context) -> Message:
    """Reply the trainer's initial shared arrays (the server's round-0 model)."""
    _, binding, trainer = _setup(context)
    content = RecordDict(
        {
            ARRAYS_KEY: arrays_to_record(trainer.initial_shared()),
            METRICS_KEY: MetricRecord({NUM_EXAMPLES: 0}),
        }
    )
    check_reply(
        content,
        site=binding.site,
        shared_spec=trainer.shared_spec(),
        metric_names=(NUM_EXAMPLES,),
    )
    return Message(content=content, reply_to=msg)


def error_code(exc: BaseException) -> int:
    """The :mod:`common.wire.faults` code of a handler's exception."""
    from common.detector.dp import PrivacyError  # torch: imported only on this path

    kinds: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], int], ...]
    kinds = (
        (PrivacyGuardError, SITE_GUARD),
        (SiteStateError, SITE_STATE),
        (PrivacyError, SITE_PRIVACY),
        ((ConfigError, CheckpointMismatch), SITE_CONFIG),
        ((MammofedError, OSError), SITE_DATA),
    )
    for types, code in kinds:
        if isinstance(exc, types):
            return code
    return SITE_INTERNAL


def error_reply(msg: Message, exc: Exception, phase: str) -> Message:
    """An ``Error`` reply to ``msg``: a code and its fixed message, never ``exc``.

    The exception is logged in full here, on the site.
    """
    code = error_code(exc)
    log.error(
        "%s of round %s failed (reply error %d): %s",
        phase,
        msg.content.config_records.get(CONFIG_KEY, ConfigRecord()).get(SERVER_ROUND),
        code,
        exc,
        exc_info=exc,
    )
    return Message(Error(code=code, reason=reply_error_message(code)), reply_to=msg)


def _entry(
    handler: Callable[[Message, Context], Message], phase: str
) -> Callable[[Message, Context], Message]:
    """Flower's ``phase`` entry: ``handler``, or :func:`error_reply` if it raises."""

    def entry(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:
            return error_reply(msg, exc, phase)

    return entry


app = ClientApp()
train = app.train()(_entry(handle_train, "train"))
evaluate = app.evaluate()(_entry(handle_evaluate, "evaluate"))
query = app.query()(_entry(handle_query, "query"))
