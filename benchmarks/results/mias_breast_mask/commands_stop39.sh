#!/usr/bin/env bash
# Stop 39: the breast mask at inference (model.breast_mask) measured on mini-MIAS
# 5-fold CV, three seeds each, paired on the same 222 images:
#   1. the recommended 0.4 mm recipe (configs/real/mini-mias-cv.yaml), trained here;
#   2. the native 0.2 mm patch recipe with and without hard negatives (the runs of
#      ../mias_cv_hardneg/commands_stop3{8,9}.sh).
# The mask acts only at prediction (crossval.INFERENCE_ONLY_MODEL_FIELDS): each run's
# finished folds are copied and re-predicted with --set model.breast_mask=true, so the
# two arms share every weight. About 90 min on 2 cores for the training, 1.5 min a
# run for the re-predictions. Needs the 0.4 mm cache (configs/real/mini-mias.yaml).
set -euo pipefail
export OMP_NUM_THREADS=1
C04=configs/real/mini-mias-cv.yaml
cv04() {  # cv04 SEED [FOLDS]
    mammofed-sim crossval --config "$C04" --folds 5 --out "out/mias04-seed$1" \
        --set "seed=$1" ${2:+--only-folds "$2"}
}
{ cv04 0 0,1,2; cv04 1 3,4; cv04 2 0,1,2; } > out/mias04-a.log 2>&1 &
{ cv04 0 3,4; cv04 1 0,1,2; cv04 2 3,4; } > out/mias04-b.log 2>&1 &
wait
# then tail_stop39.sh: PART=native (the native runs' re-predictions, run beside this
# training) and PART=rest (pool, re-predict the 0.4 mm runs, compare, fuse). At stop 39
# seed 2's fold 2 was also started by hand as a third process (the same cv04 command
# with --only-folds 2) to even out the two processes' load.
