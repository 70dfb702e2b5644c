#!/usr/bin/env bash
# Stop 42: the second holdout (PLAN.md, written before the run). 2 cores, three
# seeds side by side (--parallel 3 --threads 1), OMP_NUM_THREADS=1; ~30 min.
# The figures on the 150 new women per non-H site (patient indices 4000 on) are
# compare_runs.jsonl here; the run's report is report.md.
set -euo pipefail
export OMP_NUM_THREADS=1
R=benchmarks/results/study_holdout2
NEW='-04[0-9]{3}$'
REC=personalized-ssl+tuned+local
TUNED=personalized-ssl-tuned
RULE=personalized-ssl+tuned+local-unless-fewshot   # the rule: B runs $TUNED alone
side() { for s in 0 1 2; do printf "%s/seed-%s/%s " out/holdout4 "$s" "$1"; done; }
mammofed-sim run --scenario configs/simulation/study-holdout2.yaml \
    --federation configs/federation/sim-demo.yaml --base-checkpoint models/demo-base-h.pt \
    --data out/holdout4-data --out out/holdout4 --seeds 0,1,2 --parallel 3 --threads 1 \
    --regime base --regime local-only --regime personalized-ssl --regime $TUNED \
    --regime $REC --regime $RULE --regime oracle
for b in $REC $TUNED $RULE; do
    for a in base local-only oracle; do
        python -m benchmarks.compare_runs --cases="$NEW" --a $(side $a) --b $(side $b) \
            --label "holdout2-$b-vs-$a" --results $R
    done
done
for b in $TUNED $RULE; do
    python -m benchmarks.compare_runs --cases="$NEW" --a $(side $REC) --b $(side $b) \
        --label "holdout2-$b-vs-$REC" --results $R
done
cp out/holdout4/report/report.md out/holdout4/report/report.json out/holdout4/report/*.png "$R/"
