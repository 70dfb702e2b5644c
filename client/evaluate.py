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
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from client.export import checkpoint_paths, load_detectors
from common import __version__
from common.config.loader import config_to_dict, write_resolved
from common.detector.engine import detect_dataset, resolve_device, score_images
from common.detector.ensemble import fuse
from common.detector.errors import GALLERY_N, write_error_outputs
from common.detector.recipe import Transformed
from common.errors import MammofedError
from common.imaging.data import SiteDataset

log = logging.getLogger(__name__)

METRICS_JSON = "metrics.json"


class NothingToEvaluate(MammofedError, ValueError):
    """The view chosen for evaluation holds no image (the message names both)."""


def evaluate_checkpoint(
    checkpoint: str | Path | Sequence[str | Path],
    cache_dir: str | Path,
    out_dir: str | Path,
    *,
    view: str = "test",
    test_fraction: float = 0.2,
    split_seed: int = 0,
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

    ``gallery_missed`` and ``gallery_fp`` cap the missed lesions and false
    positives shown per class in ``errors-<class>.png`` (both 0: no gallery;
    the size table is written either way).

    Returns the JSON document written to ``out_dir/metrics.json``.

    Raises:
        CheckpointMismatch: unusable checkpoint.
        MammofedError: no cache entries; NothingToEvaluate (a ValueError): the
            view holds no image; ValueError: unknown view, negative gallery size.
    """
    for name, n in (("gallery_missed", gallery_missed), ("gallery_fp", gallery_fp)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    paths = checkpoint_paths(checkpoint)
    loaded = load_detectors(paths, dev, use_ema=use_ema)
    ck, std = loaded[0][1], loaded[0][2]
    names = ", ".join(map(str, paths))
    write_resolved(
        {
            "checkpoint": names,
            "cache_dir": str(cache_dir),
            "model": config_to_dict(ck.model_config),
            "view": view,
            "test_fraction": test_fraction,
            "split_seed": split_seed,
            "n_boot": n_boot,
            "seed": seed,
            "use_ema": use_ema,
            "gallery_missed": gallery_missed,
            "gallery_fp": gallery_fp,
            "standardizer": std.to_dict() if std is not None else None,
        },
        out,
    )
    site = SiteDataset(cache_dir, test_fraction=test_fraction, seed=split_seed)
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
