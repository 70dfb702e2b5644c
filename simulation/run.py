"""``mammofed-sim run``: a whole multi-vendor federation study on one machine.

Steps (each logged with progress):

1. **Sites**: generate the phantom scenario into ``DATA/sites`` (skipped when
   the same resolved scenario is already there) and ingest every site into
   ``DATA/cache/<site>`` with the scenario's working spacing. The oracle's
   complete labels (``sites/_oracle``) are ingested into ``DATA/oracle/<site>``.
2. **Regimes** (one line each in ``simulation.regimes.TABLE``), all through
   the same detector, the same augmentation, sampling and optimizer, and the
   same number of passes over the data (``num_rounds x local_epochs``):

   * ``base``: trained on the base site (vendor H) alone, tested on every site;
   * ``local-only``: every site trains alone on its own labels;
   * ``oracle``: all sites' images with all labels pooled;

   The brief's two-phase protocol is the default: the ``base`` model is made
   first (trained, or ``--base-checkpoint``), written to ``base/model.pt``,
   and every other regime starts from it (central ones load it, federated ones
   get it as the server's ``initial_checkpoint``), so the comparison is fair
   and each regime has the same budget after the base. ``--from-scratch``
   starts every regime from a random model instead.
   * ``fedavg``, ``fedprox``, ``fedmedian``, ``fedtrimmedavg``, ``fedavgm``,
     ``fedadam`` (server optimizers), ``fedavg-select`` and
     ``personalized-select`` (each site chooses its model on validation women),
     ``personalized-stats`` (+ the site's BatchNorm statistics re-estimated
     on its training images after every round),
     ``personalized`` (FedBN + personal heads),
     ``personalized-ssl`` (+ mean-teacher consistency on unlabeled images),
     ``personalized-dp`` (+ patient-level DP-SGD at ``dp_epsilon``, see
     ``common.detector.dp`` and docs/privacy.md; its ``metrics.json`` carries a
     ``dp`` record with the target and every site's spent epsilon):
     the real ServerApp loop (``server.federation.run_federation``) and real
     ClientApp (``client.app``) through :class:`simulation.grid.InProcessGrid`
     (``engine="inprocess"``), or on Flower's simulation engine
     (``engine="ray"``: ``flwr run`` on the local simulation SuperLink with
     Ray, one node per site; :mod:`simulation.ray_engine`).

3. **Evaluation**: every site's own model (federated: global shared arrays +
   that site's personal state, or the model the site chose on its validation
   women in the ``-select`` regimes; central: the regime's model) on that
   site's held-out test women: FROC, CPM with a bootstrap interval, AP.

The run folder is written as the records of :mod:`common.wire.runfolder`, which
``mammofed-sim report`` reads back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from client.detector_trainer import (
    DetectorOptions,
    DetectorTrainer,
    check_site_options,
    detector_options,
)
from client.ingest import ingest_site
from client.local_training import check_central_options, train_central
from common.config.loader import (
    apply_settings,
    config_to_dict,
    load_yaml,
    parse_setting,
    replace_validated,
    write_resolved,
)
from common.config.site import SiteConfig
from common.detector.adapt.config import AdaptConfig
from common.detector.adapt.fewshot import few_labels
from common.detector.checkpoint import init_from_checkpoint, save_checkpoint
from common.detector.engine import (
    EvalResult,
    evaluate_detailed,
    resolve_device,
)
from common.detector.model import build_detector
from common.errors import ConfigError, MammofedError
from common.fileio import sha256_file
from common.imaging.data import DEFAULT_TEST_FRACTION, SiteDataset
from common.keys import (
    CLASSES,
    DETECTOR_TRAINER,
    LOCAL_SECONDS,
    RESOLVED_CONFIG_YAML,
    SKIPPED_STEPS,
    TRAIN_LOSS,
)
from common.progress import Eta
from common.wire import runfolder as RF
from common.wire.federation import (
    RUN_FEDERATION_JSON,
    FederationConfig,
    federation_config_to_json,
    load_federation_config,
    round_problems,
)
from common.wire.runfolder import RegimeMetrics, SiteMetrics
from simulation import regimes as R
from simulation.phantom import generate_scenario, load_scenario
from simulation.phantom.generate import ORACLE_DIR
from simulation.selftrain import (
    central_model_path,
    export_site_model,
    pseudo_for_site,
)

log = logging.getLogger(__name__)

ROLE_BASE = "base"
#: The base model every regime of a two-phase study starts from (``<out>/base/``).
BASE_MODEL = "model.pt"


@dataclass(frozen=True)
class RunRequest:
    """What ``mammofed-sim run`` was asked to do."""

    scenario: Path
    federation: Path
    out: Path
    regimes: tuple[str, ...] = (
        R.BASE,
        R.LOCAL_ONLY,
        R.FEDAVG,
        R.PERSONALIZED,
        R.ORACLE,
    )
    data: Path | None = None
    workers: int = 2
    rounds: int | None = None
    #: Overrides the federation's ``seed`` (every regime; the sites' test
    #: women stay the same, so runs with different seeds can be paired).
    seed: int | None = None
    fedprox_mu: float = 0.01
    n_boot: int = 500
    #: ``inprocess`` (:class:`simulation.grid.InProcessGrid`) or ``ray``
    #: (``flwr run`` on the local simulation SuperLink, see
    #: :mod:`simulation.ray_engine`).
    engine: str = "inprocess"
    #: Wall-clock limit of one federated regime on the ``ray`` engine.
    engine_timeout_s: float = 3600.0
    #: Target epsilon of every site in the ``personalized-dp`` regime.
    dp_epsilon: float = 8.0
    #: Two-phase protocol: every regime after ``base`` starts from the base
    #: model; ``False``: each starts from a random model.
    start_from_base: bool = True
    #: A base model (detector checkpoint for the federation's model options)
    #: used instead of training one on the base sites.
    base_checkpoint: Path | None = None
    #: Torch threads of every regime (the sites' ``trainer.options.threads``
    #: too); ``None``: the federation config's, torch's default for central ones.
    threads: int | None = None
    #: Overrides the federation's ``trainer.lr_schedule`` (``constant`` or
    #: ``cosine`` over the rounds); ``None``: the config's.
    lr_schedule: str | None = None
    #: Finished runs of the same scenario, federation config, seed and base
    #: model (with ``run_seeds``: the folders holding their ``seed-<s>/``):
    #: a regime one of them scored (the first that did) is read from it, not
    #: trained again (:func:`check_reuse`), so a study can gain a regime, or
    #: an ensemble of its regimes, without repeating the rest. Without
    #: ``base_checkpoint`` the first one's base model is this run's.
    reuse: tuple[Path, ...] = ()
    #: ``KEY=VALUE`` changes to the federation config (``--set``,
    #: :func:`common.config.apply_settings`), e.g.
    #: ``trainer.options.ssl_unsup_weight=0``: one option tried without a copy
    #: of the file; the run's ``configs/federation.yaml`` holds the result.
    settings: tuple[str, ...] = ()


# --- sites ----------------------------------------------------------------------
def prepare_sites(
    scenario_path: Path, data: Path, workers: int
) -> tuple[Any, dict[str, Path], dict[str, Path]]:
    """Generate (or reuse) the phantom sites and ingest them.

    Returns ``(scenario, {site: cache}, {site: oracle cache})``.
    """
    scenario = load_scenario(scenario_path)
    sites_dir = data / "sites"
    stamp = sites_dir / "scenario_resolved.yaml"
    wanted = json.dumps(config_to_dict(scenario), sort_keys=True)
    have = None
    if stamp.is_file():
        have = json.dumps(load_yaml(stamp), sort_keys=True)
    if have == wanted and all((sites_dir / s.name).is_dir() for s in scenario.sites):
        log.info("phantom sites already in %s (same scenario): reused", sites_dir)
    else:
        log.info("generating phantom scenario %s into %s", scenario.name, sites_dir)
        generate_scenario(scenario, sites_dir, workers=workers)
    caches: dict[str, Path] = {}
    oracle: dict[str, Path] = {}
    for s in scenario.sites:
        cfg = SiteConfig(name=s.name, working_spacing_mm=scenario.working_spacing_mm)
        caches[s.name] = data / "cache" / s.name
        res = ingest_site(sites_dir / s.name, caches[s.name], cfg, workers=workers)
        log.info(
            "site %s: %d images cached (%d new), %d files skipped",
            s.name,
            len(res.entries),
            len(res.new),
            len(res.skipped),
        )
        oracle_site = _oracle_site_dir(sites_dir, s.name)
        oracle[s.name] = data / "oracle" / s.name
        ingest_site(oracle_site, oracle[s.name], cfg, workers=workers)
    return scenario, caches, oracle


def _oracle_site_dir(sites_dir: Path, site: str) -> Path:
    """A site folder with the oracle's complete annotations (hard links, no copy)."""
    src = sites_dir / site
    dst = sites_dir / ORACLE_DIR / site
    for f in src.rglob("*"):
        if f.is_dir() or f.name == "annotations.csv":
            continue
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            if (
                target.stat().st_size == f.stat().st_size
                and target.stat().st_mtime >= f.stat().st_mtime
            ):
                continue
            target.unlink()
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)
    return dst


