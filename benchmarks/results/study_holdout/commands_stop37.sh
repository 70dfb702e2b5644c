#!/usr/bin/env bash
# Stop 37: the study's holdout (PLAN.md, written before the runs). 2 cores,
# three seeds side by side (--parallel 3 --threads 1), OMP_NUM_THREADS=1.
# Step 1 is `make study-holdout`; step 2 reads step 1's regimes (--reuse) and
# trains the rest. The figures on the 150 new women per non-H site (patient
# indices 3000 on) are compare_runs.jsonl here; the reports of both steps are
# report-main.md and report.md.
set -euo pipefail
FLAGS="--scenario configs/simulation/study-holdout.yaml --federation configs/federation/sim-demo.yaml
       --base-checkpoint models/demo-base-h.pt --data out/holdout-data --seeds 0,1,2 --parallel 3 --threads 1"
R=benchmarks/results/study_holdout
NEW='-03[0-9]{3}$'
REC=personalized-ssl+tuned+local
side() { for s in 0 1 2; do printf "%s/seed-%s/%s " "$1" "$s" "$2"; done; }

# 1. the main question: 29 min (the seeds 1276 s with phantom and ingest of 2304
#    images, then the report)
mammofed-sim run $FLAGS --out out/holdout --regime base --regime local-only --regime personalized-ssl \
    --regime personalized-ssl-tuned --regime $REC --regime oracle
for a in base local-only oracle; do
    python -m benchmarks.compare_runs --cases="$NEW" --a $(side out/holdout $a) \
        --b $(side out/holdout $REC) --label holdout-recommended-vs-$a --results $R
done

# 2. semi-supervision's share of C's labels' gap and DP's price: 38 min (10 of them the report)
mammofed-sim run $FLAGS --out out/holdout2 --reuse out/holdout --regime base --regime local-only \
    --regime personalized --regime personalized-ssl --regime personalized-all-labels \
    --regime personalized-dp --regime personalized-dp-tuned --regime personalized-dp+tuned+local \
    --regime personalized-ssl-tuned --regime $REC --regime oracle
python -m benchmarks.compare_runs --cases="$NEW" --a $(side out/holdout2 personalized) \
    --mid $(side out/holdout2 personalized-ssl) --b $(side out/holdout2 personalized-all-labels) \
    --label holdout-ssl-gap --results $R
python -m benchmarks.compare_runs --cases="$NEW" --a $(side out/holdout2 personalized) \
    --b $(side out/holdout2 personalized-dp) --label holdout-dp-price --results $R
python -m benchmarks.compare_runs --cases="$NEW" --a $(side out/holdout2 personalized-dp+tuned+local) \
    --b $(side out/holdout2 $REC) --label holdout-recommended-vs-dp-recipe --results $R
python -m benchmarks.compare_runs --cases="$NEW" --a $(side out/holdout2 personalized) \
    --b $(side out/holdout2 personalized-ssl) --label holdout-ssl-vs-labeled-only --results $R

# 3. FedAvg and FedProx for comparison (11 min for the two over three seeds, then
#    the report of this run's regimes)
mammofed-sim run $FLAGS --out out/holdout3 --reuse out/holdout2 --regime fedavg --regime fedprox --regime $REC
for a in fedavg fedprox; do
    python -m benchmarks.compare_runs --cases="$NEW" --a $(side out/holdout3 $a) \
        --b $(side out/holdout $REC) --label holdout-recommended-vs-$a --results $R
done
