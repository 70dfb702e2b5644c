"""``fedmedian`` and ``fedtrimmedavg``: Flower's robust aggregators, guarded.

Coordinate-wise median (:class:`flwr.serverapp.strategy.FedMedian`) and
trimmed mean (:class:`flwr.serverapp.strategy.FedTrimmedAvg`, Yin et al.
2018) of the valid updates. Both keep everything
:class:`server.strategies.base.GuardedFedAvg` adds (bounded waits, reply
validation, num-examples cap, norm clipping, content-order aggregation) and
ignore ``num-examples`` for the arrays (train metrics are still weighted).

They compose with personalization: sites send only their shared arrays, and
validation pins replies to the global model's names and shapes, so the median
or trimmed mean runs over exactly the shared arrays (FedBN norm layers and the
FedPer personal head never reach the server).

With ``n`` valid updates and ``f`` of them hostile, the median stays between
honest values coordinate by coordinate while ``f < n / 2``; the trimmed mean
while ``f <= floor(trim_beta * n)``. With two nodes neither can tell which one
lies (the median of two is their mean): then the norm clip is the bound.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg

from common.wire.federation import FederationConfig
from server.strategies.base import PersonalizedSummary


class GuardedFedMedian(PersonalizedSummary, FedMedian):
    """Coordinate-wise median of the valid (capped, clipped) updates."""

    name = "fedmedian"


class GuardedFedTrimmedAvg(PersonalizedSummary, FedTrimmedAvg):
    """Coordinate-wise trimmed mean (``strategy.trim_beta`` cut at each end)."""

    name = "fedtrimmedavg"


def build_fedmedian(cfg: FederationConfig) -> GuardedFedMedian:
    """Factory of ``fedmedian`` (any personalization)."""
    return GuardedFedMedian(cfg)


def build_fedtrimmedavg(cfg: FederationConfig) -> GuardedFedTrimmedAvg:
    """Factory of ``fedtrimmedavg`` (any personalization), ``beta = trim_beta``."""
    return GuardedFedTrimmedAvg(cfg, beta=cfg.strategy.trim_beta)
