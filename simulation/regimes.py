"""The regimes every study compares: one table line per regime, in report order.

A central regime trains one model per :attr:`Regime.train_on` group with
``client.local_training.train_central``; a federated regime runs the real server and
clients with :attr:`Regime.strategy`, :attr:`Regime.personalization` and
:attr:`Regime.options` laid over the study's federation config (see
``simulation.run.regime_config``); an ensemble regime trains nothing: each
site runs the models of its :attr:`Regime.members` and fuses their findings
(``common.detector.ensemble``). Values taken from ``mammofed-sim run``
flags are named in :attr:`Regime.from_request` (option -> ``RunRequest`` field).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from common.wire.federation import PersonalizationConfig

BASE = "base"
LOCAL_ONLY = "local-only"
LOCAL_HEAD = "local-head"
FEDAVG = "fedavg"
FEDAVG_SELECT = "fedavg-select"
FEDAVGM = "fedavgm"
FEDADAM = "fedadam"
FEDPROX = "fedprox"
PERSONALIZED = "personalized"
PERSONALIZED_STATS = "personalized-stats"
PERSONALIZED_SELECT = "personalized-select"
PERSONALIZED_SSL = "personalized-ssl"
PERSONALIZED_ALL_LABELS = "personalized-all-labels"
PERSONALIZED_DP = "personalized-dp"
PERSONALIZED_DP_LOCAL = "personalized-dp+local"
PERSONALIZED_DP_LOCAL_HEAD = "personalized-dp+local-head"
PERSONALIZED_DP_TUNED = "personalized-dp-tuned"
PERSONALIZED_DP_TUNED_SSL = "personalized-dp-tuned-ssl"
PERSONALIZED_DP_TUNED_PAIR = "personalized-dp+tuned"
PERSONALIZED_DP_TUNED_SSL_LOCAL = "personalized-dp+tuned-ssl+local"
PERSONALIZED_DP_TUNED_LOCAL = "personalized-dp+tuned+local"
PERSONALIZED_TUNED = "personalized-tuned"
PERSONALIZED_TUNED_LOCAL = "personalized+tuned+local"
PERSONALIZED_SSL_TUNED = "personalized-ssl-tuned"
PERSONALIZED_SSL_TUNED_LOCAL = "personalized-ssl+tuned+local"
PERSONALIZED_SSL_TUNED_LOCAL_FEWSHOT = "personalized-ssl+tuned+local-unless-fewshot"
PERSONALIZED_SSL_TUNED_ALL_LABELS = "personalized-ssl-tuned-all-labels"
PERSONALIZED_SSL_TUNED_PSEUDO = "personalized-ssl-tuned-pseudo"
PERSONALIZED_SSL_TUNED_PSEUDO_LOCAL_FEWSHOT = (
    "personalized-ssl+tuned-pseudo+local-unless-fewshot"
)
LOCAL_ONLY_UNLAB = "local-only-unlab"
PERSONALIZED_SSL_TUNED_UNLAB = "personalized-ssl-tuned-unlab"
PERSONALIZED_SSL_TUNED_LOCAL_UNLAB = "personalized-ssl+tuned+local-unlab"
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
        options: ``trainer.options`` set for this regime (over the study's);
            a central regime reads ``head_only`` (train the detection head
            only, from the base model), ``lr_factor`` (its learning rate
            is the federation's times this) and ``ssl`` with the ``ssl_*``
            settings (semi-supervision on the unlabeled training images).
        from_request: ``{trainer option or "strategy.<field>": RunRequest
            field}``: values the ``mammofed-sim run`` flags give.
        members: an ensemble regime's regimes, whose site models each site
            runs and fuses (they run in the same study).
        fewshot_members: an ensemble regime's members at a few-shot site
            instead (one: that model alone): a site where its federated
            member trains the head only, by the automatic rule
            (:func:`common.detector.adapt.few_labels`: few labeled images,
            none unlabeled it learns from). Empty: ``members`` everywhere.
        all_labels: a federated regime whose sites train on their complete
            labels (the oracle's annotations of every training woman, the
            test women unchanged): the all-labels version of the regime
            against which semi-supervision's gap closed is measured.
        tune_from: a central ``each`` regime that starts every site from
            this federated regime's final model of that site (its last
            global round plus the site's personal state) instead of the base
            model: fine-tuning after federation. It runs in the same study.
            With ``all_labels`` it trains on the site's complete labels.
        pseudo_from: a central ``each`` regime that first labels each site's
            unlabeled training images with this regime's models of that
            site (an ensemble's members fused; :mod:`common.detector.adapt.pseudo`)
            and trains on its labeled images plus those (self-training). It
            runs in the same study and keeps its site models.
    """

    name: str
    train_on: Literal["base", "each", "oracle"] | None = None
    strategy: str | None = None
    personalization: PersonalizationConfig = PersonalizationConfig()
    options: Mapping[str, Any] = field(default_factory=_frozen)
    from_request: Mapping[str, str] = field(default_factory=_frozen)
    members: tuple[str, ...] = ()
    fewshot_members: tuple[str, ...] = ()
    tune_from: str | None = None
    pseudo_from: str | None = None
    all_labels: bool = False

    def __post_init__(self) -> None:
        stray = set(self.fewshot_members) - set(self.members)
        if stray:
            raise ValueError(
                f"regime {self.name}: fewshot_members {sorted(stray)} are not "
                f"among its members {list(self.members)}"
            )
        if self.pseudo_from is not None and self.train_on != "each":
            raise ValueError(
                f"regime {self.name}: pseudo_from needs a regime that trains one "
                f"model per site (train_on 'each'), got {self.train_on!r}"
            )

    @property
    def kind(self) -> str:
        """``central``, ``federated`` or ``ensemble``."""
        if self.members:
            return "ensemble"
        return "central" if self.train_on is not None else "federated"

    @property
    def private(self) -> bool:
        """Whether the sites train with patient-level DP-SGD."""
        return bool(self.options.get("dp"))

    @property
    def head_only(self) -> bool:
        """Whether a central regime trains the detection head only."""
        return bool(self.options.get("head_only"))

    @property
    def lr_factor(self) -> float:
        """A central regime's learning rate over the federation's (default 1)."""
        return float(self.options.get("lr_factor", 1.0))

    @property
    def needs(self) -> tuple[str, ...]:
        """The regimes this one is made from: its members, the one it tunes."""
        return (
            self.members
            + ((self.tune_from,) if self.tune_from else ())
            + ((self.pseudo_from,) if self.pseudo_from else ())
        )

    @property
    def ssl(self) -> bool:
        """Whether a central regime adds the mean teacher's consistency loss."""
        return self.kind == "central" and bool(self.options.get("ssl"))

    @property
    def selects(self) -> bool:
        """Whether each site chooses its own model on validation women."""
        return bool(self.options.get("select"))


