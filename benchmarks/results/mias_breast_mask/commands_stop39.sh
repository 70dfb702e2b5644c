#!/usr/bin/env bash
# Stop 39: the breast mask at inference (model.breast_mask) measured on mini-MIAS
# 5-fold CV, three seeds each, paired on the same 222 images:
#   1. the recommended 0.4 mm recipe (configs/real/mini-mias-cv.yaml), trained here;
#   2. the native 0.2 mm patch recipe with and without hard negatives (the runs of
#      ../mias_cv_hardneg/commands_stop3{8,9}.sh).
# The mask acts only at prediction (crossval.INFERENCE_ONLY_MODEL_FIELDS): each run's
# finished folds are copied and re-predicted with --set model.breast_mask=true, so the
# two arms share every weight. About 55 min on 2 cores for the training, 2 min a run
# for the re-predictions. Needs the 0.4 mm cache (configs/real/mini-mias.yaml).
set -euo pipefail
export OMP_NUM_THREADS=1
C04=configs/real/mini-mias-cv.yaml
CHN=benchmarks/results/mias_cv_hardneg/config.yaml
cv04() {  # cv04 SEED [FOLDS]
    mammofed-sim crossval --config "$C04" --folds 5 --out "out/mias04-seed$1" \
        --set "seed=$1" ${2:+--only-folds "$2"}
}
{ cv04 0 0,1,2; cv04 1 3,4; cv04 2 0,1,2; } > out/mias04-a.log 2>&1 &
{ cv04 0 3,4; cv04 1 0,1,2; cv04 2 3,4; } > out/mias04-b.log 2>&1 &
wait
for s in 0 1 2; do cv04 "$s" ""; done > out/mias04-pool.log 2>&1
remask() {  # remask RUN CONFIG SEED [EXTRA --set]: re-predict RUN's folds with the mask
    rm -rf "out/$1-mask" && mkdir -p "out/$1-mask" && cp -r out/"$1"/fold-* "out/$1-mask/"
    mammofed-sim crossval --config "$2" --folds 5 --out "out/$1-mask" --set "seed=$3" \
        --set model.breast_mask=true ${4:+--set "$4"}
}
for s in 0 1 2; do
    remask "mias04-seed$s" "$C04" "$s"
    remask "mias-hn-seed$s" "$CHN" "$s"
    remask "mias-base-seed$s" "$CHN" "$s" augment.hard_negative_p=0
done > out/mask-repredict.log 2>&1
for run in mias04 mias-hn mias-base; do
    python -m benchmarks.compare_runs --a out/$run-seed{0,1,2}/oof_predictions.json \
        --b out/$run-seed{0,1,2}-mask/oof_predictions.json \
        --label "mias-breast-mask-$run-3seeds" --results benchmarks/results
done
# each class from the recipe that finds it best (post hoc, benchmarks.mias_classwise):
# masses from the 0.4 mm recipe, clusters from the 0.2 mm recipe with hard negatives
python -m benchmarks.mias_classwise --mass out/mias04-seed{0,1,2}/oof_predictions.json \
    --mass-cache out/mini-mias/cache --calc out/mias-hn-seed{0,1,2}/oof_predictions.json \
    --calc-cache out/mini-mias/cache-native --label 04-masses-hn-clusters-3seeds \
    --results benchmarks/results
python -m benchmarks.mias_classwise --mass out/mias04-seed{0,1,2}-mask/oof_predictions.json \
    --mass-cache out/mini-mias/cache --calc out/mias-hn-seed{0,1,2}-mask/oof_predictions.json \
    --calc-cache out/mini-mias/cache-native --label 04-masses-hn-clusters-mask-3seeds \
    --results benchmarks/results
# three seeds of the 0.4 mm recipe fused (a 3-model ensemble trains in 3 x 9 min), masked
python -m benchmarks.ensemble --oof out/mias04-seed{0,1,2}-mask/oof_predictions.json \
    --results benchmarks/results
