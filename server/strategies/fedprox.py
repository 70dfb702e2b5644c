"""``fedprox``: Flower's FedProx, guarded. Sends ``proximal-mu``; clients apply it."""

from __future__ import annotations

from flwr.serverapp.strategy import FedProx

from common.errors import ConfigError
from common.wire.federation import FederationConfig
from server.strategies.base import GuardedFedAvg


class MammofedFedProx(GuardedFedAvg, FedProx):
    """FedProx (server side = FedAvg + ``proximal-mu`` in every train config)."""

    name = "fedprox"


def build_fedprox(cfg: FederationConfig) -> MammofedFedProx:
    """Factory of ``fedprox``; ``strategy.proximal_mu`` must be > 0."""
    if cfg.strategy.proximal_mu <= 0:
        raise ConfigError(
            "federation config",
            "strategy.proximal_mu",
            f"must be > 0 for fedprox, got {cfg.strategy.proximal_mu!r}",
        )
    return MammofedFedProx(cfg, proximal_mu=cfg.strategy.proximal_mu)