# --- metrics ----------------------------------------------------------------------
def _write_regime(
    run_dir: Path,
    spec: R.Regime,
    results: dict[str, EvalResult | None],
    dp: dict[str, Any] | None = None,
) -> None:
    """``<regime>/metrics.json`` and ``<regime>/detections.json`` of a regime.

    ``detections.json`` holds every scored test image (ground truth and
    detections, :meth:`common.detector.froc.FrocImage.to_json`) per site, so the report
    can compare two regimes image by image (paired bootstrap).
    """
    d = run_dir / spec.name
    d.mkdir(parents=True, exist_ok=True)
    done = {k: r for k, r in results.items() if r is not None}
    sites = {k: SiteMetrics.from_results(r.per_class) for k, r in done.items()}
    RF.write_record(d / RF.METRICS_JSON, RegimeMetrics(spec.name, spec.kind, sites, dp))
    detections = {k: [im.to_json() for im in r.images] for k, r in done.items()}
    (d / RF.DETECTIONS_JSON).write_text(json.dumps(detections))
    for site, m in sites.items():
        cpms = {c: m.classes[c].cpm for c in CLASSES}
        log.info("[%s] site %s: CPM %s", spec.name, site, cpms)


def check_reuse(prior: Path, out: Path, init: Path | None) -> Path:
    """``prior`` if its regimes may stand for this run's; else ``ConfigError``.

    Its ``configs/scenario.yaml`` must equal this run's byte for byte and its
    ``configs/federation.yaml`` (the resolved settings, seed and overrides
    included) must read as the same settings (a field added since it was
    written takes its default), and its base model (``base/model.pt``) must
    be this run's ``init``: the regimes it trained started from the same
    model, on the same women, with the same recipe.
    """
    if init is None:
        raise ConfigError(
            "mammofed-sim run",
            "--reuse",
            "needs the two-phase protocol (both runs start from the base model)",
        )
    where = str(prior)
    if not (prior / RF.RUN_JSON).is_file():
        raise ConfigError(where, RF.RUN_JSON, "missing: not a study run folder")

    def settings(path: Path) -> Any:
        if path.name == "federation.yaml":
            return config_to_dict(load_federation_config(path))
        return path.read_bytes()

    for name in ("scenario.yaml", "federation.yaml"):
        theirs, ours = prior / RF.CONFIGS_DIR / name, out / RF.CONFIGS_DIR / name
        if not theirs.is_file() or settings(theirs) != settings(ours):
            raise ConfigError(
                where,
                f"{RF.CONFIGS_DIR}/{name}",
                f"differs from this run's {ours}: its regimes were trained on "
                "other settings",
            )
    base = prior / R.BASE / BASE_MODEL
    if not base.is_file() or sha256_file(base) != sha256_file(init):
        raise ConfigError(
            where, f"{R.BASE}/{BASE_MODEL}", f"is not this run's base model {init}"
        )
    return prior


