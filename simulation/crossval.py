"""Patient-level k-fold cross-validation of central training (``crossval``).

The quality figure for a development split that has no test set of its own
(mini-MIAS): "tune by cross-validation only". For each cache of a
:class:`simulation.train.TrainConfig`, :meth:`common.imaging.data.SiteDataset.folds`
deals the box-labeled images of the train split into ``k`` patient-grouped,
lesion-stratified folds (same ``k`` and fold seed for every cache; fold ``f``
of the pool is the union of each cache's fold ``f``), so a woman is never in
both the training and the validation part of a fold. Test-split patients
(a site's ``split.json`` or ``test_fraction > 0``) take no part; set
``test_fraction: 0`` to cross-validate on every box-labeled image.

For every fold a fresh model is trained on the other folds with the
TrainConfig recipe (:func:`simulation.train.train_model`, same seed for every
fold) and predicts its held-out images. With ``labeled_patients`` only that
many women of the other folds train it (a new site with few labels; drawn by
:func:`simulation.train.few_label_subset` with ``split_seed + fold``), and
with ``init_checkpoint`` it starts from a pretrained detector; the held-out
fold is always whole. The out-of-fold detections of all
images are then pooled into ONE FROC per class (bootstrap CI over women,
``cfg.n_boot`` resamples). Pooling compares scores of different models on one
threshold sweep; the per-fold CPMs (mean ± sd) are reported next to it.

Written into ``out_dir``:

* ``resolved_config.yaml``: the TrainConfig as used;
* ``cv_metrics.json``: pooled per-class FROC summary, per-fold CPMs, folds,
  and from the pooled out-of-fold detections at 1 FP/image the sensitivity by
  lesion size (``by_size``), by breast density (``by_density``, when some
  image has one) and the gallery's cases (``errors``), as
  ``mammofed-client evaluate`` writes them (:mod:`common.detector.errors`; the
  one pooled threshold spans the folds' models, like the pooled FROC);
* ``froc-<class>.png``: the pooled FROC curves;
* ``errors-<class>.png``: the pooled missed lesions and top false positives;
* ``oof_predictions.json``: every out-of-fold image as
  :meth:`common.detector.froc.FrocImage.to_json` (key ``<site>/<cache key>``, spacing,
  ground truth, ignore regions, model-space detections) plus its ``fold``:
  self-contained, it can be re-scored without the caches;
* ``fold-<f>/``: ``last.pt``, ``epochs.jsonl``, ``train.log``, ``fold.json``
  (that fold's validation keys and patients), and with ``rescore.enabled``
  ``rescorer.pt``: the second stage (:mod:`common.detector.rescore`) trained
  on the fold's model's candidates on that fold's training images only. The
  held-out images are then scored re-scored, and ``cv_metrics.json`` adds
  ``detector_only`` (the pooled FROC of the detector alone, per fold in
  ``folds[].cpm_detector``) and ``rescore_gain`` (per class the paired CPM
  difference re-scored minus detector alone, with its bootstrap interval);
  ``oof_predictions-detector.json`` then holds the detector alone's
  out-of-fold images (to fuse runs with ``benchmarks.ensemble --oof``).
  A rerun resumes a fold from its ``last.pt`` (a finished fold is only
  re-predicted, its ``rescorer.pt`` reused) when the fold is unchanged.
* with ``ema_decay`` set, the EMA is what is scored, and the weights the
  optimizer trained (the student, :class:`simulation.train.Trained`) predict
  the same held-out images: ``oof_predictions-student.json``, and
  ``cv_metrics.json`` adds ``student_only`` (its pooled FROC, per fold
  ``folds[].cpm_student``) and ``ema_gain`` (per class the paired CPM
  difference EMA minus student). Both come from one training run, so the
  comparison holds the seed's training noise fixed: what differs is only the
  averaging. With the second stage on too, the student is the detector alone.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import config_to_dict, write_resolved
from common.detector.engine import (
    EPOCH_LOG,
    EpochHook,
    detect_dataset,
    flat_metrics,
    resolve_device,
    seed_everything,
    with_speck_clusters_images,
)
from common.detector.errors import write_error_outputs
from common.detector.froc import (
    ClassMetrics,
    FrocImage,
    froc_all,
    paired_cpm_difference,
    plot_froc,
)
from common.detector.rescore import RESCORER_FILE, RescoredDetector, fit_rescorer
from common.errors import ConfigError, MammofedError
from common.fileio import json_safe
from common.imaging.data import SiteDataset
from common.keys import CLASSES
from common.progress import Eta
from simulation.train import TrainConfig, few_label_subset, train_model, training_data

log = logging.getLogger(__name__)

CV_METRICS_JSON = "cv_metrics.json"
OOF_PREDICTIONS_JSON = "oof_predictions.json"
OOF_DETECTOR_JSON = "oof_predictions-detector.json"
OOF_STUDENT_JSON = "oof_predictions-student.json"
FOLD_JSON = "fold.json"

#: TrainConfig fields that do not change what a fold trains: left out of the
#: recipe a fold records, so a pooling run may set them its own way.
RUN_ONLY_FIELDS = ("out_dir", "device", "eval_every", "n_boot", "num_workers")
#: ``model`` fields that only act when a trained model predicts (never on what
#: a fold trains on: the hard-negative miner and the second stage's candidates
#: run without them), so a finished fold is re-predicted with another value.
INFERENCE_ONLY_MODEL_FIELDS = ("breast_mask", "speck_clusters")


def fold_recipe(cfg: TrainConfig) -> dict[str, Any]:
    """What a fold was trained with: ``cfg`` less the run-only fields.

    Left out: :data:`RUN_ONLY_FIELDS` and the ``model`` fields of
    :data:`INFERENCE_ONLY_MODEL_FIELDS`.

    Recorded in each fold's ``fold.json``: folds trained by separate
    ``--only-folds`` processes are pooled only when they agree (a process
    given another ``--set`` or an edited config is refused, naming the field).
    """
    doc = config_to_dict(cfg)
    recipe = {k: v for k, v in doc.items() if k not in RUN_ONLY_FIELDS}
    model = recipe.get("model")
    if isinstance(model, dict):
        recipe["model"] = {
            k: v for k, v in model.items() if k not in INFERENCE_ONLY_MODEL_FIELDS
        }
    return recipe


def _first_difference(a: Any, b: Any, key: str = "") -> str | None:
    """The first dotted key at which ``a`` and ``b`` differ (None: equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            sub = f"{key}.{k}" if key else str(k)
            if k not in a or k not in b:
                return sub
            found = _first_difference(a[k], b[k], sub)
            if found is not None:
                return found
        return None
    return None if a == b else (key or "<root>")


@dataclass(frozen=True)
class Fold:
    """One fold of the pool: per cache, ``(train_indices, val_indices)``."""

    index: int
    parts: dict[str, tuple[list[int], list[int]]]


def make_folds(sites: dict[str, SiteDataset], k: int, seed: int) -> list[Fold]:
    """Patient-grouped folds of every site (train split), aligned by fold number.

    Raises:
        MammofedError: ``k`` is not in ``[2, box-labeled train patients]`` of a site.
    """
    per_site = {}
    for name, s in sites.items():
        try:
            per_site[name] = s.folds(k, seed, within="train")
        except ValueError as exc:
            raise MammofedError(f"site {name}: {exc}") from exc
    return [Fold(f, {name: per_site[name][f] for name in sites}) for f in range(k)]


def _record_ids(
    sites: dict[str, SiteDataset], indices: dict[str, list[int]], attr: str
) -> list[str]:
    """Sorted distinct ``<site>/<record.attr>`` of the records at ``indices``."""
    return sorted(
        {
            f"{name}/{getattr(sites[name].records[i], attr)}"
            for name, ix in indices.items()
            for i in ix
        }
    )


def _mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    sd = float(np.std(v, ddof=1)) if len(v) > 1 else None
    return float(np.mean(v)), sd


def _epoch_logger(
    fold: int, k: int, epochs: int, epoch_log: Path, eta: Eta
) -> EpochHook:
    """``fit`` eval hook that logs one progress line per epoch of a fold.

    ``eta`` counts the epochs of every fold this run trains.
    """
    # a resumed fold continues after the epochs already logged
    logged = len(epoch_log.read_text().splitlines()) if epoch_log.is_file() else 0
    eta.skip(min(logged, epochs))

    def hook(_model: torch.nn.Module, epoch: int) -> dict[str, Any]:
        log.info(
            "fold %d/%d epoch %d/%d done (%s for the epochs left)",
            fold + 1, k, epoch + 1, epochs, eta.step(),
        )  # fmt: skip
        return {}

    return hook


def _fold_file_handler(path: Path) -> logging.Handler:
    h = logging.FileHandler(path, mode="a", encoding="utf-8")
    h.setLevel(logging.INFO)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return h


def run_crossval(
    cfg: TrainConfig, k: int = 5, only: Sequence[int] | None = None
) -> dict[str, Any]:
    """Run k-fold patient-level CV of ``cfg``'s recipe; write outputs to ``out_dir``.

    ``only`` (fold indices, as in the ``fold-<f>`` folder names) trains just
    those folds and returns ``{"k", "partial": True, "folds"}`` without pooling:
    several processes can then share the folds of one ``out_dir``, and a last
    run without ``only`` pools them (finished folds are only re-predicted).

    Folds use ``cfg.split_seed``; training uses ``cfg.seed`` (every fold starts
    from the same seeded state, so the run is deterministic in both).

    Returns the ``cv_metrics.json`` document.

    Raises:
        MammofedError: ``k`` exceeds a cache's box-labeled train patients, or a
            fold directory holds a run of a different fold.
    """
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(
            "train config", "out_dir", f"{str(out)!r} is a file, not a folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_resolved(cfg, out)
    device = resolve_device(cfg.device, "train config")
    t_start = time.perf_counter()
    sites = cfg.sites()
    folds = make_folds(sites, k, cfg.split_seed)
    bad = sorted(set(only or ()) - set(range(k)))
    if bad:
        raise MammofedError(f"--only-folds: no fold {bad} in 0..{k - 1}")
    if cfg.model.speck_clusters:  # before any fold trains, not after the first
        for name, s in sites.items():
            lacking = [r.key for r in s.records if not s.cache.has_specks(r.key)]
            if lacking:
                raise MammofedError(
                    f"{name}: image {lacking[0]} (and {len(lacking) - 1} more) has "
                    "no specks, which 'model.speck_clusters: true' needs: ingest "
                    "the site again with 'specks: true' in its site config"
                )
    for name, s in sites.items():
        n_cv = len(folds[0].parts[name][0]) + len(folds[0].parts[name][1])
        n_test = len(s.indices("test"))
        log.info(
            "site %s: %d box-labeled images in %d folds (%d test-split images out)",
            name, n_cv, k, n_test,
        )  # fmt: skip

    oof: list[FrocImage] = []
    oof_fold: list[int] = []
    oof_detector: list[FrocImage] = []
    oof_student: list[FrocImage] = []
    fold_docs: list[dict[str, Any]] = []
    to_train = [f for f in folds if only is None or f.index in only]
    eta = Eta(max(1, len(to_train) * cfg.epochs))
    for fold in to_train:
        f = fold.index
        fdir = out / f"fold-{f}"
        fdir.mkdir(parents=True, exist_ok=True)
        val_idx = {name: val for name, (_, val) in fold.parts.items()}
        val_keys = _record_ids(sites, val_idx, "key")
        val_patients = _record_ids(sites, val_idx, "patient_id")
        train_idx = {
            name: (
                tr
                if cfg.labeled_patients is None
                else few_label_subset(
                    sites[name], tr, cfg.labeled_patients, cfg.split_seed + f
                )
            )
            for name, (tr, _) in fold.parts.items()
        }
        train_patients = _record_ids(sites, train_idx, "patient_id")
        fold_info = {
            "fold": f,
            "k": k,
            "fold_seed": cfg.split_seed,
            "val_keys": val_keys,
            "val_patients": val_patients,
        }
        fold_info["recipe"] = json_safe(fold_recipe(cfg))
        fj = fdir / FOLD_JSON
        if fj.is_file():
            earlier = json.loads(fj.read_text())
            if "recipe" not in earlier:  # written before folds recorded it
                log.warning("%s: no recipe recorded; only the fold is checked", fj)
                earlier["recipe"] = fold_info["recipe"]
            where = _first_difference(earlier, fold_info)
            if where is not None:
                raise MammofedError(
                    f"{fdir}: holds a run of a different fold or recipe ({where} "
                    "differs: k, seed, data or a setting changed); use a new "
                    "--out or remove it"
                )
        fj.write_text(json.dumps(fold_info, indent=1))

        handler = _fold_file_handler(fdir / "train.log")
        logging.getLogger().addHandler(handler)
        t0 = time.perf_counter()
        try:
            seed_everything(cfg.seed)
            # lesions to paste come from this fold's training women only
            data = training_data(cfg, sites, train_idx, device)
            val_views = {name: sites[name].subset(val) for name, val in val_idx.items()}
            n_train = len(data.source)
            n_val = sum(len(v) for v in val_views.values())
            log.info(
                "fold %d/%d: train %d images (%d patients), validate %d images "
                "(%d patients)",
                f + 1, k, n_train, len(train_patients), n_val, len(val_patients),
            )  # fmt: skip
            progress = _epoch_logger(f, k, cfg.epochs, fdir / EPOCH_LOG, eta)
            trained = train_model(
                cfg,
                data.views,
                fdir,
                device,
                eval_fn=progress,
                miner=data.miner,
                pretrain_on=data,
            )
            model = trained.model
            scorer, detector_only, student_only = model, [], []
            if cfg.ema_decay is not None:
                student_only = _predict(trained.student, val_views, cfg, device)
            if cfg.rescore.enabled:
                rescorer = fit_rescorer(
                    model, data.source, cfg.rescore, cfg.model.working_spacing_mm,
                    device, path=fdir / RESCORER_FILE, amp=cfg.amp,
                    batch_size=cfg.batch_size,
                )  # fmt: skip
                scorer = RescoredDetector(model, rescorer)
                detector_only = _predict(model, val_views, cfg, device)
            images = _predict(scorer, val_views, cfg, device)
            per_class = froc_all(images, n_boot=0, seed=cfg.seed)
            cpm = _cpm(per_class)
            seconds = time.perf_counter() - t0
            log.info(
                "fold %d/%d: CPM mass %s calcification %s (%d images, %.0f s)",
                f + 1, k, _fmt(cpm[CLASSES[0]]), _fmt(cpm[CLASSES[1]]),
                len(images), seconds,
            )  # fmt: skip
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()
        oof.extend(images)
        oof_fold.extend([f] * len(images))
        oof_detector.extend(detector_only)
        oof_student.extend(student_only)
        fold_docs.append(
            {
                "fold": f,
                "n_train_images": n_train,
                "n_val_images": n_val,
                "n_train_patients": len(train_patients),
                "n_val_patients": len(val_patients),
                "val_patients": val_patients,
                "cpm": cpm,
                "n_lesions": {name: r.n_lesions for name, r in per_class.items()},
                "seconds": round(seconds, 2),
                **(
                    {"cpm_detector": _cpm(froc_all(detector_only, n_boot=0))}
                    if detector_only
                    else {}
                ),
                **(
                    {"cpm_student": _cpm(froc_all(student_only, n_boot=0))}
                    if student_only
                    else {}
                ),
            }
        )

    if only is not None:
        log.info("folds %s trained; run without --only-folds to pool", sorted(only))
        return {"k": k, "partial": True, "folds": fold_docs}
    pooled = froc_all(oof, n_boot=cfg.n_boot, seed=cfg.seed)
    classes: dict[str, Any] = {}
    for name, r in pooled.items():
        title = f"{k}-fold CV (out-of-fold): {name}"
        plot_froc([r], out / f"froc-{name}.png", title=title)
        fold_cpm = [d["cpm"][name] for d in fold_docs]
        mean, sd = _mean_sd(fold_cpm)
        classes[name] = {
            **ClassMetrics.from_result(r).to_json(),
            "fold_cpm": fold_cpm,
            "fold_cpm_mean": mean,
            "fold_cpm_sd": sd,
        }
    errors = _pooled_errors(sites, oof, out, f"{k}-fold CV (out-of-fold)")
    doc: dict[str, Any] = {
        "k": k,
        "seed": cfg.seed,
        "fold_seed": cfg.split_seed,
        "n_boot": cfg.n_boot,
        "n_images": len(oof),
        "n_patients": sum(d["n_val_patients"] for d in fold_docs),
        "classes": classes,
        "metrics": flat_metrics(pooled, len(oof)),
        "folds": fold_docs,
        **errors,
        "seconds": round(time.perf_counter() - t_start, 2),
        "config": config_to_dict(cfg),
    }
    if oof_detector:
        doc.update(
            _paired_gain(oof_detector, oof, cfg, "detector_only", "rescore_gain")
        )
    if oof_student:
        doc.update(_paired_gain(oof_student, oof, cfg, "student_only", "ema_gain"))
    doc = json_safe(doc)
    (out / CV_METRICS_JSON).write_text(json.dumps(doc, indent=2))
    _write_oof(out / OOF_PREDICTIONS_JSON, oof, oof_fold)
    if oof_detector:  # the detector alone, e.g. to fuse runs before re-scoring
        _write_oof(out / OOF_DETECTOR_JSON, oof_detector, oof_fold)
    if oof_student:  # the trained weights without the EMA, same images
        _write_oof(out / OOF_STUDENT_JSON, oof_student, oof_fold)
    mass, calc = (classes[name] for name in CLASSES)
    log.info(
        "CV %d folds, %d images: CPM mass %s [%s, %s] calcification %s [%s, %s]",
        k, len(oof), _fmt(mass["cpm"]), *_ci(mass), _fmt(calc["cpm"]), *_ci(calc),
    )  # fmt: skip
    return doc


def _predict(
    model: torch.nn.Module,
    val_views: dict[str, Any],
    cfg: TrainConfig,
    device: torch.device,
) -> list[FrocImage]:
    """``model``'s FROC images of the held-out views, keyed ``<site>/<cache key>``.

    Cases (women) are named ``<site>/<patient_id>`` likewise.
    """
    out = []
    for name, v in val_views.items():
        if not len(v):
            continue
        images = detect_dataset(
            model, v, device, batch_size=cfg.batch_size, amp=cfg.amp
        )
        if cfg.model.speck_clusters:
            images = with_speck_clusters_images(images, v.site.cache.load_specks, name)
        out += [
            replace(
                im, key=f"{name}/{im.key}", case=f"{name}/{im.case}" if im.case else ""
            )
            for im in images
        ]
    return out


def _cpm(per_class: dict[str, Any]) -> dict[str, Any]:
    return json_safe({name: float(r.cpm) for name, r in per_class.items()})


def _write_oof(path: Path, images: list[FrocImage], folds: list[int]) -> None:
    """Write out-of-fold images, each with its fold, as ``path`` (JSON)."""
    rows = [{**im.to_json(), "fold": fi} for im, fi in zip(images, folds, strict=True)]
    path.write_text(json.dumps(rows))


def _paired_gain(
    before: list[FrocImage],
    after: list[FrocImage],
    cfg: TrainConfig,
    before_key: str,
    gain_key: str,
) -> dict[str, Any]:
    """Pooled FROC of ``before`` and the paired CPM gain of ``after`` over it.

    ``before`` and ``after`` are the same out-of-fold images scored two ways
    (the detector alone and re-scored; the student and its EMA). Returns
    ``{before_key: per-class metrics, gain_key: {class: {"diff", "ci95"}}}``.
    """
    pooled = froc_all(before, n_boot=cfg.n_boot, seed=cfg.seed)
    gain = {}
    for i, name in enumerate(CLASSES):
        diff, ci = paired_cpm_difference(
            before, after, i, n_boot=cfg.n_boot, seed=cfg.seed
        )
        gain[name] = {"diff": diff, "ci95": list(ci)}
        log.info(
            "%s %s: CPM %.3f before, paired gain %.3f [%.3f, %.3f]",
            gain_key, name, pooled[name].cpm, diff, *ci,
        )  # fmt: skip
    return {
        before_key: {
            name: ClassMetrics.from_result(r).to_json() for name, r in pooled.items()
        },
        gain_key: gain,
    }


def _pooled_errors(
    sites: dict[str, SiteDataset], oof: list[FrocImage], out: Path, title: str
) -> dict[str, Any]:
    """Error galleries, size and density tables of the pooled out-of-fold images.

    Keys ``<site>/<cache key>`` name the pixels in their site's cache.
    """
    where = {
        f"{name}/{r.key}": (site, r)
        for name, site in sites.items()
        for r in site.records
    }

    def load(key: str) -> np.ndarray:
        site, r = where[key]
        return site.cache.load_pixels(r.key, r.geometry.model_shape)

    densities = {
        f"{name}/{r.key}": r.meta.density
        for name, site in sites.items()
        for r in site.records
    }
    return write_error_outputs(oof, out, load, title=title, densities=densities)


def load_oof_images(cfg: TrainConfig) -> list[FrocImage]:
    """The out-of-fold detections of a finished CV run as FROC images.

    Reads ``cfg.out_dir/oof_predictions.json``, so a CV run can be re-scored
    or compared image by image with another
    (:func:`common.detector.froc.paired_cpm_difference`). Rows hold their ground truth
    (:meth:`common.detector.froc.FrocImage.to_json`); rows of older runs that hold
    only detections (``boxes``, ``scores``, ``labels``) take it (boxes,
    labels, ignore regions, spacing, the woman) from their cache in ``cfg.caches``.

    Raises:
        MammofedError: no ``oof_predictions.json`` (the CV did not pool), a
            malformed row, or an old row whose key names no image of the caches.
    """
    path = Path(cfg.out_dir) / OOF_PREDICTIONS_JSON
    if not path.is_file():
        raise MammofedError(f"{path}: missing; run the CV without --only-folds first")
    rows = json.loads(path.read_text())
    if not all("gt_boxes" in row for row in rows):  # an older, detections-only file
        records = {
            f"{name}/{rec.key}": (name, rec)
            for name, site in cfg.sites().items()
            for rec in site.records
        }
        for row in rows:
            found = records.get(row["key"])
            if found is None:
                raise MammofedError(
                    f"{path}: key {row['key']!r} is no image of caches "
                    f"{[str(c) for c in cfg.caches]}"
                )
            name, r = found
            row.update(
                case=f"{name}/{r.patient_id}",
                spacing_mm=r.spacing_mm,
                gt_boxes=r.boxes,
                gt_labels=r.labels,
                ignore_boxes=r.ignore,
                det_boxes=row["boxes"],
                det_scores=row["scores"],
                det_labels=row["labels"],
            )
    try:
        return [FrocImage.from_json(row) for row in rows]
    except ValueError as exc:
        raise MammofedError(f"{path}: {exc}") from exc


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _ci(c: dict[str, Any]) -> tuple[str, ...]:
    return tuple(map(_fmt, c.get("cpm_ci95") or (None, None)))
