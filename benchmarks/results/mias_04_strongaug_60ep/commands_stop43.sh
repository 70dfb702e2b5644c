#!/usr/bin/env bash
# Stop 43: the stronger augmentation of stop 42 trained longer. That run's masses
# reached the best sensitivity of any CPU recipe (0.742 at 1 FP/image) and 60 epochs
# had gained nothing with the milder augmentation, whose model fits its 178 training
# images early; with stronger augmentation it may keep learning. One change: 60
# epochs instead of 40 (warm-up and cosine stretched over them), everything else the
# stop-42 strong-augmentation run (../mias_04_patch_strongaug/commands_stop42.sh):
# same seeds and folds, so the two pair image by image. The figure, fixed before the
# run: the EMA against the EMA, three seeds; the trained weights beside it.
# mini-MIAS 5-fold CV, two processes of one thread on 2 cores (~75 min).
set -euo pipefail
export OMP_NUM_THREADS=1
C=configs/real/mini-mias-cv.yaml
cvp() {  # cvp SEED [FOLDS]
    mammofed-sim crossval --config "$C" --folds 5 --out "out/mias04l-seed$1" \
        --set "seed=$1" --set epochs=60 --set augment.patch=256 \
        --set augment.patch_lesion_p=0.7 --set augment.hard_negative_p=0.7 \
        --set augment.hard_negative_every=10 --set augment.hard_negative_per_image=4 \
        --set model.breast_mask=true --set ema_decay=0.999 \
        --set augment.scale_min=0.7 --set augment.scale_max=1.4 \
        --set augment.paste_p=0.8 --set augment.paste_max=3 ${2:+--only-folds "$2"}
}
if [ "${PART:-train}" = train ]; then
    { cvp 0 0,1,2; cvp 1 3,4; cvp 2 0,1,2; } > out/mias04l-a.log 2>&1 &
    { cvp 0 3,4; cvp 1 0,1,2; cvp 2 3,4; } > out/mias04l-b.log 2>&1 &
    wait
fi
for s in 0 1 2; do cvp "$s"; done   # pool each seed's folds (EMA and student)
for arm in ema:oof_predictions student:oof_predictions-student; do
    f=${arm#*:}
    python -m benchmarks.compare_runs \
        --a out/mias04a-seed{0,1,2}/$f.json --b out/mias04l-seed{0,1,2}/$f.json \
        --label "mias-04-strongaug-60ep-vs-40ep-3seeds-${arm%%:*}" \
        --results benchmarks/results
done
