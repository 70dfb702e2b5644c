#!/usr/bin/env bash
# Stop 49: issue 14's figures measured again on the code of today. Stop 48
# found that an image's findings depended on the images batched with it
# (GroupNorm over batch padding) and fixed it; the holdouts' figures in the
# README and docs/results.md were measured before the fix. This runs the two
# holdouts' questions again with the same scenarios, base model, federation
# config and seeds, on the same new women, and writes the paired figures
# here (compare_runs.jsonl). 2 cores, three seeds side by side.
set -euo pipefail
BIN=${BIN:-.venv/bin}
R=benchmarks/results/stop49_recheck
REC=personalized-ssl+tuned+local-unless-fewshot
COMMON="--federation configs/federation/sim-demo.yaml --base-checkpoint models/demo-base-h.pt
        --seeds 0,1,2 --parallel 3 --threads 1"
side() { for s in 0 1 2; do printf "%s/seed-%s/%s " "$1" "$s" "$2"; done; }

# 1. The main question and the few-shot figure on the second holdout's 150
#    new women per non-H site (stop 42: patient indices 4000 on).
NEW2='-04[0-9]{3}$'
$BIN/mammofed-sim run --scenario configs/simulation/study-holdout2.yaml $COMMON \
    --data out/holdout2-data --out out/recheck-h2 \
    --regime base --regime local-only --regime personalized-ssl --regime personalized-ssl-tuned \
    --regime personalized-ssl+tuned+local --regime $REC --regime oracle
for a in base local-only oracle personalized-ssl+tuned+local; do
    $BIN/python -m benchmarks.compare_runs --cases="$NEW2" --a $(side out/recheck-h2 $a) \
        --b $(side out/recheck-h2 $REC) --label stop49-holdout2-recommended-vs-$a --results $R
done
cp out/recheck-h2/report/report.md $R/report-holdout2.md

# 2. The main question again, semi-supervision's share of C's labels' gap and
#    DP's price on the first holdout's 150 new women per non-H site (stop 37:
#    patient indices 3000 on).
NEW1='-03[0-9]{3}$'
$BIN/mammofed-sim run --scenario configs/simulation/study-holdout.yaml $COMMON \
    --data out/holdout-data --out out/recheck-h1 \
    --regime base --regime local-only --regime personalized --regime personalized-ssl \
    --regime personalized-all-labels --regime personalized-dp --regime personalized-ssl-tuned \
    --regime $REC
for a in base local-only; do
    $BIN/python -m benchmarks.compare_runs --cases="$NEW1" --a $(side out/recheck-h1 $a) \
        --b $(side out/recheck-h1 $REC) --label stop49-holdout-recommended-vs-$a --results $R
done
$BIN/python -m benchmarks.compare_runs --cases="$NEW1" --a $(side out/recheck-h1 personalized) \
    --mid $(side out/recheck-h1 personalized-ssl) --b $(side out/recheck-h1 personalized-all-labels) \
    --label stop49-holdout-ssl-gap --results $R
$BIN/python -m benchmarks.compare_runs --cases="$NEW1" --a $(side out/recheck-h1 personalized) \
    --b $(side out/recheck-h1 personalized-dp) --label stop49-holdout-dp-price --results $R
cp out/recheck-h1/report/report.md $R/report-holdout.md
$BIN/python -m benchmarks.compare_runs --cases="$NEW1" --a $(side out/recheck-h1 personalized) \
    --b $(side out/recheck-h1 personalized-ssl) --label stop49-holdout-ssl-vs-labeled-only --results $R

# 3. Both holdouts' 300 new women per non-H site at once: the two runs train on
#    the same women with the same seeds, so their models are the same to the
#    bit (compare_runs --also checks each trained regime's model files; the
#    recommended regime's members were checked the same way), and only the
#    test women differ.
for a in base local-only; do
    $BIN/python -m benchmarks.compare_runs --cases='-0[34][0-9]{3}$' \
        --also out/recheck-h2=out/recheck-h1 --a $(side out/recheck-h2 $a) \
        --b $(side out/recheck-h2 $REC) --label stop49-both-holdouts-recommended-vs-$a --results $R
done
for m in personalized-ssl personalized-ssl-tuned local-only; do  # the members: same models?
    $BIN/python -m benchmarks.compare_runs --cases='-0[34][0-9]{3}$' \
        --also out/recheck-h2=out/recheck-h1 --a $(side out/recheck-h2 $m) \
        --b $(side out/recheck-h2 $m) --label stop49-both-holdouts-member-check-$m --results $R
done
