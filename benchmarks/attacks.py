"""How far one hostile node moves the global model, before and after the bounds.

For each attack of issue 16 the benchmark aggregates one round of replies
(``n_honest`` honest sites and one attacker) through the real guarded
strategies (:mod:`server.strategies`: reply validation, num-examples cap, norm
clipping, content-order aggregation) and reports the attacker's *influence*::

    ||w_agg - w_honest|| / ||w_honest - w_global||

where ``w_honest`` is plain FedAvg of the honest replies alone (what the round
would give without the attacker) and ``w_global`` the model sent out. 0 means
no influence; 1 means the attacker moved the model as far as a whole honest
round does. A rejected attacker has influence 0 under FedAvg.

Model: the shared arrays of the CPU study's detector
(``configs/federation/sim-cpu.yaml``: ``small`` FCOS, FedBN + FedPer split,
random init with the run's seed, built by :mod:`common.detector.model.initial`).
Honest updates: random perturbations of relative norm ``--honest-norm`` that
share half their direction (sites roughly agree), with site sizes from the
CPU study. The attacker first plays one honest round (so the server records
its declared ``num-examples``), then attacks in round 2:

``scale4``, ``scale6``
    its own honest-looking delta times 4 or 6;
``signflip``
    its delta negated;
``zeros-1e7``
    all-zero weights claiming 10,000,000 examples;
``zeros-1e7-first``
    the same in the attacker's *first* round (no declaration yet: trust on
    first use cannot cap it, the norm clip must);
``random4.9``
    a random direction of norm 4.9 x ``||w_global||`` (just inside the old
    relative norm bound 5);
``none``
    no attack: the attacker replies honestly (the aggregator's own deviation,
    the baseline of the same run).

Regimes: ``before`` = FedAvg with the validation of the landed code
(``clip_factor 0``, no cap); ``after`` = FedAvg with the new defaults (cap +
clip at ``clip_factor``); ``median`` and ``trimmed`` = the robust
aggregators with the new defaults. The round-0 attack (a node's reply x1000
as the initial model) is one more line per regime pair: ``before`` is how far
the node's reply is from the seeded model (the landed code used it as the
initial model), ``after`` how far the server's own initial model is.

Usage::

    python -m benchmarks.attacks            # -> benchmarks/results/attacks.jsonl
    python -m benchmarks.attacks --seeds 2 --results-dir /tmp/x   # smoke

One JSON line per (attack, regime, n_honest): ``value`` = worst influence over
the seeds, ``context`` = mean, per-seed values, whether the attacker's reply
was accepted in every seed, and the stated bound ``(c + 1) * h_max /
||w_honest - w_global||``.

The CPM cost of a robust aggregator without attack needs a federated study
(not run here): ``mammofed-sim run`` sets the strategy per regime, so a
``fedmedian`` regime has to be added to ``simulation.regimes`` first; then::

    mammofed-sim run --scenario configs/simulation/adapt-cpu.yaml \\
        --federation configs/federation/sim-cpu.yaml --data out/adapt \\
        --out out/robust --regime fedavg --regime fedmedian --seed 0
    python -m benchmarks.compare_runs ...   # paired CPM difference
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from benchmarks.common import emit, rounded
from common.detector.model.initial import initial_shared_arrays
from common.keys import ARRAYS_KEY, METRICS_KEY, NUM_EXAMPLES, TRAIN_LOSS
from common.wire.federation import (
    FederationConfig,
    StrategyConfig,
    ValidationConfig,
    arrays_to_record,
    load_federation_config,
)

BENCH = "attacks"
REPO = Path(__file__).resolve().parents[1]
SIM_CPU = REPO / "configs" / "federation" / "sim-cpu.yaml"

Arrays = dict[str, np.ndarray]
#: (global arrays, attacker's honest-looking delta, rng) -> (arrays, num-examples)
Attack = Callable[[Arrays, Arrays, np.random.Generator], tuple[Arrays, int] | None]

#: Examples per round of the CPU study's sites (A: 40 women, B: 8, C: 30 at
#: 15 % labels), roughly; the attacker claims the first honest size when honest.
HONEST_EXAMPLES: tuple[int, ...] = (160, 32, 72)
#: Relative update norm ||w_site - w_global|| / ||w_global|| of an honest round.
HONEST_NORM = 0.02
ZEROS_EXAMPLES = 10_000_000


def norm(arrays: Mapping[str, np.ndarray]) -> float:
    """L2 norm over every array (float64)."""
    return math.sqrt(
        sum(float(np.sum(a.astype(np.float64) ** 2)) for a in arrays.values())
    )


def add(g: Arrays, d: Mapping[str, np.ndarray], scale: float = 1.0) -> Arrays:
    """``g + scale * d`` in ``g``'s dtypes."""
    return {k: (g[k].astype(np.float64) + scale * d[k]).astype(g[k].dtype) for k in g}


