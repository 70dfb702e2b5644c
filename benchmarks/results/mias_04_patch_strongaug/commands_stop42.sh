#!/usr/bin/env bash
# Stop 42: stronger augmentation for a detector that overfits its 178 training images
# (its training loss still falls at epoch 25 and 60 epochs gained nothing,
# docs/detector.md): random resize 0.7-1.4 instead of 0.85-1.15, and the training
# women's own lesions pasted into 80% of the images (1-3 each) instead of 50% (1-2).
# Everything else is the run of ../mias_04_patch_ema/commands_stop42.sh (0.4 mm,
# 102 mm patches, hard negatives, breast mask, the EMA): the same seeds and folds, so
# the two pair image by image. The figure is the EMA against the EMA (decided before
# the run); the trained weights against the trained weights are reported beside it.
# mini-MIAS 5-fold CV, three seeds, two processes of one thread on 2 cores (~40 min).
set -euo pipefail
export OMP_NUM_THREADS=1
C=configs/real/mini-mias-cv.yaml
cvp() {  # cvp SEED [FOLDS]
    mammofed-sim crossval --config "$C" --folds 5 --out "out/mias04a-seed$1" \
        --set "seed=$1" --set epochs=40 --set augment.patch=256 \
        --set augment.patch_lesion_p=0.7 --set augment.hard_negative_p=0.7 \
        --set augment.hard_negative_every=10 --set augment.hard_negative_per_image=4 \
        --set model.breast_mask=true --set ema_decay=0.999 \
        --set augment.scale_min=0.7 --set augment.scale_max=1.4 \
        --set augment.paste_p=0.8 --set augment.paste_max=3 ${2:+--only-folds "$2"}
}
if [ "${PART:-train}" = train ]; then
    { cvp 0 0,1,2; cvp 1 3,4; cvp 2 0,1,2; } > out/mias04a-a.log 2>&1 &
    { cvp 0 3,4; cvp 1 0,1,2; cvp 2 3,4; } > out/mias04a-b.log 2>&1 &
    wait
fi
for s in 0 1 2; do cvp "$s"; done   # pool each seed's folds (EMA and student)
for arm in ema:oof_predictions student:oof_predictions-student; do
    f=${arm#*:}
    python -m benchmarks.compare_runs \
        --a out/mias04e-seed{0,1,2}/$f.json --b out/mias04a-seed{0,1,2}/$f.json \
        --label "mias-04-patch-strongaug-vs-default-3seeds-${arm%%:*}" \
        --results benchmarks/results
done
