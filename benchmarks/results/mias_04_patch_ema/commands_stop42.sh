#!/usr/bin/env bash
# Stop 42: weight averaging (the "weight averaging": an EMA of the weights with
# the warm-up ramp, ema_decay 0.999) on the 0.4 mm patch + hard-negative recipe of
# stop 40 (../mias_04_patch_hardneg/commands_stop40.sh; the same flags, plus the EMA).
# With ema_decay set, crossval scores the EMA and also predicts the same held-out
# images with the weights the optimizer trained (the student): one training run gives
# both arms, so the paired difference holds each seed's training noise fixed
# (cv_metrics.json "ema_gain", oof_predictions-student.json).
# mini-MIAS 5-fold CV, three seeds, two processes of one thread on 2 cores (~45 min).
# Needs the 0.4 mm cache (configs/real/mini-mias.yaml's comment: import-mias, ingest).
set -euo pipefail
export OMP_NUM_THREADS=1
C=configs/real/mini-mias-cv.yaml
cvp() {  # cvp SEED [FOLDS]
    mammofed-sim crossval --config "$C" --folds 5 --out "out/mias04e-seed$1" \
        --set "seed=$1" --set epochs=40 --set augment.patch=256 \
        --set augment.patch_lesion_p=0.7 --set augment.hard_negative_p=0.7 \
        --set augment.hard_negative_every=10 --set augment.hard_negative_per_image=4 \
        --set model.breast_mask=true --set ema_decay=0.999 ${2:+--only-folds "$2"}
}
if [ "${PART:-train}" = train ]; then
    { cvp 0 0,1,2; cvp 1 3,4; cvp 2 0,1,2; } > out/mias04e-a.log 2>&1 &
    { cvp 0 3,4; cvp 1 0,1,2; cvp 2 3,4; } > out/mias04e-b.log 2>&1 &
    wait
fi
for s in 0 1 2; do cvp "$s"; done   # pool each seed's folds (EMA and student)
python -m benchmarks.compare_runs \
    --a out/mias04e-seed{0,1,2}/oof_predictions-student.json \
    --b out/mias04e-seed{0,1,2}/oof_predictions.json \
    --label mias-04-patch-ema-vs-student-3seeds --results benchmarks/results
