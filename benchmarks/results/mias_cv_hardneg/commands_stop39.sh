#!/usr/bin/env bash
# Stop 39: the third seed of the stop-38 hard-negative screen (commands_stop38.sh),
# then the three seeds pooled. Seed 2's folds 0 and 3 with mining were trained at
# stop 38 (the rerun resumes/reuses them, crossval's own rule). About 30 min on 2 cores.
set -euo pipefail
export OMP_NUM_THREADS=1
C=benchmarks/results/mias_cv_hardneg/config.yaml
cv() {  # cv ARM SEED FOLDS   (ARM: hn = with mining, base = without)
    local extra=()
    [ "$1" = base ] && extra=(--set augment.hard_negative_p=0)
    mammofed-sim crossval --config "$C" --folds 5 --out "out/mias-$1-seed$2" \
        --set "seed=$2" "${extra[@]}" ${3:+--only-folds "$3"}
}
{ cv hn 2 1,2; cv base 2 3,4; } > out/hardneg-e.log 2>&1 &
{ cv hn 2 0,3,4; cv base 2 0,1,2; } > out/hardneg-f.log 2>&1 &
wait
for arm in hn base; do cv "$arm" 2 ""; done   # pool each run
python -m benchmarks.compare_runs --a out/mias-base-seed{0,1,2}/oof_predictions.json \
    --b out/mias-hn-seed{0,1,2}/oof_predictions.json --label mias-hardneg-vs-patch256-3seeds \
    --results benchmarks/results
python -m benchmarks.compare_runs --a out/mias-base-seed2/oof_predictions.json \
    --b out/mias-hn-seed2/oof_predictions.json \
    --label mias-hardneg-vs-patch256-seed2 --results benchmarks/results
