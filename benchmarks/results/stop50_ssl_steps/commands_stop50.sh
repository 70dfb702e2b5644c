#!/usr/bin/env bash
# Stop 50: does a semi-supervised site learn more from its unlabeled images
# when a round passes over them? A local epoch has been a pass over the
# site's LABELED images: the partly labeled site C (12 labeled, 68 unlabeled
# training images, batch 4) takes 3 steps a round and runs 12 of its 68
# unlabeled images, while its all-labels version takes 20. With
# trainer.options.round_steps=all a round is a pass over all the site's
# training images, labeled or not (20 steps at C, the unlabeled images about
# once). The control is the labeled-only arm with the same rule: the extra
# steps re-draw its 12 labeled images, so it tells more steps from the
# unlabeled images.
# Fixed before the run: semi-supervision's share of C's masses' labels' gap,
# paired over the first holdout's 150 new women per site and three seeds,
# (1) against stop 49's labeled-only arm (the issue's definition, the step
# rule changed in the semi-supervised arm only) and (2) against the
# labeled-only arm under the same rule; and the arm's change at every site
# (it moves the federation's averaging weights, so B and D move too).
# The first holdout's runs of stop 49 (out/recheck-h1) are the other arms.
set -euo pipefail
BIN=${BIN:-.venv/bin}
R=benchmarks/results/stop50_ssl_steps
COMMON="--federation configs/federation/sim-demo.yaml --base-checkpoint models/demo-base-h.pt
        --seeds 0,1,2 --parallel 3 --threads 1"
side() { for s in 0 1 2; do printf "%s/seed-%s/%s " "$1" "$s" "$2"; done; }
NEW1='-03[0-9]{3}$'
H1=out/recheck-h1
S=out/h1-steps-all
if [ "${PART:-train}" = train ]; then
    $BIN/mammofed-sim run --scenario configs/simulation/study-holdout.yaml $COMMON \
        --data out/holdout-data --out $S --set trainer.options.round_steps=all \
        --regime personalized --regime personalized-ssl
fi
cmp() { $BIN/python -m benchmarks.compare_runs --cases="$NEW1" --results $R "$@"; }
cmp --a $(side $H1 personalized-ssl) --b $(side $S personalized-ssl) --label stop50-ssl-steps-all-vs-labeled
cmp --a $(side $H1 personalized) --b $(side $S personalized-ssl) --label stop50-ssl-steps-all-vs-labeled-only
cmp --a $(side $H1 personalized) --mid $(side $S personalized-ssl) \
    --b $(side $H1 personalized-all-labels) --label stop50-ssl-steps-all-gap
cmp --a $(side $S personalized) --mid $(side $S personalized-ssl) \
    --b $(side $H1 personalized-all-labels) --label stop50-ssl-steps-all-gap-same-rule
cmp --a $(side $S personalized) --b $(side $S personalized-ssl) --label stop50-steps-all-ssl-vs-labeled-only
cmp --a $(side $H1 personalized) --b $(side $S personalized) --label stop50-labeled-only-steps-all-vs-labeled
cp $S/report/report.md $R/report.md 2>/dev/null || true

# 2. The recommended regime under the same rule (every regime of a study runs
#    one recipe, so local-only, the site-alone member and the main test's
#    comparator, takes the extra steps too); personalized-ssl reused from 1.
SR=out/h1-steps-all-rec
REC=personalized-ssl+tuned+local-unless-fewshot
if [ "${PART:-train}" = train ]; then
    $BIN/mammofed-sim run --scenario configs/simulation/study-holdout.yaml $COMMON \
        --data out/holdout-data --out $SR --reuse $S --set trainer.options.round_steps=all \
        --regime local-only --regime personalized-ssl --regime personalized-ssl-tuned --regime $REC
fi
cmp --a $(side $H1 $REC) --b $(side $SR $REC) --label stop50-recommended-steps-all-vs-labeled
cmp --a $(side $H1 local-only) --b $(side $SR local-only) --label stop50-local-only-steps-all-vs-labeled
cmp --a $(side $SR local-only) --b $(side $SR $REC) --label stop50-steps-all-recommended-vs-local-only
cmp --a $(side $H1 base) --b $(side $SR $REC) --label stop50-steps-all-recommended-vs-base
cp $SR/report/report.md $R/report-recommended.md 2>/dev/null || true
