"""The regimes every study compares: one table line per regime, in report order.

A central regime trains one model per :attr:`Regime.train_on` group with
``simulation.run.train_central``; a federated regime runs the real server and
clients with :attr:`Regime.strategy`, :attr:`Regime.personalization` and
:attr:`Regime.options` laid over the study's federation config (see
``simulation.run._regime_config``). Values taken from ``mammofed-sim run``
flags are named in :attr:`Regime.from_request` (option -> ``RunRequest`` field).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from common.wire.federation import PersonalizationConfig

BASE = "base"
LOCAL_ONLY = "local-only"
FEDAVG = "fedavg"
FEDAVG_SELECT = "fedavg-select"
FEDAVGM = "fedavgm"
FEDADAM = "fedadam"
FEDPROX = "fedprox"
PERSONALIZED = "personalized"
PERSONALIZED_STATS = "personalized-stats"
PERSONALIZED_SELECT = "personalized-select"
PERSONALIZED_SSL = "personalized-ssl"
PERSONALIZED_DP = "personalized-dp"
ORACLE = "oracle"
FEDMEDIAN = "fedmedian"
FEDTRIMMEDAVG = "fedtrimmedavg"

_PERSONAL = PersonalizationConfig(local_norm=True, personal_head=True)


def _frozen(**kw: Any) -> Mapping[str, Any]:
    return MappingProxyType(kw)


@dataclass(frozen=True)
class Regime:
    """What one regime does.

    Attributes:
        name: the regime's name (report column, run-folder sub-folder).
        train_on: central regimes: ``base`` (one model on the base sites),
            ``each`` (one model per site, on its own labels) or ``oracle`` (one
            model on every site's complete labels); ``None`` for federated ones.
        strategy: the server strategy (``server.strategies``) of a federated
            regime.
        personalization: what each site keeps to itself (FedBN, FedPer).
        options: ``trainer.options`` set for this regime (over the study's).
        from_request: ``{trainer option or "strategy.<field>": RunRequest
            field}``: values the ``mammofed-sim run`` flags give.
    """

    name: str
    train_on: Literal["base", "each", "oracle"] | None = None
    strategy: str | None = None
    personalization: PersonalizationConfig = PersonalizationConfig()
    options: Mapping[str, Any] = field(default_factory=_frozen)
    from_request: Mapping[str, str] = field(default_factory=_frozen)

    @property
    def kind(self) -> str:
        """``central`` or ``federated``."""
        return "central" if self.train_on is not None else "federated"

    @property
    def private(self) -> bool:
        """Whether the sites train with patient-level DP-SGD."""
        return bool(self.options.get("dp"))

    @property
    def selects(self) -> bool:
        """Whether each site chooses its own model on validation women."""
        return bool(self.options.get("select"))


# few-shot head tuning belongs to the semi-supervised adaptation regime only
# ("personalized + semi-supervised consistency (+ few-shot head tuning)"); the
# baselines train every layer at every site. Under DP, SSL and the
# standardizer would use data outside the per-woman clipping. The ``-select``
# regimes are their base regime with the site-level choice of its own model on
# held-out validation women (``trainer.options.select``, client.selection).
TABLE: tuple[Regime, ...] = (
    Regime(BASE, train_on="base"),
    Regime(LOCAL_ONLY, train_on="each"),
    Regime(FEDAVG, strategy="fedavg", options=_frozen(fewshot=False)),
    Regime(
        FEDAVG_SELECT, strategy="fedavg", options=_frozen(fewshot=False, select=True)
    ),
    # server optimizers over the same FedAvg (docs/federation.md)
    Regime(FEDAVGM, strategy="fedavgm", options=_frozen(fewshot=False)),
    Regime(FEDADAM, strategy="fedadam", options=_frozen(fewshot=False)),
    Regime(
        FEDPROX,
        strategy="fedprox",
        options=_frozen(fewshot=False),
        from_request=_frozen(**{"strategy.proximal_mu": "fedprox_mu"}),
    ),
    Regime(FEDMEDIAN, strategy="fedmedian", options=_frozen(fewshot=False)),
    Regime(FEDTRIMMEDAVG, strategy="fedtrimmedavg", options=_frozen(fewshot=False)),
    Regime(
        PERSONALIZED,
        strategy="personalized",
        personalization=_PERSONAL,
        options=_frozen(fewshot=False, ssl=False),
    ),
    # FedBN + FedPer with the site's BatchNorm statistics re-estimated on its
    # own training images after every round (trainer.options.reestimate_norm)
    Regime(
        PERSONALIZED_STATS,
        strategy="personalized",
        personalization=_PERSONAL,
        options=_frozen(fewshot=False, ssl=False, reestimate_norm=True),
    ),
    Regime(
        PERSONALIZED_SELECT,
        strategy="personalized",
        personalization=_PERSONAL,
        options=_frozen(fewshot=False, ssl=False, select=True),
    ),
    Regime(
        PERSONALIZED_SSL,
        strategy="personalized",
        personalization=_PERSONAL,
        options=_frozen(fewshot=True, ssl=True),
    ),
    Regime(
        PERSONALIZED_DP,
        strategy="personalized",
        personalization=_PERSONAL,
        options=_frozen(fewshot=False, ssl=False, standardize=False, dp=True),
        from_request=_frozen(dp_epsilon="dp_epsilon"),
    ),
    Regime(ORACLE, train_on="oracle"),
)
REGIMES: Mapping[str, Regime] = MappingProxyType({r.name: r for r in TABLE})

#: The regime the project recommends to a federation, chosen by the three-seed
#: study (README, "The study"; benchmarks/results/study_demo): the one the
#: report's goal line and the demo's comparison are about. Personalized with
#: patient-level DP-SGD was the only regime at or above both the H-only base
#: and local-only on every non-H site (mean mass CPM over three seeds); its
#: clipped, noised, few local steps keep the few-shot site near the base.
RECOMMENDED = PERSONALIZED_DP

#: Report column order.
ORDER: tuple[str, ...] = tuple(r.name for r in TABLE)
CENTRAL: frozenset[str] = frozenset(r.name for r in TABLE if r.kind == "central")
FEDERATED: frozenset[str] = frozenset(r.name for r in TABLE if r.kind == "federated")

#: How the federated regimes run (``mammofed-sim run --engine``): the in-process
#: grid, Flower's simulation engine (Ray), or loopback SuperLink + SuperNodes.
ENGINE_INPROCESS = "inprocess"
ENGINE_RAY = "ray"
ENGINE_DEPLOYMENT = "deployment"
ENGINES: tuple[str, ...] = (ENGINE_INPROCESS, ENGINE_RAY, ENGINE_DEPLOYMENT)
