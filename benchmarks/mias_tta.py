"""Test-time augmentation on a cross-validation's own fold models (no training).

A finished ``mammofed-sim crossval`` run keeps every fold's model
(``fold-<f>/last.pt``, with its EMA weights when the recipe has one). This
benchmark detects each fold's held-out images again with:

* ``plain``: the model as trained, no test-time augmentation (the baseline,
  in the same run);
* ``flip``: the model's own up-down flip fusion (``model.tta_flip``; until
  stop 48 a finding's score averaged with its best partner at IoU >= 0.3 in
  the other view, then NMS over both views; since, weighted box fusion);
* ``flip-wbf``: the image and its up-down mirror, findings fused here by
  weighted box fusion (:func:`common.detector.ensemble.fuse_detections`: boxes
  averaged, a finding of one view keeps half its score): since stop 48 the
  same rule as ``flip``, run outside the model, so the two arms check each
  other (they agree to the digit);
* ``scales-flip-wbf``: the same over several scales (``--scales``, default
  the recipe's training scale range 0.85, 1.0, 1.15), six views in all.

Each arm's out-of-fold file goes to ``--out`` (``oof-<run>-<arm>.json``), and
``mias_tta.jsonl`` gets, per arm and class, its CPM minus ``plain``'s, paired
on the same images and pooled over the runs given (one per seed:
:func:`benchmarks.compare_runs.compare`).

Usage (the recommended 0.4 mm recipe's three seeds, fold models kept)::

    python -m benchmarks.mias_tta --run out/mias04base-seed{0,1,2} \\
        --out out/tta --results benchmarks/results/mias_04_limits

With ``--checkpoint CK --cache C...`` instead of ``--run``, one model's
``plain`` against its ``flip`` on each cache's test women
(``flip-minus-plain-cpm-<class>`` per cache, paired over its images): the
phantom's vendor-H base model on the four demo sites, say::

    python -m benchmarks.mias_tta --checkpoint models/demo-base-h.pt \\
        --cache out/demo/data/cache/{A,B,C,D} \\
        --results benchmarks/results/mias_04_limits
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import emit, rounded
from benchmarks.compare_runs import compare
from common.detector.checkpoint import load_model
from common.detector.engine import detect_dataset
from common.detector.ensemble import fuse_detections
from common.detector.froc import FrocImage, pooled_paired_cpm_difference
from common.detector.model.fcos import MammoFCOS
from common.detector.transforms import vflip_boxes
from common.imaging.data import SiteDataset
from common.keys import CLASSES
from common.progress import Eta
from simulation.crossval import make_folds
from simulation.train import load_train_config

BENCH = "mias_tta"
ARMS = ("plain", "flip", "flip-wbf", "scales-flip-wbf")


class MultiView(nn.Module):
    """``model`` (eval mode) on several views of each image, findings fused.

    Each image is resized by every scale (bilinear) and, with ``flip``, also
    mirrored up-down; every view is detected, its boxes mapped back to the
    input image's pixels, and the views' findings fused per image by
    :func:`fuse_detections` (reach in mm at ``spacing_mm``).
    """

    def __init__(
        self, model: nn.Module, scales: Sequence[float], flip: bool, spacing_mm: float
    ):
        super().__init__()
        self.model, self.scales, self.flip = model, tuple(scales), flip
        self.spacing_mm = spacing_mm

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        views: list[list[dict[str, Any]]] = [[] for _ in images]
        for s in self.scales:
            scaled = [
                im
                if s == 1.0
                else F.interpolate(
                    im[None], scale_factor=s, mode="bilinear", align_corners=False
                )[0]
                for im in images
            ]
            for flipped in (False, True) if self.flip else (False,):
                seen = [im.flip(-2) for im in scaled] if flipped else scaled
                for i, (im, out) in enumerate(zip(seen, self.model(seen), strict=True)):
                    boxes = out["boxes"]
                    if flipped:  # back from the mirror
                        boxes = vflip_boxes(boxes, im.shape[-2])
                    views[i].append(
                        {
                            "boxes": (boxes / s).cpu().numpy(),
                            "scores": out["scores"].cpu().numpy(),
                            "labels": out["labels"].cpu().numpy(),
                        }
                    )
        fused = [fuse_detections(v, self.spacing_mm) for v in views]
        return [
            {
                "boxes": torch.as_tensor(f["boxes"], dtype=torch.float32),
                "scores": torch.as_tensor(f["scores"], dtype=torch.float32),
                "labels": torch.as_tensor(f["labels"]),
            }
            for f in fused
        ]


def arm_model(model: MammoFCOS, arm: str, scales: Sequence[float]) -> nn.Module:
    """The fold's model as ``arm`` runs it (sets ``model.cfg.tta_flip`` to match)."""
    model.cfg = dataclasses.replace(model.cfg, tta_flip=arm == "flip")
    if arm in ("plain", "flip"):
        return model
    if arm not in ARMS:
        raise ValueError(f"no test-time augmentation arm {arm!r}: one of {ARMS}")
    used = scales if arm == "scales-flip-wbf" else [1.0]
    return MultiView(model, used, True, model.cfg.working_spacing_mm)


