"""Hard-negative mining for patch training (the classic CAD training loop).

A detector trained on patches (``augment.patch``) sees little of the normal
breast: a random breast patch rarely holds the dense tissue that looks like a
mass, so the false positives it makes on whole images are the ones it was
never shown. Every ``every`` epochs, :class:`HardNegativeMiner` runs the model
on the **untransformed training images** (the evaluation's path,
:func:`common.detector.engine.detect_dataset`), keeps each image's
highest-scoring false positives by the evaluation's own hit rule
(:func:`common.detector.froc.match_image_lesions`: not a hit, not a duplicate
of a hit, not in an ignore region) in a :class:`HardNegatives` store, and
:class:`common.detector.transforms.PatchCrop` centres a share
(``augment.hard_negative_p``) of its non-lesion patches on one of them.

Only the training women's images are mined (a cross-validation fold's own
training women), so nothing about the validation women leaks into training.
Used by central training (``mammofed-sim train``, ``crossval``); the
federated sites train on whole images, where every negative is in view.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from common.detector.engine import detect_dataset
from common.detector.froc import FALSE_POSITIVE, FrocImage, match_image_lesions
from common.detector.model import without_breast_mask

__all__ = ["MIN_SCORE", "HardNegativeMiner", "HardNegatives", "false_positives"]

log = logging.getLogger(__name__)

#: A false positive scoring below this is not "hard": the model already
#: rejects it (the evaluation's detections start at ``model.score_thresh``).
MIN_SCORE = 0.05


@dataclass
class HardNegatives:
    """Mined false-positive centres per training image.

    ``centres[key]``: float32[K, 2] ``(x, y)`` in the model-space pixels of
    the untransformed image ``key`` (the cache key of ``target["key"]``),
    highest score first. Replaced as a whole by each mining.
    """

    centres: dict[str, np.ndarray] = field(default_factory=dict)

    def get(self, key: object) -> np.ndarray | None:
        """The centres of image ``key`` (``None``: none mined for it)."""
        return self.centres.get(key) if isinstance(key, str) else None

    def replace(self, centres: dict[str, np.ndarray]) -> None:
        """Hold ``centres`` (images with none are left out)."""
        self.centres = {k: v for k, v in centres.items() if len(v)}

    def __len__(self) -> int:
        return sum(len(v) for v in self.centres.values())


def false_positives(image: FrocImage, per_image: int, min_score: float) -> np.ndarray:
    """Centres of ``image``'s top ``per_image`` false positives (every class).

    Each detection gets the outcome the evaluation gives it among all the
    image's detections of its class; only ``FALSE_POSITIVE`` ones scoring at
    least ``min_score`` are kept, highest score first (ties in the given
    order). Returns float32[K, 2] ``(x, y)`` model-space pixels, ``K <= per_image``.
    """
    if per_image < 1:
        raise ValueError(f"per_image must be >= 1, got {per_image!r}")
    fp = np.zeros(len(image.det_scores), dtype=bool)
    for label in np.unique(image.det_labels):
        where = np.nonzero(image.det_labels == label)[0]
        _, outcomes, _ = match_image_lesions(image, int(label))
        fp[where] = outcomes == FALSE_POSITIVE
    keep = np.nonzero(fp & (image.det_scores >= min_score))[0]
    keep = keep[np.argsort(-image.det_scores[keep], kind="stable")][:per_image]
    b = image.det_boxes[keep].reshape(-1, 4)
    return np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1).astype(
        np.float32
    )


class HardNegativeMiner:
    """Mines ``dataset`` into ``store`` after every ``every``-th epoch.

    Called as an epoch hook (``common.detector.engine.fit``'s ``mine_fn``):
    ``miner(model, epoch)`` mines after epochs ``every - 1``, ``2 * every - 1``,
    ... (counted from 0 across resumes); a resumed run whose store is still
    empty mines at once when a mining epoch has passed, so it goes on with the
    negatives it would have had. Returns a record for the epoch log (empty
    when it did not mine). With ``epochs`` (the run's), nothing is mined
    after the last epoch, when no patch would use it.

    ``dataset`` yields untransformed ``(FloatTensor[1, H, W], target)`` with
    ground truth and ``key`` (``common.imaging.data`` items): the images the
    transform holding ``store`` crops.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        store: HardNegatives,
        *,
        every: int,
        per_image: int,
        device: torch.device | str = "cpu",
        amp: bool = True,
        batch_size: int = 2,
        min_score: float = MIN_SCORE,
        epochs: int | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"hard_negative_every must be >= 1, got {every!r}")
        if per_image < 1:
            raise ValueError(f"hard_negative_per_image must be >= 1, got {per_image!r}")
        self.dataset, self.store = dataset, store
        self.every, self.per_image, self.min_score = every, per_image, min_score
        self.device, self.amp, self.batch_size = device, amp, batch_size
        self.epochs, self.minings = epochs, 0

    def due(self, epoch: int) -> bool:
        """Whether to mine after ``epoch`` (0-based; never after the last)."""
        if self.epochs is not None and epoch + 1 >= self.epochs:
            return False
        if (epoch + 1) % self.every == 0:
            return True
        return self.minings == 0 and epoch + 1 >= self.every

    def mine(self, model: nn.Module) -> dict[str, Any]:
        """Mine now; returns counts and the time it took."""
        t0 = time.perf_counter()
        with without_breast_mask(model):  # mine what the model itself proposes
            images: Sequence[FrocImage] = detect_dataset(
                model,
                self.dataset,
                self.device,
                batch_size=self.batch_size,
                amp=self.amp,
            )
        k, floor = self.per_image, self.min_score
        self.store.replace({im.key: false_positives(im, k, floor) for im in images})
        self.minings += 1
        rec = {
            "hard_negatives": len(self.store),
            "images_with_hard_negatives": len(self.store.centres),
            "images_mined": len(images),
            "mining_s": round(time.perf_counter() - t0, 1),
        }
        log.info(
            "hard negatives: %d false positives on %d of %d training images (%.0f s)",
            rec["hard_negatives"], rec["images_with_hard_negatives"],
            rec["images_mined"], rec["mining_s"],
        )  # fmt: skip
        return rec

    def __call__(self, model: nn.Module, epoch: int) -> dict[str, Any]:
        """Mine after ``epoch`` when :meth:`due`; the record, or ``{}``."""
        return self.mine(model) if self.due(epoch) else {}