def check_requested(prior: Path, spec: R.Regime, req: RunRequest) -> None:
    """A reused federated regime was trained with this run's flag values.

    ``--fedprox-mu``, ``--dp-epsilon`` and the other values a regime takes
    from :class:`RunRequest` (:attr:`Regime.from_request`) are not in
    ``configs/federation.yaml``, so :func:`check_reuse` cannot see them: they
    are read from the regime's ``server/resolved_config.yaml``. A missing
    file or value, or another value, is a ``ConfigError`` naming them.
    """
    if not spec.from_request or spec.kind != "federated":
        return
    path = prior / spec.name / RF.SERVER_DIR / RESOLVED_CONFIG_YAML
    raw = load_yaml(path)
    for key, attr in spec.from_request.items():
        section, field = (
            ("strategy", key.removeprefix("strategy."))
            if key.startswith("strategy.")
            else ("trainer.options", key)
        )
        node: Any = raw
        for part in (*section.split("."), field):
            node = node.get(part) if isinstance(node, dict) else None
        asked = getattr(req, attr)
        if node != asked:
            flag = "--" + attr.replace("_", "-")
            raise ConfigError(
                str(path),
                f"{section}.{field}",
                f"{node!r}, but this run asks for {asked!r} ({flag}): "
                f"its {spec.name} regime was trained with another value",
            )


def reused_results(
    prior: Path, spec: R.Regime, n_boot: int, seed: int, dp_epsilon: float
) -> tuple[dict[str, EvalResult | None], dict[str, Any] | None]:
    """A regime's scored test images read from a run :func:`check_reuse` accepted.

    Each site's images are scored again (``n_boot``, ``seed``); a DP regime
    keeps its privacy record, which must be for ``dp_epsilon``.
    Returns ``(results, dp)``.
    """
    from common.detector.engine import score_images
    from simulation.report import load_detections

    d = prior / spec.name
    dp = None
    if spec.private:
        dp = RF.read_record(RegimeMetrics, d / RF.METRICS_JSON).dp
        eps = None if dp is None else dp.get("epsilon")
        if eps != dp_epsilon:
            raise ConfigError(
                str(d / RF.METRICS_JSON),
                "dp.epsilon",
                f"{eps!r}, but this run asks for {dp_epsilon:g} (--dp-epsilon)",
            )
    images = load_detections(d / RF.DETECTIONS_JSON)
    results: dict[str, EvalResult | None] = {
        site: score_images(ims, n_boot=n_boot, seed=seed)
        for site, ims in images.items()
    }
    log.info("regime %s: scored images read from %s", spec.name, d)
    return results, dp


def _copy_records(src: Path, dst: Path) -> None:
    """A reused regime's per-round rows and sites' choices (the report reads them)."""
    from client.selection import SELECTION_JSON

    wanted = [src / RF.ROUNDS_JSONL]
    wanted += sorted(src.glob(f"{RF.SITE_STATE_DIR}/*/{SELECTION_JSON}"))
    for f in wanted:
        if f.is_file():
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)


def ensemble_results(
    members: list[dict[str, EvalResult | None]], n_boot: int, seed: int
) -> dict[str, EvalResult | None]:
    """Each site's members' scored test images fused (an ensemble regime).

    A site that one member did not score is not scored (``None``); with one
    member a site keeps that member's result.
    """
    from common.detector.engine import score_images
    from common.detector.ensemble import fuse

    out: dict[str, EvalResult | None] = {}
    for site in members[0]:
        results = [m.get(site) for m in members]
        if any(r is None for r in results):
            out[site] = None
            continue
        if len(results) == 1:
            out[site] = results[0]
            continue
        images = fuse([r.images for r in results if r is not None])
        out[site] = score_images(images, n_boot=n_boot, seed=seed)
    return out


def fewshot_sites(
    spec: R.Regime, fed: FederationConfig, caches: dict[str, Path]
) -> set[str]:
    """The sites where ensemble ``spec``'s federated member trains its head only.

    The federated trainer's automatic rule
    (:func:`common.detector.adapt.few_labels`, gated by its ``fewshot``
    option) on each site's labeled and unlabeled training images, with that
    member's options over the study's, as ``DetectorTrainer`` applies it.
    """
    member = next(
        (R.REGIMES[m] for m in spec.members if R.REGIMES[m].strategy is not None),
        None,
    )
    if member is None:
        return set()
    trainer = dataclasses.replace(
        fed.trainer, options={**fed.trainer.options, **member.options}
    )
    opts = detector_options(dataclasses.replace(fed, trainer=trainer), member.name)
    if not opts.fewshot or opts.dp:  # DP-SGD sites train every layer
        return set()
    adapt = opts.adapt_config(fed.seed)
    found = set()
    for name, cache in caches.items():
        ds = SiteDataset(cache, test_fraction=DEFAULT_TEST_FRACTION, seed=fed.seed)
        n_lab, n_unlab = len(ds.indices("labeled")), len(ds.indices("unlabeled"))
        if few_labels(n_lab, n_unlab, adapt, ssl=opts.ssl):
            found.add(name)
    return found


# --- central regimes ----------------------------------------------------------------
def base_model(
    req: RunRequest,
    opts: DetectorOptions,
    base_caches: list[Path],
    out: Path,
    **train_kw: Any,
) -> tuple[nn.Module, Path]:
    """Phase one: the base model, trained on ``base_caches`` or loaded.

    Written to ``<out>/base/model.pt`` (the file every later regime starts
    from); a ``req.base_checkpoint`` is checked against the federation's model
    options and copied there. Returns ``(model, path)``.
    """
    path = out / R.BASE / BASE_MODEL
    path.parent.mkdir(parents=True, exist_ok=True)
    if req.base_checkpoint is not None:
        model = build_detector(opts.model_config())
        init_from_checkpoint(model, opts.model_config(), req.base_checkpoint)
        if req.base_checkpoint.resolve() != path.resolve():
            shutil.copyfile(req.base_checkpoint, path)
        log.info("base model: %s (not trained here)", req.base_checkpoint)
        return model.to(train_kw["device"]), path
    model = train_central(base_caches, opts, label=R.BASE, **train_kw)
    save_checkpoint(
        path,
        model,
        opts.model_config(),
        extra={
            "trained_on": [str(c) for c in base_caches],
            "epochs": train_kw["epochs"],
            "seed": train_kw["seed"],
        },
    )
    return model, path


