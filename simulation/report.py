"""Turn one or more run folders into ``report.md`` + ``report.json`` + PNG plots.

Input: run folders in the layout of :mod:`common.wire.runfolder` (its records).
Output (``out_dir``):

* ``report.json``: ``{"sites": [...], "regimes": [...], "table": {site: {regime:
  {class: {"cpm", "cpm_ci", "sensitivity", "ap", "gap_closed"}}}}, "paired":
  [...], "rounds": ...}``; ``paired`` (:func:`paired_comparisons`) compares
  regimes image by image where the run kept ``<regime>/detections.json``.
* ``report.md``: the CPM table (site x regime, with 95% intervals and "gap
  closed" = (regime - base) / (oracle - base); in a ``-select`` regime's cells
  the model each site chose), the sites' choices with their validation scores,
  FROC plots per site, per-round curves, bytes sent per round and the configs
  used.
* ``froc_<site>.png``, ``rounds_<metric>.png``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from client.selection import BASE, SELECTION_JSON, Selection  # noqa: E402
from common.detector.froc import (  # noqa: E402
    ClassMetrics,
    FrocImage,
    pooled_gap_closed,
    pooled_paired_cpm_difference,
)
from common.fileio import json_safe  # noqa: E402
from common.keys import CLASSES  # noqa: E402
from common.progress import Eta  # noqa: E402
from common.wire import runfolder as RF  # noqa: E402
from common.wire.runfolder import (  # noqa: E402
    RunFolderError,
    SiteMetrics,
    StudyRound,
    StudyRun,
)
from simulation import regimes as R  # noqa: E402

log = logging.getLogger(__name__)


def collect(run_dirs: list[Path]) -> dict[str, Any]:
    """Gather metrics of every regime found in ``run_dirs``.

    Returns ``{"metrics": {regime: {site: SiteMetrics}}, "seed_metrics":
    {regime: [{site: SiteMetrics} per run]}, "detections": {regime: [path of
    each run's detections.json]}, "rounds": {regime: [StudyRound]}, "configs":
    [paths], "runs": [StudyRun], "dp": {regime: dp record}, "choices":
    {regime: [{site: Selection} per run]}}``; ``choices`` holds the regimes
    whose sites chose their model (``<regime>/site-state/<site>/selection.json``,
    :class:`client.selection.Selection`). Several runs of
    one regime are its seeds (``mammofed-sim run --seeds``, the same test
    women): the table averages them and the paired comparisons pool them;
    ``metrics``, ``rounds`` and ``dp`` keep the last run given.
    """
    metrics: dict[str, dict[str, SiteMetrics]] = {}
    seed_metrics: dict[str, list[dict[str, SiteMetrics]]] = {}
    detections: dict[str, list[Path]] = {}
    privacy: dict[str, Any] = {}
    rounds: dict[str, list[StudyRound]] = {}
    configs: list[Path] = []
    runs: list[StudyRun] = []
    choices: dict[str, list[dict[str, Selection]]] = {}
    given = {r.resolve() for r in run_dirs}
    for run in run_dirs:
        if not run.is_dir():
            raise RunFolderError(f"{run}: not a run folder")
        copied: dict[str, str] = {}
        if (run / RF.RUN_JSON).is_file():
            runs.append(RF.read_record(StudyRun, run / RF.RUN_JSON))
            copied = runs[-1].reused
        configs.extend(sorted((run / RF.CONFIGS_DIR).glob("*.yaml")))
        found = sorted(p.parent for p in run.glob(f"*/{RF.METRICS_JSON}"))
        if not found:
            raise RunFolderError(f"{run}: no <regime>/{RF.METRICS_JSON} inside")
        for regime_dir in found:
            source = copied.get(regime_dir.name)
            if source is not None and Path(source).resolve() in given:
                # the same scored images as that run's: one seed, counted once
                log.info(
                    "%s: read from %s, which is given too; counted once",
                    regime_dir,
                    source,
                )
                continue
            data = RF.read_record(RF.RegimeMetrics, regime_dir / RF.METRICS_JSON)
            name = data.regime
            metrics[name] = data.sites
            seed_metrics.setdefault(name, []).append(data.sites)
            if data.dp:
                privacy[name] = data.dp
            det_path = regime_dir / RF.DETECTIONS_JSON
            if det_path.is_file():
                detections.setdefault(name, []).append(det_path)
            rows_path = regime_dir / RF.ROUNDS_JSONL
            if rows_path.is_file():
                rounds[name] = RF.read_rounds(rows_path)
            chosen = {
                p.parent.name: Selection.read(p)
                for p in sorted(
                    regime_dir.glob(f"{RF.SITE_STATE_DIR}/*/{SELECTION_JSON}")
                )
            }
            if chosen:
                choices.setdefault(name, []).append(chosen)
    # a regime pairs over runs only if every run of it kept its detections
    detections = {k: v for k, v in detections.items() if len(v) == len(seed_metrics[k])}
    return {
        "metrics": metrics,
        "seed_metrics": seed_metrics,
        "detections": detections,
        "rounds": rounds,
        "configs": configs,
        "runs": runs,
        "dp": privacy,
        "choices": choices,
    }


def _ordered(names: list[str]) -> list[str]:
    known = [r for r in R.ORDER if r in names]
    return known + sorted(n for n in names if n not in R.ORDER)


def _cpm(sites: dict[str, SiteMetrics], site: str, cls: str) -> float:
    try:
        v = sites[site].classes[cls].cpm
    except KeyError:
        return math.nan
    return math.nan if v is None else float(v)


def _mean_or_none(values: list[float | None]) -> float | None:
    """Mean of the defined values; None when none is (e.g. a class without lesions)."""
    defined = [float(v) for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(defined)) if defined else None


def _mean_sensitivities(
    runs: list[dict[str, float | None]],
) -> dict[str, float | None]:
    """Per FP/image rate, the mean sensitivity over the runs (:func:`_mean_or_none`)."""
    rates = list(dict.fromkeys(k for r in runs for k in r))
    return {k: _mean_or_none([r.get(k) for r in runs]) for k in rates}


#: Smallest oracle - base CPM difference for which "gap closed" is reported;
#: below it the ratio is dominated by noise (tiny test sets) and shown as "–".
MIN_GAP = 0.05


def gap_closed(value: float, base: float, oracle: float) -> float:
    """``(value - base) / (oracle - base)``; NaN when undefined or the gap < MIN_GAP."""
    if any(math.isnan(v) for v in (value, base, oracle)) or oracle - base < MIN_GAP:
        return math.nan
    return (value - base) / (oracle - base)


def build_table(
    metrics: dict[str, dict[str, SiteMetrics]],
    seed_metrics: dict[str, list[dict[str, SiteMetrics]]] | None = None,
) -> dict[str, Any]:
    """Site x regime x class table with CPM, CI, sensitivities, AP and gap closed.

    A regime with several runs in ``seed_metrics`` gets the mean CPM over its
    runs, ``cpm_runs`` (each run's) and ``cpm_ci`` = the lowest and highest run.
    """
    seed_metrics = seed_metrics or {}
    regimes = _ordered(list(metrics))
    sites = sorted({s for r in metrics.values() for s in r})

    def runs_of(regime: str) -> list[dict[str, SiteMetrics]]:
        return seed_metrics.get(regime, [metrics.get(regime, {})])

    def cpm(regime: str, site: str, cls: str) -> tuple[float, list[float]]:
        runs = [_cpm(m, site, cls) for m in runs_of(regime)]
        return (float(np.mean(runs)) if runs else math.nan), runs

    def class_runs(regime: str, site: str, cls: str) -> list[ClassMetrics]:
        return [
            c
            for m in runs_of(regime)
            if site in m and (c := m[site].classes.get(cls)) is not None
        ]

    table: dict[str, Any] = {}
    for site in sites:
        table[site] = {}
        for regime in regimes:
            entry = metrics[regime].get(site)
            if entry is None:
                continue
            row: dict[str, Any] = {"n_images": entry.n_images}
            for cls in CLASSES:
                c = entry.classes.get(cls)
                if c is None:
                    continue
                mean, runs = cpm(regime, site, cls)
                ci = None if c.cpm_ci95 is None else list(c.cpm_ci95)
                if len(runs) > 1:
                    ci = [min(runs), max(runs)]
                row[cls] = {
                    "cpm": mean,
                    "cpm_ci": ci,
                    "cpm_runs": runs,
                    # like the CPM, the mean over the runs (not the last run's)
                    "sensitivity": _mean_sensitivities(
                        [r.sensitivity_at_fp for r in class_runs(regime, site, cls)]
                        or [c.sensitivity_at_fp]
                    ),
                    "ap": _mean_or_none(
                        [r.ap for r in class_runs(regime, site, cls)] or [c.ap]
                    ),
                    "gap_closed": gap_closed(
                        mean, cpm(R.BASE, site, cls)[0], cpm(R.ORACLE, site, cls)[0]
                    ),
                }
            table[site][regime] = row
    return {"sites": sites, "regimes": regimes, "table": table}


#: Paired comparisons the report makes when both regimes kept their
#: detections: (regime, against), in report order.
PAIRS: tuple[tuple[str, str], ...] = (
    (R.RECOMMENDED, R.BASE),
    (R.RECOMMENDED, R.LOCAL_ONLY),
    (R.RECOMMENDED, R.ORACLE),
    (R.RECOMMENDED, R.PERSONALIZED),
    (R.RECOMMENDED, R.FEDAVG),
    (R.RECOMMENDED, R.PERSONALIZED_DP),
    # the same recipe around the DP federation (recommended until stop 35)
    (R.RECOMMENDED, R.PERSONALIZED_DP_TUNED_LOCAL),
    (R.RECOMMENDED, R.PERSONALIZED_SSL),
    # the three fused at every site (recommended from stop 35 until stop 42)
    (R.RECOMMENDED, R.PERSONALIZED_SSL_TUNED_LOCAL),
    (R.PERSONALIZED_SSL_TUNED_LOCAL, R.BASE),
    (R.PERSONALIZED_SSL_TUNED_LOCAL, R.LOCAL_ONLY),
    (R.PERSONALIZED_DP_TUNED_LOCAL, R.BASE),
    (R.PERSONALIZED_DP_TUNED_LOCAL, R.LOCAL_ONLY),
    (R.PERSONALIZED_DP_TUNED_LOCAL, R.ORACLE),
    (R.PERSONALIZED_SSL_TUNED, R.PERSONALIZED_SSL),
    (R.PERSONALIZED_DP, R.BASE),
    (R.PERSONALIZED_DP, R.LOCAL_ONLY),
    (R.PERSONALIZED_DP, R.ORACLE),
    (R.PERSONALIZED, R.ORACLE),
    (R.PERSONALIZED, R.LOCAL_ONLY),
    (R.PERSONALIZED, R.FEDAVG),
    (R.PERSONALIZED, R.BASE),
    (R.LOCAL_ONLY, R.BASE),
    (R.PERSONALIZED_SSL, R.ORACLE),
    (R.PERSONALIZED_SSL, R.LOCAL_ONLY),
    (R.PERSONALIZED_SSL, R.PERSONALIZED),
    (R.PERSONALIZED_ALL_LABELS, R.PERSONALIZED),
    (R.PERSONALIZED_ALL_LABELS, R.PERSONALIZED_SSL),
    (R.PERSONALIZED_DP, R.PERSONALIZED),
    (R.PERSONALIZED_SELECT, R.BASE),
    (R.PERSONALIZED_SELECT, R.LOCAL_ONLY),
    (R.PERSONALIZED_SELECT, R.PERSONALIZED),
    (R.FEDAVG_SELECT, R.BASE),
    (R.FEDAVG_SELECT, R.FEDAVG),
    (R.RECOMMENDED, R.PERSONALIZED_SELECT),
    (R.FEDAVGM, R.FEDAVG),
    (R.FEDADAM, R.FEDAVG),
    # the few-shot alternative for the site's own model: head only
    (R.LOCAL_HEAD, R.LOCAL_ONLY),
    (R.LOCAL_HEAD, R.BASE),
    (R.PERSONALIZED_DP_LOCAL_HEAD, R.PERSONALIZED_DP_LOCAL),
    (R.PERSONALIZED_DP_LOCAL_HEAD, R.BASE),
    # fine-tuning after federation, alone and in the ensembles
    (R.PERSONALIZED_DP_TUNED_LOCAL, R.PERSONALIZED_DP_LOCAL),
    (R.PERSONALIZED_DP_TUNED_PAIR, R.PERSONALIZED_DP_TUNED_LOCAL),
    (R.PERSONALIZED_DP_TUNED, R.PERSONALIZED_DP),
    (R.PERSONALIZED_DP_TUNED, R.LOCAL_ONLY),
    # semi-supervision in the on-site tuning (measured, no gain)
    (R.PERSONALIZED_DP_TUNED_SSL, R.PERSONALIZED_DP_TUNED),
    (R.PERSONALIZED_DP_TUNED_SSL_LOCAL, R.PERSONALIZED_DP_TUNED_LOCAL),
    # the ceiling: what the goal's tests give the oracle (all labels pooled)
    (R.ORACLE, R.BASE),
    (R.ORACLE, R.LOCAL_ONLY),
)

#: The goal (issue 14): on every non-base site the recommended regime's mass
#: CPM beats the base's and local-only's (paired interval above 0) and reaches
#: this fraction of the oracle's.
ORACLE_FRACTION_GOAL = 0.9

#: The regimes a report's goal can be about, first choice first: the
#: recommended regime, then the ones recommended before it (stops 35-41's
#: runs, then stop 34's).
HEADLINE: tuple[str, ...] = (
    R.RECOMMENDED,
    R.PERSONALIZED_SSL_TUNED_LOCAL,
    R.PERSONALIZED_DP_TUNED_LOCAL,
)


def headline_regime(rows: list[dict[str, Any]]) -> str:
    """The regime the goal and its plot are about.

    The first of :data:`HEADLINE` that ran (``rows``:
    :func:`paired_comparisons` rows): the recommended regime, in runs made
    before it the one recommended then, else ``personalized``.
    """
    ran = {r["regime"] for r in rows}
    return next((g for g in HEADLINE if g in ran), R.PERSONALIZED)


def goal_verdicts(
    rows: list[dict[str, Any]], base_sites: set[str]
) -> list[dict[str, Any]]:
    """Per non-base site, the goal's three mass-CPM tests for the recommended regime.

    ``rows``: :func:`paired_comparisons`. Each verdict: ``{"site", "regime",
    "beats_base", "beats_local", "oracle_ratio", "reaches_oracle", "met",
    "oracle_beats_base", "oracle_beats_local"}``; a test whose pair was not
    run is ``None`` (and the goal not met). The last two are the ceiling: the
    same tests for the oracle (every site's labels pooled). Where the oracle
    itself does not beat the base (or local-only) with the interval above 0,
    a regime can pass that test only by beating the oracle. The recommended
    regime is :func:`headline_regime`'s.
    """
    regime = headline_regime(rows)
    mass = {
        (r["regime"], r["site"], r["against"]): r
        for r in rows
        if r["regime"] in (regime, R.ORACLE)
        and r["class"] == CLASSES[0]
        and r["site"] not in base_sites
    }
    out: list[dict[str, Any]] = []
    for site in sorted({s for g, s, _ in mass if g == regime}):

        def above_zero(against: str, site: str = site, of: str = regime) -> bool | None:
            r = mass.get((of, site, against))
            return None if r is None else bool(r["ci95"][0] > 0)

        oracle = mass.get((regime, site, R.ORACLE))
        ratio = math.nan if oracle is None else float(oracle["ratio"])
        v: dict[str, Any] = {
            "site": site,
            "regime": regime,
            "beats_base": above_zero(R.BASE),
            "beats_local": above_zero(R.LOCAL_ONLY),
            "oracle_ratio": ratio,
            "reaches_oracle": None if oracle is None else ratio >= ORACLE_FRACTION_GOAL,
        }
        v["met"] = all(
            v[k] is True for k in ("beats_base", "beats_local", "reaches_oracle")
        )
        v["oracle_beats_base"] = above_zero(R.BASE, of=R.ORACLE)
        v["oracle_beats_local"] = above_zero(R.LOCAL_ONLY, of=R.ORACLE)
        out.append(v)
    return out


#: The forest plot of the recommended regime's paired differences.
PAIRED_PNG = "paired_recommended.png"

#: Semi-supervision's test (issue 14): on the partly labeled site the
#: semi-supervised regime closes at least this share of the gap between the
#: same regime on the labeled women only and with every woman labeled.
SSL_GAP_GOAL = 0.6
#: (labeled women only, semi-supervised, every training woman labeled)
SSL_GAP: tuple[str, str, str] = (
    R.PERSONALIZED,
    R.PERSONALIZED_SSL,
    R.PERSONALIZED_ALL_LABELS,
)


def ssl_gap_rows(
    paired: list[dict[str, Any]],
    detections: Mapping[str, list[Path]],
    base_sites: set[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Share of the labels' gap that semi-supervision closes, per site and class.

    ``paired``: :func:`paired_comparisons` rows (the gap, all labels −
    labeled only, is one of :data:`PAIRS`, with its paired interval);
    ``detections``: each regime's ``detections.json`` per run; needs the
    three regimes of :data:`SSL_GAP` with as many runs each (else ``[]``,
    logged). Per non-base site and class with a gap row: the three CPMs
    (means over runs), ``gap`` and its interval, ``closed`` =
    (semi-supervised − labeled only) / gap with its interval
    (:func:`common.detector.froc.pooled_gap_closed`), ``gap_resolved``
    (the gap's interval above 0) and ``met`` (gap resolved and ``closed``
    at least :data:`SSL_GAP_GOAL`). A site without unlabeled women has no
    gap to close: its two label versions train on the same women.
    """
    if any(r not in detections for r in SSL_GAP):
        return []
    counts = {r: len(detections[r]) for r in SSL_GAP}
    if len(set(counts.values())) != 1:
        log.warning("semi-supervision gap: unequal run counts %s; not computed", counts)
        return []
    gaps = {
        (r["site"], r["class"]): r
        for r in paired
        if (r["regime"], r["against"]) == (SSL_GAP[2], SSL_GAP[0])
    }
    low, mid, high = ([load_detections(p) for p in detections[r]] for r in SSL_GAP)
    sites = set.intersection(*(set(d) for d in low + mid + high)) - base_sites
    rows: list[dict[str, Any]] = []
    for site in sorted(sites):
        for label, cls in enumerate(CLASSES):
            gap = gaps.get((site, cls))
            if gap is None:  # not paired (logged by paired_comparisons)
                continue
            runs = [[d[site] for d in x] for x in (low, mid, high)]
            try:
                g = pooled_gap_closed(
                    runs[0], runs[1], runs[2], label, n_boot=n_boot, seed=seed
                )
            except ValueError as exc:
                log.warning("semi-supervision gap, site %s: %s", site, exc)
                break
            resolved = bool(gap["ci95"][0] > 0)
            rows.append(
                {
                    "site": site,
                    "class": cls,
                    "cpm_labeled": g["cpm_low"],
                    "cpm_ssl": g["cpm_mid"],
                    "cpm_all": g["cpm_high"],
                    "gap": gap["difference"],
                    "gap_ci95": list(gap["ci95"]),
                    "closed": g["closed"],
                    "closed_ci95": list(g["ci95"]),
                    "undefined": g["undefined"],
                    "n_runs": counts[SSL_GAP[0]],
                    "gap_resolved": resolved,
                    "met": resolved and g["closed"] >= SSL_GAP_GOAL,
                }
            )
    return rows


def _ssl_gap_lines(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    low, mid, high = SSL_GAP
    lines = [
        "## Semi-supervision: the gap it closes",
        "",
        f"`{mid}` against the same federation on the labeled women only "
        f"(`{low}`) and with every training woman labeled (`{high}`, the "
        "scenario's complete annotations; the test women are the same): "
        f"closed = ({mid} − {low}) / ({high} − {low}), paired over the same "
        "women and seeds. Goal (issue 14): at least "
        f"{SSL_GAP_GOAL:.0%} on the partly labeled site. A gap whose interval "
        "is not above 0 has nothing to close (a site without unlabeled women).",
        "",
        f"| site | class | {low} | {mid} | {high} | gap [95% CI] | closed [95% CI] | "
        f"≥ {SSL_GAP_GOAL:.0%} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lo, hi = r["gap_ci95"]
        clo, chi = r["closed_ci95"]
        verdict = (
            ("yes" if r["met"] else "no") if r["gap_resolved"] else "no gap resolved"
        )
        lines.append(
            f"| {r['site']} | {r['class']} | {_fmt(r['cpm_labeled'])} | "
            f"{_fmt(r['cpm_ssl'])} | {_fmt(r['cpm_all'])} | {_fmt(r['gap'])} "
            f"[{_fmt(lo)}, {_fmt(hi)}] | {_pct(r['closed'])} "
            f"[{_pct(clo)}, {_pct(chi)}] | {verdict} |"
        )
    return [*lines, ""]


def _pct(v: float) -> str:
    return "–" if v is None or math.isnan(v) else f"{v:.0%}"


def goal_lines(verdicts: list[dict[str, Any]]) -> list[str]:
    """The report's goal paragraph: one line per non-base site."""
    if not verdicts:
        return []

    def yes(v: bool | None) -> str:
        return "not run" if v is None else ("yes" if v else "no")

    regime = verdicts[0]["regime"]
    lines = [
        "",
        f"Goal (issue 14), mass CPM of **{regime}** on every non-base site: "
        "above base and above local-only (paired interval above 0), and at "
        f"least {ORACLE_FRACTION_GOAL:g} × the oracle's.",
        "",
        "| site | > base | > local-only | × oracle | goal | oracle > base | "
        "oracle > local-only |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v in verdicts:
        lines.append(
            f"| {v['site']} | {yes(v['beats_base'])} | {yes(v['beats_local'])} | "
            f"{_fmt(v['oracle_ratio'])} | {'met' if v['met'] else 'not met'} | "
            f"{yes(v['oracle_beats_base'])} | {yes(v['oracle_beats_local'])} |"
        )
    met = [v["site"] for v in verdicts if v["met"]]
    lines += [
        "",
        "Goal met on " + (", ".join(met) if met else "no site") + ".",
    ]
    if all(v["reaches_oracle"] is None for v in verdicts):
        lines += [
            "",
            "The oracle is not in these runs (`make demo` leaves it to `make "
            "study`), so the × oracle test and the ceiling are not run and "
            "no site can meet the goal here; the first two columns stand.",
        ]
    capped = [
        v["site"]
        for v in verdicts
        if v["oracle_beats_base"] is False or v["oracle_beats_local"] is False
    ]
    if capped:
        lines += [
            "",
            "The last two columns are the ceiling: the same tests for the oracle "
            "(every site's labels pooled). On "
            + ", ".join(capped)
            + " the oracle itself does not pass one of them, so no regime "
            "can pass it there without beating the oracle.",
        ]
    return lines


def load_detections(path: Path) -> dict[str, list[FrocImage]]:
    """``{site: [FrocImage]}`` from a regime's ``detections.json``.

    Raises:
        RunFolderError: unreadable file or a malformed record (file and key named).
    """
    raw = RF.read_json(path)
    try:
        return {
            site: [FrocImage.from_json(d) for d in rows] for site, rows in raw.items()
        }
    except (AttributeError, ValueError) as exc:
        raise RunFolderError(f"{path}: {exc}") from exc


def paired_comparisons(
    detections: Mapping[str, Path | list[Path]], *, n_boot: int = 1000, seed: int = 0
) -> list[dict[str, Any]]:
    """CPM differences of :data:`PAIRS` per site and class, paired over women.

    ``detections``: each regime's ``detections.json``, or one per run (seed):
    the i-th run of one regime pairs with the i-th of the other, and the
    interval resamples runs and images
    (:func:`common.detector.froc.pooled_paired_cpm_difference`; with one run
    it is :func:`common.detector.froc.paired_cpm_difference`). Each row:
    ``{"site", "class", "regime", "against", "cpm", "cpm_against",
    "difference", "ci95", "ratio", "n_runs", "resolved"}``, means over runs;
    ``ratio`` = cpm / cpm_against (NaN when that is 0), ``resolved``: the
    interval excludes 0. Pairs whose regimes did not keep detections, have
    other run counts, or sites scored on different images, are skipped (logged).
    """
    paths = {k: v if isinstance(v, list) else [v] for k, v in detections.items()}
    loaded: dict[str, list[dict[str, list[FrocImage]]]] = {}

    def get(regime: str) -> list[dict[str, list[FrocImage]]]:
        if regime not in loaded:
            loaded[regime] = [load_detections(p) for p in paths[regime]]
        return loaded[regime]

    rows: list[dict[str, Any]] = []
    todo = [(r, a) for r, a in PAIRS if r in paths and a in paths]
    eta = Eta(max(1, len(todo)))
    for k, (regime, against) in enumerate(todo, 1):
        if len(paths[regime]) != len(paths[against]):
            log.warning(
                "%s (%d runs) vs %s (%d runs): not paired",
                regime,
                len(paths[regime]),
                against,
                len(paths[against]),
            )
        else:
            rows += _pair_rows(regime, against, get(regime), get(against), n_boot, seed)
        log.info(
            "paired comparison %d of %d: %s − %s (%s)",
            k, len(todo), regime, against, eta.step(),
        )  # fmt: skip
    return rows


def _pair_rows(
    regime: str,
    against: str,
    a_runs: list[dict[str, list[FrocImage]]],
    b_runs: list[dict[str, list[FrocImage]]],
    n_boot: int,
    seed: int,
) -> list[dict[str, Any]]:
    """The rows of one pair of :func:`paired_comparisons`, every site and class."""
    rows: list[dict[str, Any]] = []
    common = set.intersection(*(set(d) for d in a_runs + b_runs))
    for site in sorted(common):
        for label, cls in enumerate(CLASSES):
            try:
                r = pooled_paired_cpm_difference(
                    [d[site] for d in b_runs],
                    [d[site] for d in a_runs],
                    label,
                    n_boot=n_boot,
                    seed=seed,
                )
            except ValueError as exc:
                log.warning("%s vs %s, site %s: %s", regime, against, site, exc)
                break
            lo, hi = r["ci95"]
            rows.append(
                {
                    "site": site,
                    "class": cls,
                    "regime": regime,
                    "against": against,
                    "cpm": r["cpm_b"],
                    "cpm_against": r["cpm_a"],
                    "difference": r["diff"],
                    "ci95": [lo, hi],
                    "ratio": r["cpm_b"] / r["cpm_a"] if r["cpm_a"] > 0 else math.nan,
                    "n_runs": len(a_runs),
                    "resolved": bool(lo > 0 or hi < 0),
                }
            )
    return rows


def _paired_lines(rows: list[dict[str, Any]], base_sites: set[str]) -> list[str]:
    lines = [
        "## Paired comparisons (same test images)",
        "",
        "Difference of CPM (regime − against) on each site's test images, with a",
        "95% bootstrap interval that resamples the same women (all of a",
        "woman's images together) for both regimes (and, with several seeds,",
        "the seeds too: the mean difference",
        "over seeds); an interval that excludes 0 is a difference the runs can",
        "resolve, and the winner is named. Ratio = CPM(regime) / CPM(against).",
        "",
        "| site | class | regime − against | seeds | difference [95% CI] | "
        "ratio | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lo, hi = r["ci95"]
        verdict = "not resolved"
        if r["resolved"]:
            verdict = f"{r['regime'] if lo > 0 else r['against']} better"
        lines.append(
            f"| {r['site']} | {r['class']} | {r['regime']} − {r['against']} | "
            f"{r.get('n_runs', 1)} | {_fmt(r['difference'])} [{_fmt(lo)}, "
            f"{_fmt(hi)}] | {_fmt(r['ratio'])} | {verdict} |"
        )
    lines += goal_lines(goal_verdicts(rows, base_sites))
    lines.append("")
    return lines


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{float(v):.{digits}f}"


def _cell(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "–"
    ci = entry.get("cpm_ci") or [None, None]
    text = f"{_fmt(entry['cpm'])} [{_fmt(ci[0])}, {_fmt(ci[1])}]"
    g = entry.get("gap_closed")
    if g is not None and not (isinstance(g, float) and math.isnan(g)):
        text += f" ({100 * g:.0f}%)"
    return text


def chosen_counts(runs: list[dict[str, Selection]], site: str) -> str:
    """``"global"`` or, over several runs, ``"base ×2, global"`` (choice order)."""
    names = [r[site].choice for r in runs if site in r]
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return ", ".join(n if c == 1 else f"{n} ×{c}" for n, c in counts.items())


def choice_rows(
    choices: dict[str, list[dict[str, Selection]]],
) -> list[dict[str, Any]]:
    """One row per (regime, run, site) of what the site chose and why.

    ``{"regime", "run", "site", "choice", "round", "women", "images",
    "base_score", "chosen_score", "reason"}``; scores are the validation
    women's mean CPM (``None`` when undefined).
    """
    rows = []
    for regime in _ordered(list(choices)):
        for i, run in enumerate(choices[regime]):
            for site, sel in sorted(run.items()):
                base = sel.scores.get(BASE)
                chosen = sel.scores.get(sel.choice)
                rows.append(
                    {
                        "regime": regime,
                        "run": i,
                        "site": site,
                        "choice": sel.choice,
                        "round": sel.round,
                        "women": sel.validation.get("women", 0),
                        "images": sel.validation.get("images", 0),
                        "base_score": None if base is None else base.value,
                        "chosen_score": None if chosen is None else chosen.value,
                        "reason": sel.reason,
                    }
                )
    return rows


def _choice_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Site choices (validation women)",
        "",
        "In a `-select` regime each site holds some labeled training women out",
        "of local training, scores its candidate models on them (mean of mass",
        "and calcification CPM) and keeps the base model unless a candidate",
        "beats it by more than the margin (docs/federation.md).",
        "",
        "| regime | run | site | choice | round | validation women (images) | "
        "base score | chosen score | reason |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['regime']} | {r['run']} | {r['site']} | {r['choice']} | "
            f"{r['round']} | {r['women']} ({r['images']}) | {_fmt(r['base_score'])} "
            f"| {_fmt(r['chosen_score'])} | {r['reason']} |"
        )
    lines.append("")
    return lines


def plot_froc(
    metrics: dict[str, dict[str, SiteMetrics]], site: str, path: Path
) -> bool:
    """One PNG per site: a panel per class, one FROC curve per regime."""
    fig, axes = plt.subplots(1, len(CLASSES), figsize=(5 * len(CLASSES), 4))
    drawn = False
    for ax, cls in zip(axes, CLASSES, strict=True):
        for regime in _ordered(list(metrics)):
            entry = metrics[regime].get(site)
            c = None if entry is None else entry.classes.get(cls)
            if c is None or c.curve is None:
                continue
            fp, sens = c.curve.fp_per_image, c.curve.sensitivity
            if not fp or not sens:
                continue
            pts = [(f, s) for f, s in zip(fp, sens, strict=False) if f and f > 0]
            if not pts:
                continue
            ax.step(*zip(*pts, strict=True), where="post", label=regime)
            drawn = True
        ax.set_xscale("log")
        ax.set_xlim(0.1, 8)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("false positives per image")
        ax.set_ylabel("sensitivity")
        ax.set_title(f"{site}: {cls}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def plot_paired(rows: list[dict[str, Any]], path: Path) -> bool:
    """Forest plot of the recommended regime's paired differences.

    One panel per class; per site, the difference of CPM (recommended −
    base, − local-only, − oracle) with its 95% interval, from
    :func:`paired_comparisons` rows. Returns whether anything was drawn
    (nothing, no file, when those pairs were not run).
    """
    regime = headline_regime(rows)
    against = (R.BASE, R.LOCAL_ONLY, R.ORACLE)
    want = [
        r
        for r in rows
        if r["regime"] == regime
        and r["against"] in against
        and all(math.isfinite(v) for v in (r["difference"], *r["ci95"]))
    ]
    if not want:
        return False
    sites = sorted({r["site"] for r in want})
    several = max(int(r.get("n_runs", 1)) for r in want) > 1
    resampled = "women and seeds" if several else "women"
    fig, axes = plt.subplots(
        1, len(CLASSES), figsize=(5 * len(CLASSES), 0.9 + 0.75 * len(sites))
    )
    colours = {R.BASE: "tab:blue", R.LOCAL_ONLY: "tab:orange", R.ORACLE: "tab:gray"}
    for ax, cls in zip(axes, CLASSES, strict=True):
        for k, other in enumerate(against):
            pts = [
                (sites.index(r["site"]) + 0.22 * (k - 1), r)
                for r in want
                if r["class"] == cls and r["against"] == other
            ]
            if not pts:
                continue
            y = [p for p, _ in pts]
            d = [r["difference"] for _, r in pts]
            err = [
                [r["difference"] - r["ci95"][0] for _, r in pts],
                [r["ci95"][1] - r["difference"] for _, r in pts],
            ]
            ax.errorbar(
                d, y, xerr=err, fmt="o", capsize=3, color=colours[other],
                label=f"− {other}",
            )  # fmt: skip
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(sites)), sites)
        ax.invert_yaxis()
        ax.set_xlabel(f"difference of CPM, 95% CI ({resampled})")
        ax.set_title(f"{regime}: {cls}", fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_rounds(rounds: dict[str, list[StudyRound]], metric: str, path: Path) -> bool:
    """Per-round curve of ``metric`` for every (federated regime, site)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for regime in _ordered(list(rounds)):
        by_site: dict[str, list[tuple[int, float]]] = {}
        for row in rounds[regime]:
            v = row.metrics.get(metric)
            if v is not None:
                by_site.setdefault(row.site, []).append((row.round, float(v)))
        for site, pts in sorted(by_site.items()):
            pts.sort()
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"{regime}/{site}")
            drawn = True
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def bytes_table(rounds: dict[str, list[StudyRound]]) -> list[dict[str, Any]]:
    """Mean bytes each site sent per round, per federated regime."""
    out = []
    for regime in _ordered(list(rounds)):
        per_site: dict[str, list[float]] = {}
        for row in rounds[regime]:
            if row.bytes_sent is not None:
                per_site.setdefault(row.site, []).append(float(row.bytes_sent))
        for site, vals in sorted(per_site.items()):
            out.append(
                {
                    "regime": regime,
                    "site": site,
                    "rounds": len(vals),
                    "mean_bytes_per_round": sum(vals) / len(vals),
                }
            )
    return out


def write_report(run_dirs: list[Path], out_dir: Path) -> Path:
    """Write ``report.md``, ``report.json`` and plots; return the report.md path."""
    data = collect(run_dirs)
    table = build_table(data["metrics"], data["seed_metrics"])
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# mammofed report", ""]
    if data["runs"]:
        first = data["runs"][0]
        lines += [
            f"Scenario: `{first.scenario}`; working spacing "
            f"{first.working_spacing_mm} mm; runs: "
            + ", ".join(f"`{p}`" for p in run_dirs),
            "",
        ]
    lines += [
        "CPM (mean sensitivity at 0.25, 0.5, 1, 2, 4 FP/image) on each site's",
        "held-out test women, 95% bootstrap interval over women in brackets",
        "(with several seeds: the mean over seeds, lowest and highest seed in",
        "brackets),",
        "and in parentheses the gap closed = (regime − base) / (oracle − base),",
        f"shown where the oracle beats the base by at least {MIN_GAP} CPM.",
        "",
    ]
    regimes = table["regimes"]
    for cls in CLASSES:
        lines += [f"## CPM: {cls}", ""]
        lines.append("| site | " + " | ".join(regimes) + " |")
        lines.append("| --- |" + " --- |" * len(regimes))
        for site in table["sites"]:
            cells = [_cell(table["table"][site].get(r, {}).get(cls)) for r in regimes]
            for i, r in enumerate(regimes):
                chose = chosen_counts(data["choices"].get(r, []), site)
                if chose and cells[i] != "–":
                    cells[i] += f" · chose {chose}"
            lines.append(f"| {site} | " + " | ".join(cells) + " |")
        lines.append("")
    for regime, dp in data["dp"].items():
        spent = ", ".join(f"{s} {_fmt(e)}" for s, e in sorted(dp["spent"].items()))
        delta = dp.get("delta")
        lines += [
            f"{regime}: patient-level DP-SGD at epsilon {dp['epsilon']:g} "
            f"(delta <= {'–' if delta is None else f'{delta:.2g}'}); epsilon spent "
            f"per site: {spent or '–'}.",
            "",
        ]
    chosen_rows = choice_rows(data["choices"])
    if chosen_rows:
        lines += _choice_lines(chosen_rows)
    paired = paired_comparisons(data["detections"])
    base_sites = {s for run in data["runs"] for s in run.base_sites}
    if paired:
        lines += _paired_lines(paired, base_sites)
        if plot_paired(paired, out_dir / PAIRED_PNG):
            lines += [f"![paired differences]({PAIRED_PNG})", ""]
    ssl_gap = ssl_gap_rows(paired, data["detections"], base_sites)
    lines += _ssl_gap_lines(ssl_gap)
    lines += ["## FROC curves", ""]
    for site in table["sites"]:
        png = out_dir / f"froc_{site}.png"
        if plot_froc(data["metrics"], site, png):
            lines.append(f"![FROC {site}]({png.name})")
    lines.append("")
    if data["rounds"]:
        lines += ["## Federated rounds", ""]
        metric_names = sorted(
            {
                k
                for rows in data["rounds"].values()
                for row in rows
                for k, v in row.metrics.items()
                if v is not None
            }
        )
        for metric in metric_names:
            png = out_dir / f"rounds_{metric}.png"
            if plot_rounds(data["rounds"], metric, png):
                lines.append(f"![{metric} per round]({png.name})")
        lines += ["", "### Bytes sent per site per round", ""]
        lines.append("| regime | site | rounds | mean bytes/round |")
        lines.append("| --- | --- | --- | --- |")
        for row in bytes_table(data["rounds"]):
            lines.append(
                f"| {row['regime']} | {row['site']} | {row['rounds']} | "
                f"{row['mean_bytes_per_round']:.0f} |"
            )
        lines.append("")
    if data["configs"]:
        lines += ["## Configs used", ""]
        for cfg in data["configs"]:
            lines += [
                f"### `{cfg}`",
                "",
                "```yaml",
                cfg.read_text().rstrip(),
                "```",
                "",
            ]
    report_md = out_dir / "report.md"
    report_md.write_text("\n".join(lines) + "\n")
    payload = {
        **table,
        "bytes_per_round": bytes_table(data["rounds"]),
        "paired": paired,
        "goal": goal_verdicts(paired, base_sites),
        "ssl_gap": ssl_gap,
        "choices": chosen_rows,
        "dp": data["dp"],
        "runs": [str(p) for p in run_dirs],
    }
    (out_dir / "report.json").write_text(json.dumps(json_safe(payload), indent=2))
    log.info("report written to %s", report_md)
    return report_md
