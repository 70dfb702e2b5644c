"""Self-training: a site's own models label its unlabeled training images.

Offline pseudo-labelling (Noisy Student, STAC): the site runs the models it
already has (the recommended regime's members, say) over its unlabeled
training images, fuses their findings by weighted box fusion
(:func:`common.detector.ensemble.fuse_detections`) and keeps a fused finding
as a lesion box when its score is at least ``keep``; a finding scoring in
``[ignore, keep)`` becomes an ignore region (no classification loss at the
background locations inside it, as the annotations' ignore boxes; until
stop 51 the loss never saw ignore regions and taught them as background),
and the rest of the image is background. A model
then trains on the labeled images plus these, which is where the teacher's
knowledge (several models, the federation's among them) reaches one model.

A fused score is the sum of the models' scores over their number, so with
three models ``keep`` 0.5 wants a finding that most of them make with
confidence. Everything stays on the site: the images, the models, the boxes.

Coordinates: model space of each image (pixel edges, origin top-left), as
:func:`common.detector.engine.predict_images` returns them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common.detector.engine import predict_images
from common.detector.ensemble import fuse_detections
from common.imaging.data import collate
from common.keys import CLASS_TO_LABEL, CLASSES

__all__ = ["PseudoConfig", "PseudoLabeled", "pseudo_label"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PseudoConfig:
    """Thresholds on the fused score (``0 <= ignore <= keep <= 1``)."""

    keep: float = 0.5
    ignore: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 <= self.ignore <= self.keep <= 1.0:
            raise ValueError(
                f"pseudo-labels: need 0 <= ignore <= keep <= 1, got ignore "
                f"{self.ignore!r}, keep {self.keep!r}"
            )


class PseudoLabeled(Dataset[tuple[torch.Tensor, dict[str, Any]]]):
    """``base``'s images with pseudo targets in place of their own.

    ``base`` is a dataset of ``(image, target)`` with ``target(i)`` (a
    :class:`common.imaging.data.SiteView` of unlabeled images); ``boxes``,
    ``labels`` and ``ignore`` are per item. Every item is ``labeled`` (its
    targets are complete as far as the teacher goes) and marked ``pseudo``.
    """

    def __init__(
        self,
        base: Dataset[Any],
        boxes: Sequence[np.ndarray],
        labels: Sequence[np.ndarray],
        ignore: Sequence[np.ndarray],
    ) -> None:
        n = len(base)  # type: ignore[arg-type]
        if not len(boxes) == len(labels) == len(ignore) == n:
            raise ValueError(
                f"pseudo-labels: {len(boxes)} boxes, {len(labels)} labels and "
                f"{len(ignore)} ignore lists for {n} images"
            )
        self.base = base
        self._boxes = [np.asarray(b, np.float32).reshape(-1, 4) for b in boxes]
        self._labels = [np.asarray(lb, np.int64).reshape(-1) for lb in labels]
        self._ignore = [np.asarray(g, np.float32).reshape(-1, 4) for g in ignore]

    def __len__(self) -> int:
        return len(self._boxes)

    def target(self, i: int) -> dict[str, Any]:
        """Item ``i``'s pseudo target (no pixels decoded)."""
        t = dict(self.base.target(i))  # type: ignore[attr-defined]
        t["boxes"] = torch.from_numpy(self._boxes[i].copy())
        t["labels"] = torch.from_numpy(self._labels[i].copy())
        t["ignore"] = torch.from_numpy(self._ignore[i].copy())
        t["labeled"] = True
        t["pseudo"] = True
        return t

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image, _ = self.base[i]
        return image, self.target(i)

    def counts(self) -> dict[str, Any]:
        """Images, images with boxes, boxes per class, ignore regions."""
        every = np.concatenate(self._labels) if self._labels else np.zeros(0)
        return {
            "images": len(self),
            "images_with_boxes": sum(1 for b in self._boxes if len(b)),
            "boxes": {c: int((every == CLASS_TO_LABEL[c]).sum()) for c in CLASSES},
            "ignore_regions": int(sum(len(g) for g in self._ignore)),
        }


@torch.no_grad()
def pseudo_label(
    models: Sequence[nn.Module],
    images: Dataset[Any],
    cfg: PseudoConfig,
    device: torch.device | str = "cpu",
    *,
    batch_size: int = 2,
) -> tuple[PseudoLabeled, list[dict[str, np.ndarray]]]:
    """Label ``images`` (a view with ``target(i)``) with the fused ``models``.

    Returns the pseudo-labeled dataset and, per image, the fused findings
    (``boxes``, ``scores``, ``labels``, model space) it was made from.

    Raises:
        ValueError: no model, or an item without ``spacing_mm``.
    """
    if not models:
        raise ValueError("pseudo-labels: no model to label with")
    loader = DataLoader(
        images, batch_size=batch_size, shuffle=False, collate_fn=collate
    )
    fused_all: list[dict[str, np.ndarray]] = []
    boxes, labels, ignore = [], [], []
    for imgs, targets in loader:
        per_model = [predict_images(m, imgs, device) for m in models]
        for j, t in enumerate(targets):
            if "spacing_mm" not in t:
                raise ValueError(
                    f"pseudo-labels: image {t.get('key', j)}: target has no spacing_mm"
                )
            fused = fuse_detections([d[j] for d in per_model], float(t["spacing_mm"]))
            s = fused["scores"]
            kept = s >= cfg.keep
            doubt = (s >= cfg.ignore) & ~kept
            boxes.append(fused["boxes"][kept])
            labels.append(fused["labels"][kept])
            ignore.append(fused["boxes"][doubt])
            fused_all.append(fused)
    return PseudoLabeled(images, boxes, labels, ignore), fused_all
