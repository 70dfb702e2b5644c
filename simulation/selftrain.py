"""Self-training in a study: a site's own models label its unlabeled women.

A central ``each`` regime with :attr:`~simulation.regimes.Regime.pseudo_from`
trains, at each site, on the site's labeled training images plus its
unlabeled training images labeled by that regime's models of the site (an
ensemble's members fused, :mod:`common.detector.adapt.pseudo`). The models
come from the run folders that trained them: a federated member's site
model is exported as the site exports it; a central member's is the file
``run_study`` keeps (``<regime>/models/<site>.pt``).

The phantom knows every unlabeled woman's lesions (the oracle cache), so the
study also scores the pseudo boxes themselves: precision (kept boxes on a
lesion of their class) and recall (lesions under a kept box), per class, in
``<regime>/pseudo-<site>.json``. A real site has no such truth; the boxes it
makes are the same.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from common.detector.adapt.pseudo import PseudoConfig, PseudoLabeled, pseudo_label
from common.detector.froc import DUPLICATE, HIT, FrocImage, match_image_lesions
from common.errors import MammofedError
from common.fileio import atomic_write_text
from common.imaging.data import DEFAULT_TEST_FRACTION, SiteDataset
from common.keys import CLASS_TO_LABEL, CLASSES
from common.wire import runfolder as RF
from simulation import regimes as R

log = logging.getLogger(__name__)

#: Where ``run_study`` keeps a central regime's models: ``<regime>/models/<name>.pt``.
MODELS_DIR = "models"


def central_model_path(run_dir: Path, regime: str, name: str) -> Path:
    """The file of central ``regime``'s model ``name`` (a site, or the pool)."""
    return run_dir / regime / MODELS_DIR / f"{name}.pt"


def export_site_model(
    federated: str, site: str, source_run: Path, path: Path, who: str
) -> Path:
    """Export federated regime ``federated``'s final model of ``site`` to ``path``.

    Its last complete global round plus the site's personal state, from the
    run folder that trained it (``source_run`` or the run it was copied from).

    Raises:
        MammofedError: that run kept no complete round or no state of the
            site (the message names ``who`` and the folder).
    """
    from client.export import export_model
    from simulation.run import trained_in

    src = trained_in(source_run, federated) / federated
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        done = export_model(
            src / RF.SERVER_DIR / RF.CHECKPOINT_DIR,
            path,
            site=site,
            state_dir=src / RF.SITE_STATE_DIR,
        )
    except MammofedError as exc:
        raise MammofedError(
            f"[{who}] site {site}: no model of {federated}: {exc}"
        ) from exc
    log.info(
        "[%s] site %s starts from %s's round-%d model (%s)",
        who, site, federated, done.round, src,
    )  # fmt: skip
    return path


def teacher_paths(
    spec: R.Regime, site: str, sources: Mapping[str, Path], out: Path
) -> list[Path]:
    """The checkpoints of ``spec.pseudo_from``'s models of ``site``.

    An ensemble's members (each federated one exported to
    ``<out>/<spec>/teachers/``), or the regime itself; ``sources``: the run
    folder each was read from when the study reused it (default ``out``).

    Raises:
        MammofedError: a central member's model was not kept (a run made
            before models were kept: train that regime in this study).
    """
    from simulation.run import trained_in

    assert spec.pseudo_from is not None
    source = R.REGIMES[spec.pseudo_from]
    names = source.members or (source.name,)
    paths = []
    for name in names:
        member = R.REGIMES[name]
        if member.kind == "federated":
            dest = out / spec.name / "teachers" / f"{name}-{site}.pt"
            src = sources.get(name, out)
            paths.append(export_site_model(name, site, src, dest, spec.name))
            continue
        if member.kind != "central" or member.train_on != "each":
            raise MammofedError(
                f"[{spec.name}] {name} cannot label site {site}'s images: only "
                "federated and per-site central regimes keep a model of the site"
            )
        path = central_model_path(trained_in(sources.get(name, out), name), name, site)
        if not path.is_file():
            raise MammofedError(
                f"[{spec.name}] {path}: missing: {name}'s model of site {site} "
                "was not kept (runs before stop 43 kept none); train "
                f"{name} in this study instead of reusing it"
            )
        paths.append(path)
    return paths


