#!/usr/bin/env bash
# Stop 43: self-training at the partly labeled sites (PLAN.md, written before the
# run). 2 cores, three seeds side by side (--parallel 3 --threads 1),
# OMP_NUM_THREADS=1. Reads the second holdout's federated personalized-ssl and
# base (out/holdout4, made by ../study_holdout2/commands_stop42.sh) through a
# folder that holds only those two, so the central members are trained again and
# keep their models (the teachers). Figures on the 150 new women per non-H site
# (patient indices 4000 on) -> compare_runs.jsonl here.
set -euo pipefail
export OMP_NUM_THREADS=1
R=benchmarks/results/selftrain
NEW='-04[0-9]{3}$'
PRIOR=out/holdout4-fed
for s in 0 1 2; do
    mkdir -p "$PRIOR/seed-$s"
    for f in configs run.json base personalized-ssl; do
        ln -sfn "$(realpath "out/holdout4/seed-$s/$f")" "$PRIOR/seed-$s/$f"
    done
done
LAB=personalized-ssl-tuned
PSEUDO=personalized-ssl-tuned-pseudo
ALL=personalized-ssl-tuned-all-labels
REC=personalized-ssl+tuned+local-unless-fewshot
RECP=personalized-ssl+tuned-pseudo+local-unless-fewshot
side() { for s in 0 1 2; do printf "%s/seed-%s/%s " out/selftrain "$s" "$1"; done; }
mammofed-sim run --scenario configs/simulation/study-holdout2.yaml \
    --federation configs/federation/sim-demo.yaml --base-checkpoint models/demo-base-h.pt \
    --data out/holdout4-data --out out/selftrain --seeds 0,1,2 --parallel 3 --threads 1 \
    --reuse "$PRIOR" --regime base --regime local-only --regime personalized-ssl \
    --regime $LAB --regime $ALL --regime $PSEUDO --regime $REC --regime $RECP
python -m benchmarks.compare_runs --cases="$NEW" --a $(side $LAB) --mid $(side $PSEUDO) \
    --b $(side $ALL) --label selftrain-gap-tuned --results $R
python -m benchmarks.compare_runs --cases="$NEW" --a $(side $REC) --b $(side $RECP) \
    --label selftrain-recommended-pseudo-vs-recommended --results $R
python -m benchmarks.compare_runs --cases="$NEW" --a $(side $LAB) --b $(side $PSEUDO) \
    --label selftrain-pseudo-vs-labeled-only --results $R
for s in 0 1 2; do
    for site in C D; do
        cp "out/selftrain/seed-$s/$PSEUDO/pseudo-$site.json" "$R/pseudo-$site-seed$s.json"
    done
done
cp out/selftrain/report/report.md out/selftrain/report/report.json "$R/"