def trained_in(run: Path, regime: str) -> Path:
    """The run folder that trained ``regime``.

    ``run`` itself, or the run it was copied from (``run.json``'s ``reused``),
    followed through runs that copied it in turn.

    Raises:
        MammofedError: the ``reused`` records go round in a circle.
    """
    seen: list[Path] = []
    while run.resolve() not in seen:
        seen.append(run.resolve())
        source = RF.read_record(RF.StudyRun, run / RF.RUN_JSON).reused.get(regime)
        if source is None:
            return run
        run = Path(source)
    raise MammofedError(
        f"{regime}: the runs' 'reused' records go round in a circle "
        f"({' -> '.join(map(str, seen))})"
    )


def central_ssl(spec: R.Regime, opts: DetectorOptions, seed: int) -> AdaptConfig | None:
    """The semi-supervision of a central regime (``ssl``), else ``None``.

    The study's options with the regime's ``ssl_*`` options laid over them.
    """
    if not spec.ssl:
        return None
    over = {k: v for k, v in spec.options.items() if k.startswith("ssl")}
    return dataclasses.replace(opts, **over).adapt_config(seed)


def tuned_start(spec: R.Regime, site: str, source_run: Path, out: Path) -> Path:
    """Where ``spec`` (a :attr:`~R.Regime.tune_from` regime) starts ``site``.

    The federated regime's final model of that site, exported as the site
    exports it (``client.export.export_model``: its last complete global round
    plus its personal state) from the run folder that trained it
    (``source_run``, or the run it was copied from), to
    ``<out>/<regime>/start/<site>.pt``.

    Raises:
        MammofedError: that run kept no complete round or no state of the
            site (the message names the folder).
    """
    assert spec.tune_from is not None
    path = out / spec.name / "start" / f"{site}.pt"
    return export_site_model(spec.tune_from, site, source_run, path, spec.name)


def _evaluate_on(
    model: nn.Module, cache: Path, seed: int, n_boot: int, device: torch.device
) -> EvalResult | None:
    view = SiteDataset(cache, seed=seed).view("test")
    if len(view) == 0:
        log.warning("%s: no test images; site not evaluated", cache)
        return None
    return evaluate_detailed(model, view, device, n_boot=n_boot, seed=seed)


# --- the study ----------------------------------------------------------------------
def regime_config(
    base: FederationConfig,
    regime: str,
    req: RunRequest,
    run_dir: Path,
    sites: list[str],
) -> FederationConfig:
    """The federation config of federated ``regime`` (its table line over ``base``)."""
    spec = R.REGIMES.get(regime)
    if spec is None or spec.strategy is None:
        raise ConfigError(
            "mammofed-sim run", "--regime", f"{regime!r} is not federated"
        )
    asked = {k: getattr(req, attr) for k, attr in spec.from_request.items()}
    # the federation file's strategy settings (server optimizer, trimming)
    # hold for every regime; the regime sets the name and, for fedprox, mu
    strategy = dataclasses.replace(
        base.strategy,
        **{
            "name": spec.strategy,
            "proximal_mu": 0.0,
            **{
                k.removeprefix("strategy."): v
                for k, v in asked.items()
                if k.startswith("strategy.")
            },
        },
    )
    opts = {
        **base.trainer.options,
        **spec.options,
        **{k: v for k, v in asked.items() if not k.startswith("strategy.")},
    }
    n = len(sites)
    part = dataclasses.replace(
        base.participation,
        min_available_nodes=n,
        min_train_nodes=min(base.participation.min_train_nodes, n),
        min_valid_updates=min(base.participation.min_valid_updates, n),
        wait_for_nodes_s=min(base.participation.wait_for_nodes_s, 5.0),
    )
    return dataclasses.replace(
        base,
        name=regime,
        num_rounds=base.num_rounds,
        strategy=strategy,
        personalization=spec.personalization,
        participation=part,
        trainer=dataclasses.replace(base.trainer, options=opts),
        sites=tuple(sites),
        state_dir=run_dir / regime / RF.SITE_STATE_DIR,
        run_dir=run_dir / regime / RF.SERVER_DIR,
        resume=False,
    )


def _grid_inprocess(
    regime: str, fed: FederationConfig, caches: dict[str, Path], run_dir: Path
) -> list[dict[str, Any]]:
    """Run ``fed`` through the in-process grid; returns per-(round, site) rows."""
    from client.app import app as client_app
    from server.federation import run_federation
    from simulation.grid import InProcessGrid

    assert fed.state_dir is not None and fed.run_dir is not None
    sites = list(fed.sites)
    grid = InProcessGrid(
        client_app,
        {100 + i: (s, str(fed.state_dir), str(caches[s])) for i, s in enumerate(sites)},
        {RUN_FEDERATION_JSON: federation_config_to_json(fed)},
    )
    t0 = time.monotonic()
    run_federation(grid, fed, fed.run_dir)
    log.info("[%s] %d rounds in %.0f s", regime, fed.num_rounds, time.monotonic() - t0)
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    for e in grid.log:
        if e.round == 0:
            continue
        row = rows.setdefault((e.round, e.site), {"round": e.round, "site": e.site})
        if e.phase == "train":
            row["bytes_sent"] = e.bytes_sent
            row["train_seconds"] = e.seconds
        for k, v in e.metrics.items():
            if k != "num-examples" and isinstance(v, int | float):
                row[k] = None if isinstance(v, float) and math.isnan(v) else v
        if e.error:
            row["error"] = e.error
    # train statistics a site withheld (DP) were recorded in its own history,
    # which the study may read: the report plots the true values
    for hist in rows_from_site_states(fed):
        target = rows.get((hist["round"], hist["site"]))
        if target is not None:
            for k in (TRAIN_LOSS, SKIPPED_STEPS):
                if k in hist:
                    target[k] = hist[k]
    return [rows[k] for k in sorted(rows)]


def _grid_processes(
    engine: str,
    regime: str,
    fed: FederationConfig,
    caches: dict[str, Path],
    timeout_s: float,
) -> list[dict[str, Any]]:
    """Run ``fed`` where the sites are other processes; rows from their state.

    ``ray``: Flower's simulation engine; ``deployment``: a loopback SuperLink
    and one SuperNode per site. Rows: :func:`rows_from_site_states`.
    """
    assert fed.state_dir is not None and fed.run_dir is not None
    t0 = time.monotonic()
    if engine == R.ENGINE_RAY:
        from simulation.ray_engine import run_federated_ray

        run_federated_ray(fed, caches, fed.run_dir, timeout_s=timeout_s)
    else:
        from simulation.deploy_engine import run_federated_deployment

        run_federated_deployment(fed, caches, fed.run_dir, timeout_s=timeout_s)
    log.info(
        "[%s] %d rounds in %.0f s (%s)",
        regime,
        fed.num_rounds,
        time.monotonic() - t0,
        engine,
    )
    return rows_from_site_states(fed)


