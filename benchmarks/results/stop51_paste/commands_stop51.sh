#!/usr/bin/env bash
# Stop 51: copy-paste self-training (adapt consistency `paste`, Ghiasi et al.
# 2021) as the partly labeled site's semi-supervision. Lesions cut from the
# site's labeled images are pasted into its unlabeled ones, and the student's
# whole FCOS loss trains on them there; the teacher's findings scoring at
# least 0.5 join as pseudo boxes, those from 0.3 to 0.5 are ignore regions
# (an unlabeled woman's own lesion is not taught as background; the loss
# honours ignore regions since stop 51). The teacher's mass precision on C is
# 4-7% (docs/adaptation.md), so the arm takes its positives from the labels.
# Fixed before the run: full weight from the first step
# (ssl_rampup_steps=0: the positives are exact, the ramp guards against an
# unsure teacher), the default step rule (round_steps=labeled), ignore from
# 0.3, up to 2 lesions an image; the share of C's masses' labels' gap,
# paired over the first holdout's 150 new women per site and three seeds,
# against stop 49's labeled-only and all-labels arms (out/recheck-h1), and
# the arm against the dense semi-supervised arm at every site.
set -euo pipefail
BIN=${BIN:-.venv/bin}
R=benchmarks/results/stop51_paste
COMMON="--federation configs/federation/sim-demo.yaml --base-checkpoint models/demo-base-h.pt
        --seeds 0,1,2 --parallel 3 --threads 1"
side() { for s in 0 1 2; do printf "%s/seed-%s/%s " "$1" "$s" "$2"; done; }
NEW1='-03[0-9]{3}$'
H1=out/recheck-h1
S=out/h1-paste
if [ "${PART:-train}" = train ]; then
    $BIN/mammofed-sim run --scenario configs/simulation/study-holdout.yaml $COMMON \
        --data out/holdout-data --out $S \
        --set trainer.options.ssl_consistency=paste --set trainer.options.ssl_rampup_steps=0 \
        --regime personalized-ssl
fi
cmp() { $BIN/python -m benchmarks.compare_runs --cases="$NEW1" --results $R "$@"; }
cmp --a $(side $H1 personalized) --mid $(side $S personalized-ssl) \
    --b $(side $H1 personalized-all-labels) --label stop51-paste-gap
cmp --a $(side $H1 personalized-ssl) --b $(side $S personalized-ssl) --label stop51-paste-vs-dense
cmp --a $(side $H1 personalized) --b $(side $S personalized-ssl) --label stop51-paste-vs-labeled-only
cp $S/report/report.md $R/report.md 2>/dev/null || true
