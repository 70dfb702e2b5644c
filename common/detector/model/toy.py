"""The toy trainer's network and its parameter split (plumbing tests, demos).

Both sides need it: the site trains it (``client.toy``), the server builds the
initial global model from it (:mod:`common.detector.model.initial`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from common.config import bounded, from_mapping

__all__ = ["TOY_HEAD_PREFIX", "ToyNet", "ToyOptions", "toy_shared_keys"]

#: ``state_dict`` prefix of the toy head (personal under ``personal_head``).
TOY_HEAD_PREFIX = "head."


@dataclass(frozen=True)
class ToyOptions:
    """``trainer.options`` of the toy trainer: site images, net width, threads."""

    num_examples: int = field(default=64, metadata=bounded(1, None))
    channels: int = field(default=8, metadata=bounded(1, None))
    threads: int = field(default=1, metadata=bounded(1, None))

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> ToyOptions:
        """Validated options; errors name ``trainer.options.<key>`` and the value."""
        return from_mapping(
            dict(options), cls, source="federation config", prefix="trainer.options"
        )


class ToyNet(nn.Module):
    """Conv-BN-ReLU x2, global pooling, linear ``head`` (2 logits)."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(channels, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, 2]`` for images ``x`` ``[N, 1, 16, 16]`` in ``[0, 1]``."""
        return self.head(self.features(x))


def toy_shared_keys(
    model: nn.Module, *, local_norm: bool, personal_head: bool
) -> tuple[str, ...]:
    """``state_dict`` keys of ``model`` that are sent and aggregated, in order.

    Integer buffers are never shared; ``personal_head`` keeps ``head.*`` on the
    site; ``local_norm`` keeps every BatchNorm parameter and statistic there.
    """
    modules = dict(model.named_modules())
    out = []
    for key, value in model.state_dict().items():
        if not np.issubdtype(value.detach().cpu().numpy().dtype, np.floating):
            continue
        if personal_head and key.startswith(TOY_HEAD_PREFIX):
            continue
        module = modules.get(key.rsplit(".", 1)[0])
        if local_norm and isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        out.append(key)
    return tuple(out)