def _load(path: Path, device: torch.device) -> nn.Module:
    from client.export import load_detector

    model, _, std = load_detector(path, device)
    if std is not None:
        raise MammofedError(
            f"{path}: the model carries an intensity standardizer; self-training "
            "in a study does not apply one (trainer.options.standardize)"
        )
    return model


def pseudo_quality(data: PseudoLabeled, oracle: Path, seed: int) -> dict[str, Any]:
    """Kept pseudo boxes scored against the oracle's lesions of the same images.

    Per class: ``boxes`` kept, ``on_lesion`` (a hit or a second box on a
    lesion, the evaluation's rule), ``precision``, ``lesions`` and ``found``
    (under a kept box), ``recall``; ``images_matched`` counts the images the
    oracle cache holds.
    """
    truth = {}
    view = SiteDataset(oracle, seed=seed).view("all")
    for i in range(len(view)):
        t = view.target(i)
        truth[t["key"]] = t
    out: dict[str, Any] = {"images_matched": 0}
    tally: dict[str, dict[str, Any]] = {
        c: {"boxes": 0, "on_lesion": 0, "lesions": 0, "found": 0} for c in CLASSES
    }
    for i in range(len(data)):
        t = data.target(i)
        gt = truth.get(t["key"])
        if gt is None:
            continue
        out["images_matched"] += 1
        image = FrocImage(
            key=str(t["key"]),
            spacing_mm=float(t["spacing_mm"]),
            gt_boxes=gt["boxes"].numpy().astype(np.float64),
            gt_labels=gt["labels"].numpy().astype(np.int64),
            ignore_boxes=np.zeros((0, 4)),
            det_boxes=t["boxes"].numpy().astype(np.float64),
            det_scores=np.ones(len(t["boxes"])),
            det_labels=t["labels"].numpy().astype(np.int64),
        )
        for c in CLASSES:
            _, outcomes, hit_by = match_image_lesions(image, CLASS_TO_LABEL[c])
            k = tally[c]
            k["boxes"] += len(outcomes)
            k["on_lesion"] += int(np.isin(outcomes, (HIT, DUPLICATE)).sum())
            k["lesions"] += len(hit_by)
            k["found"] += int((hit_by >= 0).sum())
    for c, k in tally.items():
        k["precision"] = k["on_lesion"] / k["boxes"] if k["boxes"] else None
        k["recall"] = k["found"] / k["lesions"] if k["lesions"] else None
        out[c] = k
    return out


def pseudo_for_site(
    spec: R.Regime,
    site: str,
    cache: Path,
    *,
    sources: Mapping[str, Path],
    out: Path,
    spacing_mm: float,
    seed: int,
    device: torch.device,
    oracle: Path | None = None,
    cfg: PseudoConfig = PseudoConfig(),
) -> list[Dataset[Any]]:
    """The pseudo-labeled unlabeled training images of ``site`` (``[]``: none).

    Writes ``<out>/<spec>/pseudo-<site>.json``: the thresholds, the counts
    and, with ``oracle``, the boxes' precision and recall.
    """
    images = SiteDataset(
        cache,
        test_fraction=DEFAULT_TEST_FRACTION,
        seed=seed,
        model_spacing_mm=spacing_mm,
    ).view("unlabeled")
    if len(images) == 0:
        log.info("[%s] site %s: no unlabeled training images", spec.name, site)
        return []
    paths = teacher_paths(spec, site, sources, out)
    models = [_load(p, device) for p in paths]
    data, _ = pseudo_label(models, images, cfg, device)
    record: dict[str, Any] = {
        "site": site,
        "teachers": [str(p) for p in paths],
        "keep_threshold": cfg.keep,
        "ignore_threshold": cfg.ignore,
        **data.counts(),
    }
    if oracle is not None:
        record["quality"] = pseudo_quality(data, oracle, seed)
    atomic_write_text(
        out / spec.name / f"pseudo-{site}.json", json.dumps(record, indent=1) + "\n"
    )
    log.info(
        "[%s] site %s: %d unlabeled images, %d with pseudo boxes (%s), %d ignore "
        "regions",
        spec.name,
        site,
        record["images"],
        record["images_with_boxes"],
        ", ".join(f"{c} {n}" for c, n in record["boxes"].items()),
        record["ignore_regions"],
    )
    return [data]