def rows_from_site_states(fed: FederationConfig) -> list[dict[str, Any]]:
    """Per-(round, site) rows of a run whose sites ran in other processes.

    Metrics (and the site-local ``seconds`` of each phase) come from each
    site's ``SiteState`` history (what the ClientApp recorded), rounds from the
    server's ``rounds.jsonl``; ``bytes_sent`` is the nbytes of the shared
    arrays (what a training site sends back; the same every round, read from
    the first trained round's checkpoint), and
    ``train_seconds`` / ``evaluate_seconds`` the site's own compute time.
    """
    import numpy as np

    from client.state import SiteState
    from server.checkpoints import CheckpointStore

    assert fed.state_dir is not None and fed.run_dir is not None
    store = CheckpointStore(fed.run_dir / RF.CHECKPOINT_DIR)
    rounds: list[int] = []
    jsonl = fed.run_dir / RF.ROUNDS_JSONL
    if jsonl.is_file():
        rounds = [int(row["round"]) for row in RF.iter_round_rows(jsonl)]
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    # every round's global model has the same names and shapes (the server
    # validates them), so one checkpoint gives the bytes of every reply
    sent: int | None = None
    for s in fed.sites:
        history = SiteState(fed.state_dir, s).read_meta().get("history", [])
        for h in history:
            rnd = int(h.get("round", 0))
            if rnd == 0 or (rounds and rnd not in rounds):
                continue
            row = rows.setdefault((rnd, s), {"round": rnd, "site": s})
            phase = h.get("phase")
            if phase == "train":
                if sent is None:
                    arrays = store.load(rnd).arrays
                    sent = int(sum(np.asarray(v).nbytes for v in arrays.values()))
                row["bytes_sent"] = sent
            for k, v in h.items():
                if k in ("round", "phase", "num-examples"):
                    continue
                if k == LOCAL_SECONDS:
                    row[f"{phase}_seconds"] = v
                    continue
                if isinstance(v, int | float):
                    row[k] = None if isinstance(v, float) and math.isnan(v) else v
    return [rows[k] for k in sorted(rows)]


def dp_record(fed: FederationConfig, target: float) -> dict[str, Any]:
    """The ``dp`` record of a DP regime, from every site's accountant on disk.

    ``epsilon``: the target; ``delta``: the largest (weakest) delta over the
    sites (each site's delta depends on its number of women); ``spent``:
    ``{site: epsilon spent}``; ``sites``: each accountant's summary
    (``common.detector.dp.read_accountant``). Sites that never trained are absent.
    """
    from common.detector.dp import read_accountant

    assert fed.state_dir is not None
    sites = {
        s: summary
        for s in fed.sites
        if (summary := read_accountant(fed.state_dir / s)) is not None
    }
    deltas = [v["delta"] for v in sites.values()]
    record: dict[str, Any] = {
        "epsilon": float(target),
        "delta": max(deltas) if deltas else None,
        "spent": {s: v["epsilon"] for s, v in sites.items()},
        "sites": sites,
    }
    log.info(
        "DP: target epsilon %g; spent %s",
        target,
        {s: round(e, 3) for s, e in record["spent"].items()},
    )
    return record


def _require_an_aggregated_round(regime: str, server_dir: Path) -> None:
    """Raise when no round of the run aggregated an update.

    A round without enough valid updates keeps the previous model, which is
    right for one bad round; a run in which *every* round did so scored the
    initial model, and its figures would be meaningless. The error names the
    first failures (node, check, reason) from the server's ``rounds.jsonl``.
    """
    path = server_dir / RF.ROUNDS_JSONL
    rows = list(RF.iter_round_rows(path))
    if any(r.get("status") == "aggregated" for r in rows):
        return
    problems = [p for r in rows for p in round_problems(r)]
    detail = "; ".join(problems[:3]) or "no failure was recorded"
    raise MammofedError(
        f"[{regime}] no round aggregated an update in {len(rows)} round(s) "
        f"({path}); first: {detail}"
    )


