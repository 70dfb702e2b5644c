"""Lesion-balanced sampling: most mammograms have no lesion.

:func:`balanced_sampler` returns a ``WeightedRandomSampler`` that draws, with
replacement, an image that has at least one lesion box with probability
``lesion_prob`` and a lesion-free image otherwise; within each group images are
equally likely. Per-image weights are ``lesion_prob / n_lesion`` and
``(1 - lesion_prob) / n_normal``. If one group is empty every image gets the
same weight (logged). An epoch is ``num_samples`` draws (default: the dataset
size), so one epoch's length does not depend on the balance.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset, WeightedRandomSampler

from common.imaging.data import item_targets

log = logging.getLogger(__name__)


def lesion_weights(has_lesion: Sequence[bool], lesion_prob: float) -> torch.Tensor:
    """Per-image sampling weights float64[N] summing to 1 (see module docstring)."""
    if not 0.0 <= lesion_prob <= 1.0:
        raise ValueError(f"lesion_prob must be in [0, 1], got {lesion_prob!r}")
    flags = torch.as_tensor([bool(f) for f in has_lesion], dtype=torch.bool)
    n = len(flags)
    if n == 0:
        raise ValueError("balanced sampling needs at least one image, got none")
    n_les = int(flags.sum())
    n_norm = n - n_les
    if n_les == 0 or n_norm == 0:
        log.warning(
            "balanced sampler: %d lesion and %d normal images; sampling uniformly",
            n_les,
            n_norm,
        )
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    w = torch.where(
        flags,
        torch.tensor(lesion_prob / n_les, dtype=torch.float64),
        torch.tensor((1.0 - lesion_prob) / n_norm, dtype=torch.float64),
    )
    return w


def lesion_flags(dataset: Dataset) -> list[bool]:
    """``True`` per item whose target has at least one box.

    Uses ``dataset.lesion_flags()`` or ``dataset.target(i)`` (as
    ``common.imaging.data.SiteView`` offers) when available, so no image is decoded;
    otherwise reads every item once.
    """
    fn = getattr(dataset, "lesion_flags", None)
    if callable(fn):
        return [bool(x) for x in fn()]
    return [int(t["boxes"].shape[0]) > 0 for t in item_targets(dataset)]


def balanced_sampler(
    has_lesion: Sequence[bool],
    lesion_prob: float,
    *,
    num_samples: int | None = None,
    seed: int = 0,
) -> WeightedRandomSampler:
    """Sampler drawing lesion images with probability ``lesion_prob`` (seeded)."""
    w = lesion_weights(has_lesion, lesion_prob)
    gen = torch.Generator().manual_seed(int(seed))
    n = int(num_samples) if num_samples is not None else len(w)
    return WeightedRandomSampler(w.tolist(), n, replacement=True, generator=gen)
