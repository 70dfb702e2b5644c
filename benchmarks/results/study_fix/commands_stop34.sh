#!/bin/bash
# How benchmarks/results/study_fix/ was made (stop 34): make study's regimes re-run with stop 33's
# round-draw fix, plus personalized-all-labels and the recipe without DP, on the study's sites, seeds and
# women. out/study-fix (stop 33, 19 min) trained base, local-only, personalized, personalized-tuned,
# personalized+tuned+local and oracle; this run reads them (--reuse) and trains the rest (53 min on 2 cores,
# report included). Run from the repository root.
set -e
cd "$(dirname "$0")/../../.."
P=.venv/bin
REG="base local-only fedavg fedprox personalized personalized-ssl personalized-all-labels personalized-dp
     personalized-dp+local personalized-dp+tuned personalized-dp+tuned+local personalized-tuned
     personalized+tuned+local oracle"
$P/mammofed-sim run --scenario configs/simulation/study.yaml --federation configs/federation/sim-demo.yaml \
  --base-checkpoint models/demo-base-h.pt --data out/study-data --out out/study34 --reuse out/study-fix \
  --seeds 0,1,2 --parallel 2 --threads 1 $(for r in $REG; do printf -- "--regime %s " "$r"; done)
# the consistency ramp over 12 steps, with the fix (8 min), and its pairings (run with
# sim-demo-ssl-ramp.yaml, a copy of sim-demo.yaml with this one option; --set since stop 37)
$P/mammofed-sim run --scenario configs/simulation/study.yaml --federation configs/federation/sim-demo.yaml \
  --set trainer.options.ssl_rampup_steps=12 \
  --base-checkpoint models/demo-base-h.pt --data out/study-data --out out/study34-ramp \
  --seeds 0,1,2 --parallel 2 --threads 1 --regime personalized-ssl
side() { for s in seed-0 seed-1 seed-2; do printf "%s/%s/%s " "$1" "$s" "$2"; done; }
$P/python -m benchmarks.compare_runs --a $(side out/study34 personalized-ssl) \
  --b $(side out/study34-ramp personalized-ssl) --label stop34-ssl-ramp12-vs-ramp200
$P/python -m benchmarks.compare_runs --a $(side out/study34 personalized) --mid $(side out/study34-ramp personalized-ssl) \
  --b $(side out/study34 personalized-all-labels) --label stop34-ssl-ramp12-gap
