#!/usr/bin/env bash
# Stop 38: hard-negative mining on the native 0.2 mm patch recipe, mini-MIAS 5-fold CV.
# Two seeds; each arm against the same recipe without mining, on the same folds.
# Two processes of one thread on the 2-core machine, about 100 min in all. A third seed
# (SEEDS="0 1 2", about 50 min more) was started at stop 38 and stopped for the
# session's time: not measured.
# Needs the 0.2 mm cache (docs/detector.md):
#   mammofed-sim import-mias ../shared/data/mini-mias out/mini-mias/site
#   mammofed-client ingest out/mini-mias/site --out out/mini-mias/cache-native \
#       --site-config configs/sites/mini-mias-native.yaml
set -euo pipefail
export OMP_NUM_THREADS=1
C=benchmarks/results/mias_cv_hardneg/config.yaml
cv() {  # cv ARM SEED FOLDS   (ARM: hn = with mining, base = without)
    local extra=()
    [ "$1" = base ] && extra=(--set augment.hard_negative_p=0)
    mammofed-sim crossval --config "$C" --folds 5 --out "out/mias-$1-seed$2" \
        --set "seed=$2" "${extra[@]}" ${3:+--only-folds "$3"}
}
{ cv hn 0 0,1,2; cv base 0 3,4; cv hn 1 0,1,2; cv base 1 3,4; } > out/hardneg-a.log 2>&1 &
{ cv hn 0 3,4; cv base 0 0,1,2; cv hn 1 3,4; cv base 1 0,1,2; } > out/hardneg-b.log 2>&1 &
if [ "${SEEDS:-0 1}" = "0 1 2" ]; then
    { cv hn 2 0,1,2; cv base 2 3,4; } > out/hardneg-c.log 2>&1 &
    { cv hn 2 3,4; cv base 2 0,1,2; } > out/hardneg-d.log 2>&1 &
fi
wait
for arm in hn base; do for s in ${SEEDS:-0 1}; do cv "$arm" "$s" ""; done; done   # pool each run
# paired, on the same 222 images (recipes and seeds), then each seed alone:
python -m benchmarks.compare_runs --a out/mias-base-seed{0,1}/oof_predictions.json \
    --b out/mias-hn-seed{0,1}/oof_predictions.json --label mias-hardneg-vs-patch256-2seeds \
    --results benchmarks/results
for s in 0 1; do
    python -m benchmarks.compare_runs --a out/mias-base-seed$s/oof_predictions.json \
        --b out/mias-hn-seed$s/oof_predictions.json \
        --label mias-hardneg-vs-patch256-seed$s --results benchmarks/results
done
# post hoc: the same detections without those outside the breast (film labels)
python -m benchmarks.mias_inbreast --cache out/mini-mias/cache-native \
    --oof out/mias-hn-seed{0,1}/oof_predictions.json --label hardneg-2seeds \
    --results benchmarks/results
python -m benchmarks.mias_inbreast --cache out/mini-mias/cache-native \
    --oof out/mias-base-seed{0,1}/oof_predictions.json --label patch256-2seeds \
    --results benchmarks/results
