"""``fedavg``: Flower's FedAvg, guarded (see :mod:`server.strategies.base`)."""

from __future__ import annotations

from common.errors import ConfigError
from common.wire.federation import FederationConfig
from server.strategies.base import GuardedFedAvg


class MammofedFedAvg(GuardedFedAvg):
    """Plain federated averaging of all shared arrays."""

    name = "fedavg"


def build_fedavg(cfg: FederationConfig) -> MammofedFedAvg:
    """Factory of ``fedavg``; refuses a config that asks for personalization."""
    pers = cfg.personalization
    if pers.local_norm or pers.personal_head:
        raise ConfigError(
            "federation config",
            "strategy.name",
            "fedavg with personalization is 'personalized'; got fedavg with "
            f"local_norm={pers.local_norm}, personal_head={pers.personal_head}",
        )
    return MammofedFedAvg(cfg)
