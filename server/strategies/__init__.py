"""Strategy registry: ``name -> factory(FederationConfig) -> Strategy``.

Every strategy is a Flower ``flwr.serverapp.strategy`` class subclassed with
the guards of :mod:`server.strategies.base` (bounded waits, validation).
"""

from __future__ import annotations

from collections.abc import Callable

from common.errors import ConfigError
from common.wire.federation import FederationConfig
from server.strategies.base import GuardedFedAvg, wait_for_nodes
from server.strategies.fedavg import build_fedavg
from server.strategies.fedprox import build_fedprox
from server.strategies.personalized import build_personalized
from server.strategies.robust import build_fedmedian, build_fedtrimmedavg
from server.strategies.serveropt import build_fedadam, build_fedavgm

StrategyFactory = Callable[[FederationConfig], GuardedFedAvg]

STRATEGIES: dict[str, StrategyFactory] = {
    "fedavg": build_fedavg,
    "fedprox": build_fedprox,
    "personalized": build_personalized,
    "fedmedian": build_fedmedian,
    "fedtrimmedavg": build_fedtrimmedavg,
    "fedavgm": build_fedavgm,
    "fedadam": build_fedadam,
}


def build_strategy(cfg: FederationConfig) -> GuardedFedAvg:
    """The strategy named by ``cfg.strategy.name``; unknown names list valid ones."""
    name = cfg.strategy.name
    if name not in STRATEGIES:
        raise ConfigError(
            "federation config",
            "strategy.name",
            f"unknown strategy {name!r} (valid names: {', '.join(sorted(STRATEGIES))})",
        )
    return STRATEGIES[name](cfg)


__all__ = ["STRATEGIES", "GuardedFedAvg", "build_strategy", "wait_for_nodes"]
