"""Evaluate a detector checkpoint on a site cache: FROC metrics, plots, errors.

:func:`evaluate_checkpoint` writes ``OUT/metrics.json`` (CPM per class with its
95% bootstrap interval, sensitivity at each FP rate of
``common.keys.FROC_FP_RATES``, AP, counts, the flat federation metrics, and,
at 1 FP/image, sensitivity by lesion size under ``by_size``, by breast
density under ``by_density`` when some image has one, and the cases of the
error gallery under ``errors``), ``OUT/froc-<class>.png`` and
``OUT/errors-<class>.png`` (missed lesions and top false positives, see
:mod:`common.detector.errors`). Distances are in mm at each image's
model-space spacing (the hit rule of :mod:`common.detector.froc`). A
checkpoint's ``extra["standardizer"]`` (from ``mammofed-client export``)
standardizes every image before the model; the gallery shows the cached
model-space pixels, not standardized. Several checkpoints are scored as the
site would run them together: each model detects, the findings are fused
(``common.detector.ensemble``) and the fused detections are scored.

``metrics.json`` names what was scored: ``checkpoint`` (the list of model
files, in order; files written before it was a list hold one string),
``checkpoint_sha256`` (theirs), ``use_ema`` (EMA weights or not) and
``split`` (the patient split whose ``test`` women were scored).

The split: a checkpoint trained on site caches records the split its training
used (``extra["split"]``: seed and test fraction,
:func:`client.detector_trainer.training_split`; ``mammofed-client export``
and ``train-local`` write it), and the ``test`` view is that split's test
women, so a woman the model was trained on is never scored as a test woman.
An explicit ``split_seed`` / ``test_fraction`` that differs is refused
(:class:`SplitMismatch`) unless ``allow_other_split``; models recording
different splits are refused together; a model trained with test fraction 0
(every woman of a cache without ``split.json``) has no test women. A
checkpoint that records no split is split by the arguments (default seed
:data:`DEFAULT_SPLIT_SEED`, fraction :data:`DEFAULT_TEST_FRACTION`), with a
warning.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from client.detector_trainer import EXTRA_SPLIT, EXTRA_TRAINED_KEYS
from client.export import checkpoint_paths, load_detectors
from common import __version__
from common.config.loader import config_to_dict, write_resolved
from common.detector.checkpoint import Checkpoint
from common.detector.engine import (
    detect_dataset,
    resolve_device,
    score_images,
    with_speck_clusters_images,
)
from common.detector.ensemble import fuse
from common.detector.errors import GALLERY_N, write_error_outputs
from common.detector.recipe import Transformed
from common.errors import CheckpointMismatch, MammofedError
from common.fileio import sha256_file
from common.imaging.data import DEFAULT_TEST_FRACTION, SiteDataset

log = logging.getLogger(__name__)

METRICS_JSON = "metrics.json"
#: The split of a checkpoint that records none (``SiteDataset``'s defaults:
#: ``common.imaging.data.DEFAULT_TEST_FRACTION``, seed 0).
DEFAULT_SPLIT_SEED = 0
#: Command-line flags of the split arguments, for messages.
_FLAGS = {"seed": "--split-seed", "test_fraction": "--test-fraction"}


class NothingToEvaluate(MammofedError, ValueError):
    """The view chosen for evaluation holds no image (the message names both)."""


class SplitMismatch(MammofedError, ValueError):
    """A split asked for is not the one the model was trained under."""


def recorded_split(cks: Sequence[Checkpoint]) -> dict[str, Any] | None:
    """The training split the checkpoints record (``extra["split"]``), checked.

    ``None`` when none records one; a checkpoint without the record beside
    others that have it is logged (its training split is unknown).

    Raises:
        CheckpointMismatch: a malformed ``extra.split`` (file, field, value).
        SplitMismatch: two checkpoints record different splits (both named).
    """
    found: list[tuple[Path, dict[str, Any]]] = []
    missing: list[str] = []
    for ck in cks:
        rec = ck.extra.get(EXTRA_SPLIT)
        if rec is None:
            missing.append(str(ck.path))
            continue
        seed = rec.get("seed") if isinstance(rec, Mapping) else None
        frac = rec.get("test_fraction") if isinstance(rec, Mapping) else None
        if (
            not isinstance(seed, int)
            or isinstance(seed, bool)
            or not isinstance(frac, int | float)
            or isinstance(frac, bool)
            or not 0.0 <= frac < 1.0
        ):
            raise CheckpointMismatch(
                f"{ck.path}: field 'extra.{EXTRA_SPLIT}' must be {{seed: integer, "
                f"test_fraction: number in [0, 1)}}, got {rec!r}"
            )
        found.append((ck.path, {"seed": seed, "test_fraction": float(frac)}))
    if not found:
        return None
    first_path, first = found[0]
    for path, rec in found[1:]:
        if rec != first:
            raise SplitMismatch(
                f"{path}: field 'extra.{EXTRA_SPLIT}' is {rec} but {first_path} "
                f"records {first}: models trained under different splits have no "
                "common test women (a woman one held out, the other trained on)"
            )
    if missing:
        log.warning(
            "%s: records no training split; scored by the split %s records (%s)",
            ", ".join(missing), first_path, first,
        )  # fmt: skip
    return first


def _unseen_women(
    loaded: Sequence[tuple[Any, Checkpoint, Any]],
    site: SiteDataset,
    where: str,
    cache_dir: str | Path,
) -> list[int]:
    """The box-labeled images of ``site``'s women no model trained on.

    Called for models trained on every woman of their caches (recorded
    ``test_fraction`` 0): such a model has no test women in a cache it
    trained on, and every woman of a cache of other women is one. The
    recorded training images (``extra.trained_keys``: cache keys, the file's
    sha256 and the spacing) tell which; a woman with any image among them is
    left out whole (a folder holding the development women and new ones
    scores the new ones).

    Raises:
        NothingToEvaluate: a model records no training images, or every
            woman of this cache trained one.
    """
    trained: set[str] = set()
    for _, ck, _ in loaded:
        keys = ck.extra.get(EXTRA_TRAINED_KEYS)
        if not isinstance(keys, list):
            raise NothingToEvaluate(
                f"{where}: field 'extra.{EXTRA_SPLIT}' records test_fraction 0: "
                f"the model was trained on every woman of a cache without "
                f"split.json and records no training images, so {cache_dir} "
                "may hold no test women for it (view 'test'); for a cache of "
                "other women, score them with --view all"
            )
        trained.update(str(k) for k in keys)
    seen = {r.patient_id for r in site.records if r.key in trained}
    shared = sum(r.key in trained for r in site.records)
    keep = [
        i
        for i in site.indices("all")
        if site.records[i].box_labeled and site.records[i].patient_id not in seen
    ]
    if not keep:
        raise NothingToEvaluate(
            f"{where}: field 'extra.{EXTRA_SPLIT}' records test_fraction 0 and "
            f"{shared} of the {len(site.records)} images of {cache_dir} trained "
            "the model (extra.trained_keys): no woman there is a test woman "
            "for it (view 'test')"
        )
    log.info(
        "%s: trained on every woman of its own caches; scoring the %d "
        "box-labeled images of %s's women it never saw (%d women left out: "
        "%d of their images trained it)",
        where, len(keep), cache_dir, len(seen), shared,
    )  # fmt: skip
    return keep


def resolve_split(
    recorded: dict[str, Any] | None,
    *,
    test_fraction: float | None,
    split_seed: int | None,
    allow_other_split: bool,
    where: str,
) -> dict[str, Any]:
    """``{seed, test_fraction, source}`` of the split to score (see module doc).

    Raises:
        SplitMismatch: an asked value that differs from ``recorded`` without
            ``allow_other_split``; the message names both.
    """
    asked = {"seed": split_seed, "test_fraction": test_fraction}
    if recorded is None:
        given = any(v is not None for v in asked.values())
        return {
            "seed": DEFAULT_SPLIT_SEED if split_seed is None else int(split_seed),
            "test_fraction": DEFAULT_TEST_FRACTION
            if test_fraction is None
            else float(test_fraction),
            "source": "command line" if given else "default",
        }
    differ = {
        k: v
        for k, v in asked.items()
        if v is not None
        and (v != recorded[k] if k == "seed" else not math.isclose(v, recorded[k]))
    }
    if not differ:
        return {**recorded, "source": "checkpoint"}
    text = ", ".join(
        f"{_FLAGS[k]} {v!r} (trained under {recorded[k]!r})" for k, v in differ.items()
    )
    if not allow_other_split:
        raise SplitMismatch(
            f"{where}: field 'extra.{EXTRA_SPLIT}' records the split the model "
            f"was trained under ({recorded}) but {text} was asked: the test "
            "women of another split include women the model was trained on; "
            "leave the flag out to score its own test women, or add "
            "--other-split to score that split anyway"
        )
    log.warning(
        "%s: scoring another split than the model was trained under: %s; some "
        "of these 'test' women were trained on and the metrics are optimistic",
        where, text,
    )  # fmt: skip
    return {**recorded, **differ, "source": "command line (not the training split)"}


def evaluate_checkpoint(
    checkpoint: str | Path | Sequence[str | Path],
    cache_dir: str | Path,
    out_dir: str | Path,
    *,
    view: str = "test",
    test_fraction: float | None = None,
    split_seed: int | None = None,
    allow_other_split: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 2,
    use_ema: bool = False,
    gallery_missed: int = GALLERY_N,
    gallery_fp: int = GALLERY_N,
) -> dict[str, Any]:
    """FROC evaluation of ``checkpoint`` on ``view`` of the site cache.

    ``checkpoint``: one model file, or several whose findings are fused (they
    must work at one spacing).

    ``test_fraction`` / ``split_seed``: the patient split (``None``: the one
    the checkpoints record, else :data:`DEFAULT_TEST_FRACTION` /
    :data:`DEFAULT_SPLIT_SEED`); a value that differs from the recorded one
    needs ``allow_other_split`` (module docstring).

    ``gallery_missed`` and ``gallery_fp`` cap the missed lesions and false
    positives shown per class in ``errors-<class>.png`` (both 0: no gallery;
    the size table is written either way).

    Returns the JSON document written to ``out_dir/metrics.json``.

    Raises:
        CheckpointMismatch: unusable checkpoint, ``use_ema`` without EMA weights.
        SplitMismatch: a split other than the model's training split, or
            models trained under different splits.
        MammofedError: no cache entries; NothingToEvaluate (a ValueError): the
            view holds no image, or the model was trained on every woman;
            ValueError: unknown view, negative gallery size.
    """
    for name, n in (("gallery_missed", gallery_missed), ("gallery_fp", gallery_fp)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device, "--device")
    paths = checkpoint_paths(checkpoint)
    loaded = load_detectors(paths, dev, use_ema=use_ema, pairs_breasts=True)
    ck, std = loaded[0][1], loaded[0][2]
    names = [str(p) for p in paths]
    recorded = recorded_split([c for _, c, _ in loaded])
    where = ", ".join(names)
    split = resolve_split(
        recorded,
        test_fraction=test_fraction,
        split_seed=split_seed,
        allow_other_split=allow_other_split,
        where=where,
    )
    if recorded is None and view == "test":
        log.warning(
            "%s: records no training split (extra.%s); its test women are "
            "those of split seed %d, test fraction %g: if it was trained under "
            "another seed (the federation's), some of them were trained on",
            where, EXTRA_SPLIT, split["seed"], split["test_fraction"],
        )  # fmt: skip
    write_resolved(
        {
            "checkpoint": names,
            "cache_dir": str(cache_dir),
            "model": config_to_dict(ck.model_config),
            "view": view,
            "split": split,
            "n_boot": n_boot,
            "seed": seed,
            "use_ema": use_ema,
            "gallery_missed": gallery_missed,
            "gallery_fp": gallery_fp,
            "standardizer": std.to_dict() if std is not None else None,
        },
        out,
    )
    site = SiteDataset(
        cache_dir,
        test_fraction=split["test_fraction"],
        seed=split["seed"],
        model_spacing_mm=ck.model_config.working_spacing_mm,
        contralateral=ck.model_config.contralateral,
    )
    site_split = site.cache.read_split() is not None
    if (
        view == "test"
        and recorded is not None
        and recorded["test_fraction"] == 0.0
        and not site_split
    ):
        unseen = _unseen_women(loaded, site, where, cache_dir)
        images = site.subset(unseen)
        view = "unseen"
    else:
        images = site.view(view)
    n_images = len(images)
    if n_images == 0:
        raise NothingToEvaluate(f"{cache_dir}: view {view!r} has no images to evaluate")
    title = f"{Path(cache_dir).name} ({view})"

    def standardized(std: Any) -> Dataset[Any]:
        # the site's intensity standardization (export), per model
        return images if std is None else Transformed(images, std)

    runs = [
        detect_dataset(m, standardized(s), dev, batch_size=batch_size)
        for m, _, s in loaded
    ]
    scored = runs[0] if len(runs) == 1 else fuse(runs)
    if ck.model_config.speck_clusters:  # load_detectors: all models agree
        scored = with_speck_clusters_images(
            scored, site.cache.load_specks, str(cache_dir)
        )
    res = score_images(scored, n_boot=n_boot, seed=seed, plot_dir=out, title=title)
    errors = write_error_outputs(
        res.images,
        out,
        site.cache.load_pixels,
        title=f"{Path(cache_dir).name} ({view})",
        n_missed=gallery_missed,
        n_fp=gallery_fp,
        densities={r.key: r.meta.density for r in site.records},
    )
    doc: dict[str, Any] = {
        "checkpoint": names,
        "checkpoint_sha256": [sha256_file(p) for p in paths],
        "use_ema": use_ema,
        "split": {**split, "site_split": site_split},
        "site": str(cache_dir),
        "view": view,
        "n_images": n_images,
        "model_config": ck.model_config.arch,
        "software_version": __version__,
        "checkpoint_version": ck.version,
        **res.to_json(),
        **errors,
    }
    (out / METRICS_JSON).write_text(json.dumps(doc, indent=2))
    for name, r in res.per_class.items():
        log.info(
            "%s: CPM %.3f (95%% CI %s), AP %.3f, %d lesions in %d images",
            name, r.cpm, r.cpm_ci, r.ap, r.n_lesions, r.n_images,
        )  # fmt: skip
    return doc