def predict_run(
    run: Path, arms: Sequence[str], scales: Sequence[float]
) -> dict[str, list[FrocImage]]:
    """Every arm's out-of-fold images of one crossval ``run`` folder."""
    cfg = load_train_config(run / "resolved_config.yaml")
    fold_dirs = sorted(run.glob("fold-*"))
    k = len(fold_dirs)
    lacking = [d.name for d in fold_dirs if not (d / "last.pt").is_file()]
    if k < 2 or lacking:
        raise ValueError(
            f"{run}: a finished crossval run keeps fold-<f>/last.pt for every "
            f"fold; found {k} fold folders, without a model: {lacking or 'none'}"
        )
    sites = cfg.sites()
    folds = make_folds(sites, k, cfg.split_seed)
    out: dict[str, list[FrocImage]] = {a: [] for a in arms}
    eta = Eta(len(folds) * len(arms))
    for fold in folds:
        ck_path = run / f"fold-{fold.index}" / "last.pt"
        held_out = sorted(
            f"{name}/{sites[name].records[i].key}"
            for name, (_, val) in fold.parts.items()
            for i in val
        )
        recorded = json.loads((ck_path.parent / "fold.json").read_text())["val_keys"]
        if held_out != recorded:  # another cache or split: it trained on them
            raise ValueError(
                f"{ck_path.parent}: fold.json's held-out images are not the ones "
                "this cache and split give; the model may have trained on them"
            )
        model, _ = load_model(ck_path, use_ema=cfg.ema_decay is not None)
        if not isinstance(model, MammoFCOS):
            raise ValueError(
                f"{ck_path}: not an FCOS detector ({type(model).__name__})"
            )
        for arm in arms:
            net = arm_model(model, arm, scales)
            for name, (_, val) in fold.parts.items():
                images = detect_dataset(
                    net, sites[name].subset(val), "cpu", batch_size=cfg.batch_size
                )
                out[arm] += [
                    dataclasses.replace(
                        im,
                        key=f"{name}/{im.key}",
                        case=f"{name}/{im.case}" if im.case else "",
                    )
                    for im in images
                ]
            print(f"{run.name} fold {fold.index} {arm}: {eta.step()}", flush=True)
    return out


def flip_on_caches(
    checkpoint: Path, caches: Sequence[Path], n_boot: int, results: Path | None
) -> None:
    """Emit ``checkpoint``'s flip minus plain CPM on each cache's test women."""
    model, _ = load_model(checkpoint)
    if not isinstance(model, MammoFCOS):
        raise ValueError(f"{checkpoint}: not an FCOS detector")
    for cache in caches:
        site = SiteDataset(cache, model_spacing_mm=model.cfg.working_spacing_mm)
        view = site.view("test")
        arms = {}
        for arm in ("plain", "flip"):
            with torch.no_grad():
                arms[arm] = detect_dataset(arm_model(model, arm, [1.0]), view, "cpu")
        for label, cls in enumerate(CLASSES):
            r = pooled_paired_cpm_difference(
                [arms["plain"]], [arms["flip"]], label, n_boot=n_boot
            )
            emit(
                BENCH,
                f"flip-minus-plain-cpm-{cls}",
                r["diff"],
                "cpm",
                results_dir=results,
                site=cache.name,
                cpm_a=rounded(r["cpm_a"]),
                cpm_b=rounded(r["cpm_b"]),
                paired_ci95=[rounded(x) for x in r["ci95"]],
                n_images=len(view),
                checkpoint=str(checkpoint),
            )


def main(argv: list[str] | None = None) -> int:
    """Re-predict the runs' folds per arm; emit each arm minus ``plain``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, nargs="+", default=None)
    p.add_argument("--scales", default="0.85,1.0,1.15")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--cache", type=Path, nargs="+", default=None)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--results", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.checkpoint is not None or args.cache is not None:
        if args.checkpoint is None or args.cache is None or args.run is not None:
            p.error("--checkpoint and --cache go together, without --run")
        flip_on_caches(args.checkpoint, args.cache, args.n_boot, args.results)
        return 0
    if args.run is None or args.out is None:
        p.error("--run and --out (or --checkpoint and --cache) are required")
    scales = [float(s) for s in args.scales.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[Path]] = {a: [] for a in ARMS}
    for run in args.run:
        with torch.no_grad():
            per_arm = predict_run(run, ARMS, scales)
        for arm, images in per_arm.items():
            path = args.out / f"oof-{run.name}-{arm}.json"
            path.write_text(json.dumps([im.to_json() for im in images]))
            files[arm].append(path)
    for arm in ARMS[1:]:
        for row in compare(files["plain"], files[arm], n_boot=args.n_boot):
            emit(
                BENCH,
                f"{arm}-minus-plain-cpm-{row['class']}",
                row.pop("diff"),
                "cpm",
                results_dir=args.results,
                **row,
                arm=arm,
                scales=scales if arm == "scales-flip-wbf" else [1.0],
                runs=[str(r) for r in args.run],
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