def _tuned_after(name: str, federated: str, **kw: Any) -> Regime:
    """Fine-tuning after federation: ``name`` tunes ``federated``'s models.

    Each site trains its final model of ``federated`` further on its own
    labels, every layer, at 0.3 x the federation's learning rate, on site (no
    DP: the tuned model never leaves the site). ``kw``: more fields
    (``all_labels``, ``pseudo_from``).
    """
    return Regime(
        name,
        train_on="each",
        tune_from=federated,
        options=_frozen(lr_factor=0.3),
        **kw,
    )


#: Central semi-supervision with the consistency loss's weight at 0: the
#: site's unlabeled training images run through the model and shape its norm
#: statistics, and nothing else (the ``-unlab`` regimes).
_UNLABELED_NORMS: dict[str, Any] = {
    "ssl": True,
    "ssl_rampup_steps": 0,
    "ssl_unsup_weight": 0.0,
}


# few-shot head tuning belongs to the semi-supervised adaptation regime only
# ("personalized + semi-supervised consistency (+ few-shot head tuning)"); the
# baselines train every layer at every site. Under DP, SSL and the
# standardizer would use data outside the per-woman clipping. The ``-select``
# regimes are their base regime with the site-level choice of its own model on
# held-out validation women (``trainer.options.select``, client.selection).
TABLE: tuple[Regime, ...] = (
    Regime(BASE, train_on="base"),
    Regime(LOCAL_ONLY, train_on="each"),
    # the few-shot alternative: the base model with its head tuned on the
    # site's labels, every other tensor (norm statistics included) the base's
    Regime(LOCAL_HEAD, train_on="each", options=_frozen(head_only=True)),
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
    # personalized with every training woman labeled (the scenario's complete
    # annotations): the ceiling of personalized-ssl on the partly labeled site
    Regime(
        PERSONALIZED_ALL_LABELS,
        strategy="personalized",
        personalization=_PERSONAL,
        options=_frozen(fewshot=False, ssl=False),
        all_labels=True,
    ),
    Regime(
        PERSONALIZED_DP,
        strategy="personalized",
        personalization=_PERSONAL,
        options=_frozen(fewshot=False, ssl=False, standardize=False, dp=True),
        from_request=_frozen(dp_epsilon="dp_epsilon"),
    ),
    # fine-tuning after federation (the DP recipe's second member)
    _tuned_after(PERSONALIZED_DP_TUNED, PERSONALIZED_DP),
    # the same, with the mean teacher's consistency on the site's unlabeled
    # training women (none on a fully labeled site): DP keeps semi-supervision
    # out of personalized-dp, not out of the on-site tuning. The teacher starts
    # as the federated model, so the consistency weight is full from step 0.
    Regime(
        PERSONALIZED_DP_TUNED_SSL,
        train_on="each",
        tune_from=PERSONALIZED_DP,
        options=_frozen(lr_factor=0.3, ssl=True, ssl_rampup_steps=0),
    ),
    # the site keeps the model it trains alone beside the federation's
    # personalized one and runs both, findings fused (weighted box fusion)
    Regime(PERSONALIZED_DP_LOCAL, members=(PERSONALIZED_DP, LOCAL_ONLY)),
    Regime(PERSONALIZED_DP_LOCAL_HEAD, members=(PERSONALIZED_DP, LOCAL_HEAD)),
    Regime(
        PERSONALIZED_DP_TUNED_PAIR, members=(PERSONALIZED_DP, PERSONALIZED_DP_TUNED)
    ),
    Regime(
        PERSONALIZED_DP_TUNED_LOCAL,
        members=(PERSONALIZED_DP, PERSONALIZED_DP_TUNED, LOCAL_ONLY),
    ),
    Regime(
        PERSONALIZED_DP_TUNED_SSL_LOCAL,
        members=(PERSONALIZED_DP, PERSONALIZED_DP_TUNED_SSL, LOCAL_ONLY),
    ),
    # the DP recipe without DP (stop 33: non-DP sites drew
    # the same images every round before; fixed, personalized gained 0.05 to
    # 0.18 mass CPM on new women): personalized fine-tuned on site, fused with
    # it and local-only
    _tuned_after(PERSONALIZED_TUNED, PERSONALIZED),
    Regime(
        PERSONALIZED_TUNED_LOCAL,
        members=(PERSONALIZED, PERSONALIZED_TUNED, LOCAL_ONLY),
    ),
    # the same recipe around the full adaptation regime (few-shot head tuning
    # on the few-shot site, consistency on the partly labeled one): the
    # recommended regime since stop 35
    _tuned_after(PERSONALIZED_SSL_TUNED, PERSONALIZED_SSL),
    Regime(
        PERSONALIZED_SSL_TUNED_LOCAL,
        members=(PERSONALIZED_SSL, PERSONALIZED_SSL_TUNED, LOCAL_ONLY),
    ),
    # the same, except that a few-shot site (few labeled images, none
    # unlabeled: it trains its head only in the federation) runs its tuned
    # model alone: its local-only model, trained on a few women, is below the
    # base model on masses and dilutes the fusion; the recommended regime
    # since stop 42 (docs/federation.md)
    Regime(
        PERSONALIZED_SSL_TUNED_LOCAL_FEWSHOT,
        members=(PERSONALIZED_SSL, PERSONALIZED_SSL_TUNED, LOCAL_ONLY),
        fewshot_members=(PERSONALIZED_SSL_TUNED,),
    ),
    # the tuned model's all-labels version: tuned from the same federated
    # model on every training woman's labels (the ceiling of the self-trained
    # one below on a partly labeled site)
    _tuned_after(PERSONALIZED_SSL_TUNED_ALL_LABELS, PERSONALIZED_SSL, all_labels=True),
    # self-training (stop 43): the site's three models fused label its
    # unlabeled training women, and the tuned model learns from those boxes
    # beside its labeled women (a site without unlabeled women trains it as
    # the plain tuned model)
    _tuned_after(
        PERSONALIZED_SSL_TUNED_PSEUDO,
        PERSONALIZED_SSL,
        pseudo_from=PERSONALIZED_SSL_TUNED_LOCAL,
    ),
    # the recommended regime with the self-trained tuned member
    Regime(
        PERSONALIZED_SSL_TUNED_PSEUDO_LOCAL_FEWSHOT,
        members=(PERSONALIZED_SSL, PERSONALIZED_SSL_TUNED_PSEUDO, LOCAL_ONLY),
        fewshot_members=(PERSONALIZED_SSL_TUNED_PSEUDO,),
    ),
    # the recommended recipe whose two on-site members also run the site's
    # unlabeled training images, so that those shape their norm statistics as
    # they do the federated member's (stop 36: that share of the statistics,
    # not the consistency loss, is what semi-supervision gains in the
    # federation, docs/adaptation.md); the loss's weight is 0. A fully
    # labeled site trains them as the plain members.
    Regime(LOCAL_ONLY_UNLAB, train_on="each", options=_frozen(**_UNLABELED_NORMS)),
    Regime(
        PERSONALIZED_SSL_TUNED_UNLAB,
        train_on="each",
        tune_from=PERSONALIZED_SSL,
        options=_frozen(lr_factor=0.3, **_UNLABELED_NORMS),
    ),
    Regime(
        PERSONALIZED_SSL_TUNED_LOCAL_UNLAB,
        members=(PERSONALIZED_SSL, PERSONALIZED_SSL_TUNED_UNLAB, LOCAL_ONLY_UNLAB),
    ),
    Regime(ORACLE, train_on="oracle"),
)
REGIMES: Mapping[str, Regime] = MappingProxyType({r.name: r for r in TABLE})

