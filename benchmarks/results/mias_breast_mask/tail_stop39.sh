#!/usr/bin/env bash
# Stop 39, after commands_stop39.sh's training (the native runs' re-predictions need
# only the runs of ../mias_cv_hardneg, so they ran beside that training):
#   PART=native: re-predict the six native runs with the mask (beside the training);
#   PART=rest:   once the 0.4 mm folds are trained: pool, re-predict, compare, fuse.
set -euo pipefail
export OMP_NUM_THREADS=1
C04=configs/real/mini-mias-cv.yaml
CHN=benchmarks/results/mias_cv_hardneg/config.yaml
remask() {  # remask RUN CONFIG SEED [EXTRA --set]: re-predict RUN's folds with the mask
    rm -rf "out/$1-mask" && mkdir -p "out/$1-mask" && cp -r out/"$1"/fold-* "out/$1-mask/"
    mammofed-sim crossval --config "$2" --folds 5 --out "out/$1-mask" --set "seed=$3" \
        --set model.breast_mask=true ${4:+--set "$4"}
}
if [ "$PART" = native ]; then
    for s in 0 1 2; do
        remask "mias-hn-seed$s" "$CHN" "$s"
        remask "mias-base-seed$s" "$CHN" "$s" augment.hard_negative_p=0
    done
    for run in mias-hn mias-base; do
        python -m benchmarks.compare_runs --a out/$run-seed{0,1,2}/oof_predictions.json \
            --b out/$run-seed{0,1,2}-mask/oof_predictions.json \
            --label "mias-breast-mask-$run-3seeds" --results benchmarks/results
    done
    exit 0
fi
for s in 0 1 2; do
    mammofed-sim crossval --config "$C04" --folds 5 --out "out/mias04-seed$s" --set "seed=$s"
done
for s in 0 1 2; do remask "mias04-seed$s" "$C04" "$s"; done
python -m benchmarks.compare_runs --a out/mias04-seed{0,1,2}/oof_predictions.json \
    --b out/mias04-seed{0,1,2}-mask/oof_predictions.json \
    --label "mias-breast-mask-mias04-3seeds" --results benchmarks/results
python -m benchmarks.mias_classwise --mass out/mias04-seed{0,1,2}-mask/oof_predictions.json \
    --mass-cache out/mini-mias/cache --calc out/mias-hn-seed{0,1,2}-mask/oof_predictions.json \
    --calc-cache out/mini-mias/cache-native --label 04-masses-hn-clusters-mask-3seeds \
    --results benchmarks/results
python -m benchmarks.ensemble --oof out/mias04-seed{0,1,2}-mask/oof_predictions.json \
    --results benchmarks/results