def run_federated(
    regime: str,
    fed: FederationConfig,
    caches: dict[str, Path],
    run_dir: Path,
    n_boot: int,
    *,
    engine: str = "inprocess",
    timeout_s: float = 3600.0,
    test_caches: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """One federated regime on ``engine``; returns each site's test evaluation.

    The sites train on ``caches``; they are scored on the test women of
    ``test_caches`` (default ``caches``), the same women under the same split.

    A site is scored with its own final model, as ``export`` would build it:
    the last global round plus its personal state (FedBN norms, personal
    head), or, when its sites choose (``trainer.options.select``), the
    candidate the site chose on its validation women for that round
    (:meth:`DetectorTrainer.select`: the choice recorded in its state by the
    last evaluate message, made here with the same code when none was).
    """
    # Flower is needed only here: central regimes run without it (e.g. on a GPU
    # box that carries torch but not the Flower stack).
    from server.checkpoints import CheckpointStore

    assert fed.state_dir is not None and fed.run_dir is not None
    for d in (fed.state_dir, fed.run_dir):
        if d.exists():
            shutil.rmtree(d)
    sites = list(fed.sites)
    if engine == "inprocess":
        rows = _grid_inprocess(regime, fed, caches, run_dir)
    elif engine in (R.ENGINE_RAY, R.ENGINE_DEPLOYMENT):
        rows = _grid_processes(engine, regime, fed, caches, timeout_s)
    else:
        raise ConfigError(
            "mammofed-sim run",
            "--engine",
            f"{engine!r} (valid: {', '.join(R.ENGINES)})",
        )
    _require_an_aggregated_round(regime, fed.run_dir)
    # per-(round, site) rows for the report
    RF.write_rounds(
        run_dir / regime / RF.ROUNDS_JSONL, [RF.StudyRound.from_json(r) for r in rows]
    )
    last = CheckpointStore(fed.run_dir / RF.CHECKPOINT_DIR).latest()
    if last is None:
        raise MammofedError(f"[{regime}] no global checkpoint was written")
    results: dict[str, EvalResult | None] = {}
    for s in sites:
        trainer = DetectorTrainer(s, fed.state_dir, fed, (test_caches or caches)[s])
        if not trainer.dataset.indices("test"):
            log.warning("[%s] site %s: no test images; not evaluated", regime, s)
            continue
        results[s] = trainer.evaluate_detailed(
            last.arrays, server_round=last.round, n_boot=n_boot, seed=fed.seed
        )
    return results


#: Settings a study sets itself: a ``--set`` of one would be recorded in the
#: run's resolved config and then overridden, so :func:`check_settings`
#: refuses it, saying how it is set.
RUN_SETS: dict[str, str] = {
    "name": "each regime names its federation",
    "sites": "the scenario's sites",
    "state_dir": "inside the run folder",
    "run_dir": "inside the run folder",
    "resume": "a study never resumes",
    "personalization": "each regime's (simulation.regimes)",
    "strategy.name": "each regime's (simulation.regimes)",
    "strategy.proximal_mu": "give --fedprox-mu",
    "seed": "give --seed or --seeds",
    "num_rounds": "give --rounds",
    "trainer.options.threads": "give --threads",
    "trainer.lr_schedule": "give --lr-schedule",
}


def _overlaps(key: str, owned: str) -> bool:
    """Dotted ``key`` is ``owned``, a section holding it, or a key inside it."""
    return key == owned or owned.startswith(f"{key}.") or key.startswith(f"{owned}.")


def check_settings(settings: tuple[str, ...], regimes: tuple[str, ...]) -> None:
    """Refuse a ``--set`` the run or one of ``regimes`` would override.

    Besides :data:`RUN_SETS`, a regime's own options (:attr:`Regime.options`,
    :attr:`Regime.from_request`) win over the federation config's: setting
    one for a run with that regime would be recorded and not used.

    Raises:
        ConfigError: the setting, and what sets it instead.
    """
    source = "mammofed-sim run --set"
    for text in settings:
        key = ".".join(parse_setting(text, source)[0])
        for owned, how in RUN_SETS.items():
            if _overlaps(key, owned):
                raise ConfigError(source, key, f"is set by the run itself ({how})")
        for regime in regimes:
            spec = R.REGIMES[regime]
            for name in (*spec.options, *spec.from_request):
                owned = name if "." in name else f"trainer.options.{name}"
                if _overlaps(key, owned):
                    raise ConfigError(
                        source,
                        key,
                        f"regime {regime} sets {owned} itself; run it without "
                        "this --set",
                    )


def resolve_request(
    req: RunRequest,
) -> tuple[FederationConfig, DetectorOptions, tuple[str, ...]]:
    """What ``req`` runs, checked as far as it can be before any work.

    Returns the federation config, detector options and regimes (members
    added): the federation file with the ``--set`` settings and the flags applied;
    the regimes known, the options valid for every regime asked (each
    federated regime's as its sites will check them) and building a detector.
    :func:`run_seeds` calls it before generating any site, :func:`run_study`
    at its start.

    Raises:
        ConfigError: naming the file (``with --set`` when settings were
            given), flag or setting, and the value.
    """
    # errors in options set on the command line name the flag, not the file
    fed_source = f"{req.federation} with --set" if req.settings else str(req.federation)
    fed = apply_settings(
        load_federation_config(req.federation), req.settings, "mammofed-sim run --set"
    )
    fed = replace_validated(
        fed,
        "mammofed-sim run flags",
        **{
            k: v
            for k, v in (("num_rounds", req.rounds), ("seed", req.seed))
            if v is not None
        },
    )
    if req.lr_schedule is not None:
        fed = dataclasses.replace(
            fed,
            trainer=replace_validated(
                fed.trainer,
                "mammofed-sim run --lr-schedule",
                lr_schedule=req.lr_schedule,
            ),
        )
    if req.threads is not None:
        if req.threads < 1:
            raise ConfigError(
                "mammofed-sim run", "--threads", f"must be >= 1, got {req.threads}"
            )
        fed = dataclasses.replace(
            fed,
            trainer=dataclasses.replace(
                fed.trainer, options={**fed.trainer.options, "threads": req.threads}
            ),
        )
    if fed.trainer.name != DETECTOR_TRAINER:
        raise ConfigError(
            fed_source,
            "trainer.name",
            f"mammofed-sim run needs the 'detector' trainer, got {fed.trainer.name!r}",
        )
    if req.engine not in R.ENGINES:
        raise ConfigError(
            "mammofed-sim run",
            "--engine",
            f"{req.engine!r} (valid: {', '.join(R.ENGINES)})",
        )
    unknown = [r for r in req.regimes if r not in R.ORDER]
    if unknown:
        raise ConfigError(
            "mammofed-sim run",
            "--regime",
            f"unknown regime {unknown[0]!r} (valid: {', '.join(R.ORDER)})",
        )
    regimes = R.with_members(req.regimes)
    head_only = [r for r in regimes if R.REGIMES[r].head_only]
    if head_only and not req.start_from_base:
        raise ConfigError(
            "mammofed-sim run",
            "--regime",
            f"{head_only[0]} tunes the base model's head: it needs the base "
            "model (drop --from-scratch)",
        )
    if len(regimes) > len(set(req.regimes)):
        log.info(
            "running %s too: the regimes asked for are made from them",
            ", ".join(r for r in regimes if r not in req.regimes),
        )
    check_settings(req.settings, regimes)
    opts = detector_options(fed, fed_source)
    try:
        build_detector(opts.model_config())
    except (ConfigError, ValueError) as exc:
        raise ConfigError(
            fed_source, "trainer.options", f"do not build a detector: {exc}"
        ) from None
    if any(R.REGIMES[r].kind == "central" for r in regimes):
        # before any work: the base, local-only and oracle regimes would
        # otherwise stop the study part-way
        check_central_options(opts, fed_source)
    for regime in regimes:  # what each federated regime's sites will check
        if R.REGIMES[regime].strategy is None:
            continue
        cfg = regime_config(fed, regime, req, req.out, [])
        site_opts = detector_options(cfg, fed_source)
        try:
            check_site_options(site_opts, cfg.personalization)
        except ConfigError as exc:
            raise ConfigError(
                fed_source, exc.key, f"{exc.detail} (regime {regime})"
            ) from None
    return fed, opts, regimes


def run_study(req: RunRequest) -> Path:
    """Run every requested regime; returns the run folder."""
    t_start = time.monotonic()
    out = req.out
    out.mkdir(parents=True, exist_ok=True)
    data = req.data or out / "data"
    fed, opts, regimes = resolve_request(req)
    if req.threads is not None:
        torch.set_num_threads(req.threads)
    scenario, caches, oracle = prepare_sites(req.scenario, data, req.workers)
    sites = [s.name for s in scenario.sites]
    base_sites = [s.name for s in scenario.sites if s.role == ROLE_BASE] or sites[:1]
    (out / RF.CONFIGS_DIR).mkdir(exist_ok=True)
    shutil.copy(req.scenario, out / RF.CONFIGS_DIR / "scenario.yaml")
    write_resolved(fed, out / RF.CONFIGS_DIR, "federation.yaml")
    run = RF.StudyRun(
        scenario=scenario.name,
        sites=sites,
        regimes=list(regimes),
        working_spacing_mm=scenario.working_spacing_mm,
        base_sites=base_sites,
        dp_epsilon=req.dp_epsilon
        if any(R.REGIMES[r].private for r in regimes)
        else None,
    )
    RF.write_record(out / RF.RUN_JSON, run)
    # the same device rule as the federated sites (DetectorTrainer)
    device = resolve_device(opts.device)
    rounds = fed.num_rounds
    epochs = rounds * fed.trainer.local_epochs
    common_kw: dict[str, Any] = dict(
        epochs=epochs,
        lr=fed.trainer.learning_rate,
        batch_size=fed.trainer.batch_size,
        seed=fed.seed,
        device=device,
    )
    # what each central regime trains on: {label: (caches, sites tested)}
    pools: dict[str, dict[str, tuple[list[Path], list[str]]]] = {
        "base": {R.BASE: ([caches[s] for s in base_sites], sites)},
        "oracle": {R.ORACLE: ([oracle[s] for s in sites], sites)},
        "each": {s: ([caches[s]], [s]) for s in sites},
        # a per-site regime's all-labels version: the same women, every one labeled
        "each-all-labels": {s: ([oracle[s]], [s]) for s in sites},
    }
    timings: dict[str, float] = {}
    init: Path | None = None
    base: nn.Module | None = None
    if req.reuse and req.base_checkpoint is None and req.start_from_base:
        # the earlier run's base model: its regimes started from it
        first = req.reuse[0] / R.BASE / BASE_MODEL
        if not first.is_file():
            raise ConfigError(
                str(req.reuse[0]), f"{R.BASE}/{BASE_MODEL}", "missing: no base model"
            )
        req = dataclasses.replace(req, base_checkpoint=first)
        log.info("base model: %s (the first --reuse run's)", first)
    if req.start_from_base or req.base_checkpoint is not None:
        t0 = time.monotonic()
        log.info("=== phase one: the base model ===")
        base, init = base_model(req, opts, pools["base"][R.BASE][0], out, **common_kw)
        timings["base-model"] = round(time.monotonic() - t0, 1)
        if not req.start_from_base:
            init = None
    priors = [check_reuse(p, out, init) for p in req.reuse]
    reused: dict[str, str] = {}
    scored: dict[str, dict[str, EvalResult | None]] = {}
    specs = [R.REGIMES[r] for r in regimes]
    found = {
        s.name: next(
            (p for p in priors if (p / s.name / RF.DETECTIONS_JSON).is_file()), None
        )
        for s in specs
    }
    weight = {
        s.name: regime_weight(s, reused=found[s.name] is not None and not s.members)
        for s in specs
    }
    eta = Eta(sum(weight.values()))
    for k, spec in enumerate(specs, 1):
        regime = spec.name
        t0 = time.monotonic()
        label = f"{regime} (epsilon {req.dp_epsilon:g})" if spec.private else regime
        log.info("=== regime %s (%d of %d) ===", label, k, len(specs))
        dp = None
        metrics: dict[str, EvalResult | None] = {}
        prior = found[regime]
        if prior is not None and not spec.members:
            check_requested(prior, spec, req)
            metrics, dp = reused_results(
                prior, spec, req.n_boot, fed.seed, req.dp_epsilon
            )
            reused[regime] = str(prior.resolve())
            _copy_records(prior / regime, out / regime)
        elif spec.members:
            metrics = ensemble_results(
                [scored[m] for m in spec.members], req.n_boot, fed.seed
            )
            if spec.fewshot_members:
                few = sorted(fewshot_sites(spec, fed, caches))
                log.info(
                    "%s: few-shot sites %s run %s", regime, few, spec.fewshot_members
                )
                picked = [
                    {s: scored[m].get(s) for s in few} for m in spec.fewshot_members
                ]
                metrics.update(ensemble_results(picked, req.n_boot, fed.seed))
        elif spec.name == R.BASE and base is not None:
            for s in sites:
                metrics[s] = _evaluate_on(base, caches[s], fed.seed, req.n_boot, device)
        elif spec.train_on is not None:
            pool = pools["each-all-labels" if spec.all_labels else spec.train_on]
            for name, (train_on, tested) in pool.items():
                start = init
                if spec.tune_from is not None:
                    source = Path(reused.get(spec.tune_from, out))
                    start = tuned_start(spec, name, source, out)
                pseudo = []
                if spec.pseudo_from is not None:
                    pseudo = pseudo_for_site(
                        spec,
                        name,
                        caches[name],
                        sources={k: Path(v) for k, v in reused.items()},
                        out=out,
                        spacing_mm=opts.working_spacing_mm,
                        seed=fed.seed,
                        device=device,
                        oracle=oracle[name],
                    )
                model = train_central(
                    train_on,
                    opts,
                    label=f"{regime}/{name}" if spec.train_on == "each" else name,
                    init=start,
                    head_only=spec.head_only,
                    ssl=central_ssl(spec, opts, fed.seed),
                    pseudo=pseudo,
                    **{**common_kw, "lr": common_kw["lr"] * spec.lr_factor},
                )
                kept = central_model_path(out, regime, name)
                kept.parent.mkdir(parents=True, exist_ok=True)
                save_checkpoint(kept, model, opts.model_config())
                for s in tested:
                    metrics[s] = _evaluate_on(
                        model, caches[s], fed.seed, req.n_boot, device
                    )
        else:
            cfg = regime_config(fed, regime, req, out, sites)
            if init is not None:
                cfg = dataclasses.replace(cfg, initial_checkpoint=init.resolve())
            (out / regime).mkdir(parents=True, exist_ok=True)
            metrics = run_federated(
                regime,
                cfg,
                oracle if spec.all_labels else caches,
                out,
                req.n_boot,
                engine=req.engine,
                timeout_s=req.engine_timeout_s,
                test_caches=caches,
            )
            dp = dp_record(cfg, req.dp_epsilon) if spec.private else None
        _write_regime(out, spec, metrics, dp)
        scored[regime] = metrics
        timings[regime] = round(time.monotonic() - t0, 1)
        log.info(
            "=== regime %s done in %.0f s (%d of %d; %s for the rest) ===",
            regime, timings[regime], k, len(specs), eta.step(weight[regime]),
        )  # fmt: skip
    total = round(time.monotonic() - t_start, 1)
    run = dataclasses.replace(run, seconds={**timings, "total": total}, reused=reused)
    RF.write_record(out / RF.RUN_JSON, run)
    return out


#: Wall time of a regime relative to ``local-only``'s, measured in ``make
#: study`` (three seeds, three at a time on 2 cores, 80 min in all at stop 28;
#: ``benchmarks/results/study_time.jsonl``): what the study's ETA weighs the
#: regimes still to run by. A regime not named here is weighed by its kind
#: (:func:`regime_weight`).
MEASURED_WEIGHT: dict[str, float] = {
    R.BASE: 0.18,
    R.LOCAL_ONLY: 1.0,
    R.FEDAVG: 2.2,
    R.FEDPROX: 1.7,
    R.PERSONALIZED: 2.4,
    R.PERSONALIZED_SSL: 2.3,
    R.PERSONALIZED_DP: 2.7,
    R.PERSONALIZED_DP_TUNED: 1.0,
    R.ORACLE: 1.4,
}


def regime_weight(spec: R.Regime, *, reused: bool = False) -> float:
    """How much of a study's time ``spec`` takes, in ``local-only`` units.

    Measured ones from :data:`MEASURED_WEIGHT`; otherwise a reused regime
    0.05, an ensemble (its members' detections fused, then scored) 0.15, a
    central one 1 (2 with semi-supervision), a federated one like
    ``personalized-dp`` when private, else like ``personalized`` when the
    sites keep a personal part, else like ``fedavg``.
    """
    if reused:
        return 0.05
    if spec.name in MEASURED_WEIGHT:
        return MEASURED_WEIGHT[spec.name]
    if spec.kind == "ensemble":
        return 0.15
    if spec.kind == "central":
        return 2.0 if spec.ssl else 1.0
    if spec.private:
        return MEASURED_WEIGHT[R.PERSONALIZED_DP]
    personal = spec.personalization.local_norm or spec.personalization.personal_head
    return MEASURED_WEIGHT[R.PERSONALIZED if personal else R.FEDAVG]


def run_seeds(
    req: RunRequest, seeds: tuple[int, ...] | None, *, parallel: int = 1
) -> list[Path]:
    """Run the study once (``seeds`` None) or once per seed; returns the run folders.

    Each seed runs into ``<out>/seed-<s>/`` with one data folder
    (``req.data`` or ``<out>/data``), so every seed scores the same test women
    and the report can pair regimes over seeds and images. ``parallel`` > 1
    runs that many seeds at once, each in its own process (the sites are
    generated and ingested once, first); each gets ``req.threads`` torch
    threads, or the machine's cores shared out between them. A seed's result
    does not depend on how many ran beside it.
    """
    if not seeds:
        return [run_study(req)]
    if parallel < 1:
        raise ConfigError(
            "mammofed-sim run", "--parallel", f"must be >= 1, got {parallel}"
        )
    data = req.data or req.out / "data"
    reqs = [
        dataclasses.replace(
            req,
            seed=seed,
            data=data,
            out=req.out / f"seed-{seed}",
            reuse=tuple(p / f"seed-{seed}" for p in req.reuse),
        )
        for seed in seeds
    ]
    t0 = time.monotonic()

    def done(i: int, at_once: int = 1) -> None:
        # seeds run in waves of ``at_once``: the i-th result ends wave
        # ceil(i / at_once) (the rest of a wave is about to end with it)
        spent = time.monotonic() - t0
        waves, wave = -(-len(seeds) // at_once), -(-i // at_once)
        left = spent / wave * (waves - wave)
        log.info("seeds done %d/%d in %.0f s; ETA %.0f s", i, len(seeds), spent, left)

    if parallel == 1 or len(seeds) == 1:
        runs = []
        for i, r in enumerate(reqs):
            log.info("##### seed %d (%d of %d) #####", r.seed, i + 1, len(seeds))
            runs.append(run_study(r))
            done(i + 1)
        return runs
    import concurrent.futures as cf
    import multiprocessing as mp

    workers = min(parallel, len(seeds))
    threads = req.threads or max(1, (os.cpu_count() or 1) // workers)
    resolve_request(req)  # a bad setting stops here, before any site is made
    prepare_sites(req.scenario, data, req.workers)  # once, before the seeds race
    reqs = [dataclasses.replace(r, threads=threads) for r in reqs]
    log.info(
        "##### seeds %s: %d at a time, %d torch thread(s) each #####",
        ",".join(map(str, seeds)),
        workers,
        threads,
    )
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_run_seed, r): r for r in reqs}
        try:
            for i, fut in enumerate(cf.as_completed(futures), 1):
                fut.result()
                log.info("##### seed %d finished #####", futures[fut].seed)
                done(i, workers)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return [r.out for r in reqs]


def _run_seed(req: RunRequest) -> Path:
    """One seed in a worker process (its log lines name the seed).

    A worker runs several seeds one after the other, so the log format is
    replaced for each (``force``), else every line would name its first seed.
    """
    import sys

    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s [seed {req.seed}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    return run_study(req)