#: The regime the project recommends to a federation: the one the report's
#: goal table and the demo's comparison are about. Each site runs three
#: models and fuses their findings: the federation's personalized model
#: (FedBN + FedPer, few-shot head tuning where labels are few, the mean
#: teacher's consistency on unlabeled images), that model fine-tuned on the
#: site's own labels after the federation, and the model it trained alone
#: from the base; a few-shot site (few labeled images, none unlabeled) runs
#: the fine-tuned model alone. The three fused everywhere
#: (``personalized-ssl+tuned+local``) were chosen by the three-seed study on
#: 60 test women per site and confirmed on new women (docs/results.md, "The
#: study"; benchmarks/results/study35), replacing (stop 35) the same recipe
#: around the DP federation, ``personalized-dp+tuned+local``, which stays the
#: choice of a federation whose sites require a per-woman DP guarantee. The
#: few-shot rule was chosen on the study's women and confirmed on 150 new
#: women per site planned before the run (stop 42,
#: benchmarks/results/study_holdout2): on the few-shot site B masses +0.023
#: [-0.004, 0.044] and clusters +0.038 [0.020, 0.059] over the three fused.
RECOMMENDED = PERSONALIZED_SSL_TUNED_LOCAL_FEWSHOT

#: Report column order.
ORDER: tuple[str, ...] = tuple(r.name for r in TABLE)
CENTRAL: frozenset[str] = frozenset(r.name for r in TABLE if r.kind == "central")
FEDERATED: frozenset[str] = frozenset(r.name for r in TABLE if r.kind == "federated")
ENSEMBLE: frozenset[str] = frozenset(r.name for r in TABLE if r.kind == "ensemble")


def with_members(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` plus every regime they are made from, in report order.

    :attr:`Regime.needs`, followed transitively; a regime's sources come
    before it.

    Raises:
        KeyError: an unknown regime name.
    """
    wanted: set[str] = set()
    todo = list(names)
    while todo:
        n = todo.pop()
        if n not in wanted:
            wanted.add(n)
            todo.extend(REGIMES[n].needs)
    return tuple(r for r in ORDER if r in wanted)


#: How the federated regimes run (``mammofed-sim run --engine``): the in-process
#: grid, Flower's simulation engine (Ray), or loopback SuperLink + SuperNodes.
ENGINE_INPROCESS = "inprocess"
ENGINE_RAY = "ray"
ENGINE_DEPLOYMENT = "deployment"
ENGINES: tuple[str, ...] = (ENGINE_INPROCESS, ENGINE_RAY, ENGINE_DEPLOYMENT)
