"""Names of the regimes every report compares (evaluation.md), in report order."""

from __future__ import annotations

BASE = "base"
LOCAL_ONLY = "local-only"
FEDAVG = "fedavg"
FEDPROX = "fedprox"
PERSONALIZED = "personalized"
PERSONALIZED_SSL = "personalized-ssl"
PERSONALIZED_DP = "personalized-dp"
ORACLE = "oracle"

#: Report column order.
ORDER: tuple[str, ...] = (
    BASE,
    LOCAL_ONLY,
    FEDAVG,
    FEDPROX,
    PERSONALIZED,
    PERSONALIZED_SSL,
    PERSONALIZED_DP,
    ORACLE,
)
CENTRAL: frozenset[str] = frozenset({BASE, LOCAL_ONLY, ORACLE})
FEDERATED: frozenset[str] = frozenset(
    {FEDAVG, FEDPROX, PERSONALIZED, PERSONALIZED_SSL, PERSONALIZED_DP}
)

# Files of a run folder (docs/contracts.md "Run folders").
RUN_JSON = "run.json"
METRICS_JSON = "metrics.json"
ROUNDS_JSONL = "rounds.jsonl"
DETECTIONS_JSON = "detections.json"

#: How the federated regimes run (``mammofed-sim run --engine``): the in-process
#: grid, Flower's simulation engine (Ray), or loopback SuperLink + SuperNodes.
ENGINE_INPROCESS = "inprocess"
ENGINE_RAY = "ray"
ENGINE_DEPLOYMENT = "deployment"
ENGINES: tuple[str, ...] = (ENGINE_INPROCESS, ENGINE_RAY, ENGINE_DEPLOYMENT)