def diff(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> Arrays:
    """``a - b`` in float64."""
    return {k: a[k].astype(np.float64) - b[k].astype(np.float64) for k in a}


def _random_direction(g: Arrays, rng: np.random.Generator) -> Arrays:
    d = {k: rng.standard_normal(v.shape) for k, v in g.items()}
    n = norm(d)
    return {k: v / n for k, v in d.items()}


def honest_deltas(
    g: Arrays, count: int, rel_norm: float, rng: np.random.Generator
) -> list[Arrays]:
    """``count`` deltas of norm about ``rel_norm * ||g||`` sharing half a direction."""
    common = _random_direction(g, rng)
    size = rel_norm * norm(g)
    out = []
    for _ in range(count):
        own = _random_direction(g, rng)
        mixed = {k: common[k] + own[k] for k in g}
        n = norm(mixed)
        scale = size * rng.uniform(0.7, 1.3) / n
        out.append({k: v * scale for k, v in mixed.items()})
    return out


def _scaled(factor: float) -> Attack:
    def attack(g: Arrays, d: Arrays, rng: np.random.Generator) -> tuple[Arrays, int]:
        return add(g, d, factor), HONEST_EXAMPLES[0]

    return attack


def _zeros(g: Arrays, d: Arrays, rng: np.random.Generator) -> tuple[Arrays, int]:
    return {k: np.zeros_like(v) for k, v in g.items()}, ZEROS_EXAMPLES


def _random49(g: Arrays, d: Arrays, rng: np.random.Generator) -> tuple[Arrays, int]:
    u = _random_direction(g, rng)
    return add(g, u, 4.9 * norm(g)), HONEST_EXAMPLES[0]


#: attack name -> (reply builder, attacks in its first round?)
ATTACKS: dict[str, tuple[Attack, bool]] = {
    "none": (_scaled(1.0), False),
    "scale4": (_scaled(4.0), False),
    "scale6": (_scaled(6.0), False),
    "signflip": (_scaled(-1.0), False),
    "zeros-1e7": (_zeros, False),
    "zeros-1e7-first": (_zeros, True),
    "random4.9": (_random49, False),
}

#: regime -> (strategy name, validation overrides)
REGIMES: dict[str, tuple[str, dict[str, Any]]] = {
    "before": ("fedavg", {"clip_factor": 0.0, "cap_num_examples": False}),
    "after": ("fedavg", {}),
    "median": ("fedmedian", {}),
    "trimmed": ("fedtrimmedavg", {}),
}


def make_reply(node: int, arrays: Mapping[str, np.ndarray], examples: int) -> Message:
    """A train reply of ``node`` as a SuperNode would send it (one round)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    instruction = Message(RecordDict({}), node, "train")
    content = RecordDict(
        {
            ARRAYS_KEY: arrays_to_record(arrays),
            METRICS_KEY: MetricRecord({NUM_EXAMPLES: examples, TRAIN_LOSS: 0.5}),
        }
    )
    return Message(content, reply_to=instruction)


def regime_config(
    base: FederationConfig, strategy: str, validation: Mapping[str, Any]
) -> FederationConfig:
    """``base`` with ``strategy`` and ``validation`` overrides of the defaults.

    ``fedavg`` becomes ``personalized`` (the same FedAvg) when ``base`` keeps
    personal layers, so the arrays are the study's shared arrays.
    """
    pers = base.personalization
    if strategy == "fedavg" and (pers.local_norm or pers.personal_head):
        strategy = "personalized"
    return dataclasses.replace(
        base,
        strategy=StrategyConfig(name=strategy, trim_beta=base.strategy.trim_beta),
        validation=dataclasses.replace(ValidationConfig(), **validation),
    )


def aggregate(
    cfg: FederationConfig,
    g: Arrays,
    rounds: Sequence[Sequence[Message]],
) -> tuple[Arrays | None, Any]:
    """Run ``rounds`` of replies through a fresh strategy of ``cfg``; last result.

    Every round starts from ``g`` (the first rounds only let the server record
    declarations). Returns the last round's arrays (``None`` if it kept the
    previous model) and the strategy (its ``last["train"]`` screening).
    """
    from common.wire.federation import record_to_arrays
    from server.strategies import build_strategy

    strategy = build_strategy(cfg)
    result: Arrays | None = None
    for rnd, replies in enumerate(rounds, start=1):
        strategy._global = dict(g)
        arrays, _ = strategy.aggregate_train(rnd, list(replies))
        result = None if arrays is None else record_to_arrays(arrays)
    return result, strategy


def fedavg(arrays: Sequence[Arrays], weights: Sequence[int]) -> Arrays:
    """Weighted mean in float64."""
    total = float(sum(weights))
    return {
        k: sum(
            a[k].astype(np.float64) * (w / total)
            for a, w in zip(arrays, weights, strict=True)
        )
        for k in arrays[0]
    }


def influence(
    cfg: FederationConfig,
    g: Arrays,
    attack: str,
    n_honest: int,
    rng: np.random.Generator,
    rel_norm: float = HONEST_NORM,
) -> dict[str, Any]:
    """One round of ``attack`` against ``n_honest`` honest sites under ``cfg``.

    Returns ``influence``, ``accepted`` (the attacker's reply passed
    validation), ``bound`` = ``(c + 1) * h_max / ||w_honest - g||`` (``None``
    without clipping) and
    ``h_rel`` (honest delta norm / ``||g||``).
    """
    build, first = ATTACKS[attack]
    deltas = honest_deltas(g, n_honest + 1, rel_norm, rng)
    honest = [add(g, d) for d in deltas[:n_honest]]
    sizes = list(HONEST_EXAMPLES[:n_honest])
    attacker = 1000
    hostile, hostile_n = build(g, deltas[-1], rng)  # type: ignore[misc]

    def honest_replies() -> list[Message]:
        pairs = zip(honest, sizes, strict=True)
        return [make_reply(100 + i, a, n) for i, (a, n) in enumerate(pairs)]

    attack_round = honest_replies() + [make_reply(attacker, hostile, hostile_n)]
    rounds = [attack_round]
    if not first:  # one honest round first: the attacker declares its size
        warm = honest_replies()
        warm.append(make_reply(attacker, add(g, deltas[-1]), HONEST_EXAMPLES[0]))
        rounds.insert(0, warm)
    agg, strategy = aggregate(cfg, g, rounds)
    w_honest = fedavg(honest, sizes)
    moved = norm(diff(w_honest, g))
    accepted = any(
        int(m.metadata.src_node_id) == attacker for m in strategy.last["train"].valid
    )
    result = g if agg is None else agg
    h_max = max(norm(d) for d in deltas[:n_honest])
    c = cfg.validation.clip_factor
    return {
        "influence": norm(diff(result, w_honest)) / moved,
        "accepted": accepted,
        "bound": (c + 1.0) * h_max / moved if c > 0 else None,
        "h_rel": h_max / norm(g),
        "adjusted": [a.as_dict() for a in strategy.last["train"].adjusted],
    }


def round0(g: Arrays, cfg: FederationConfig) -> dict[str, float]:
    """The x1000 round-0 reply: distance of each initial model from the seeded one.

    ``before``: the landed code took the first node's query reply as the
    initial model; ``after``: :func:`server.initial.initial_global_arrays`.
    """
    from server.initial import initial_global_arrays

    hostile = {k: v * np.float32(1000.0) for k, v in g.items()}
    server_side = initial_global_arrays(cfg)
    ref = norm(g)
    return {
        "before": norm(diff(hostile, g)) / ref,
        "after": norm(diff(server_side, g)) / ref,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run every (attack, regime, n_honest) and emit one JSON line each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--federation", type=Path, default=SIM_CPU)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--honest-norm", type=float, default=HONEST_NORM)
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.seeds < 1 or not args.honest_norm > 0:
        parser.error("--seeds must be >= 1 and --honest-norm > 0")
    base = load_federation_config(args.federation)
    g = initial_shared_arrays(base)
    n_params = int(sum(v.size for v in g.values()))
    common = {
        "model": dict(base.trainer.options),
        "shared_params": n_params,
        "federation": args.federation.name,
        "honest_rel_norm": args.honest_norm,
        "seeds": args.seeds,
    }
    r0 = round0(g, base)
    for regime, value in r0.items():
        emit(
            BENCH,
            "initial_model_distance",
            rounded(value, 6) or 0.0,
            "x ||w_seeded||",
            results_dir=args.results_dir,
            attack="round0-x1000",
            regime=regime,
            **common,
        )
    for attack in ATTACKS:
        for n_honest in (1, 2):
            for regime, (strategy, overrides) in REGIMES.items():
                cfg = regime_config(base, strategy, overrides)
                runs = [
                    influence(
                        cfg,
                        g,
                        attack,
                        n_honest,
                        np.random.default_rng(seed),
                        args.honest_norm,
                    )
                    for seed in range(args.seeds)
                ]
                values = [r["influence"] for r in runs]
                emit(
                    BENCH,
                    "influence",
                    rounded(max(values), 4) or 0.0,
                    "x honest round",
                    results_dir=args.results_dir,
                    attack=attack,
                    regime=regime,
                    strategy=strategy,
                    clip_factor=cfg.validation.clip_factor,
                    cap_num_examples=cfg.validation.cap_num_examples,
                    n_honest=n_honest,
                    mean=rounded(statistics.fmean(values), 4),
                    per_seed=[rounded(v, 4) for v in values],
                    accepted_all=all(r["accepted"] for r in runs),
                    accepted_any=any(r["accepted"] for r in runs),
                    bound_min=None
                    if runs[0]["bound"] is None
                    else rounded(min(r["bound"] for r in runs), 4),
                    adjusted_last_seed=runs[-1]["adjusted"],
                    **common,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
