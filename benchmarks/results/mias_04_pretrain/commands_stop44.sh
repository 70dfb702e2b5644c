#!/usr/bin/env bash
# Stop 44: self-supervised pretraining of the backbone, the one lever of issue 13's
# list not yet measured ("self-supervised pretraining of the backbone on every
# unlabeled mammogram a site has"). Before the supervised epochs, each fold's body
# learns masked image modelling (common.detector.pretrain: SimMIM-style, 60% of the
# 32-px blocks of 128-px breast patches masked, L1 on the masked pixels) on that
# fold's training images only, labels unused: 15 epochs of 16 patches per image.
# Everything else is the stop-42 recipe (0.4 mm, 102 mm patches, hard negatives,
# breast mask, EMA 0.999). The out-of-fold files of earlier runs are gone, so the
# baseline is rerun in the same session on the same seeds and folds, and the two
# arms pair image by image.
# The figure, fixed before the run: mass and cluster CPM, pretrained minus not,
# EMA against EMA, pooled over three seeds and the 222 images (paired bootstrap,
# benchmarks.compare_runs); the trained weights beside it. Adopted only if the
# mass interval is above 0 and clusters do not fall (interval's upper end > 0).
# mini-MIAS 5-fold CV, two processes of one thread on 2 cores (~105 min).
set -euo pipefail
export OMP_NUM_THREADS=1
C=configs/real/mini-mias-cv.yaml
cvp() {  # cvp ARM SEED [FOLDS]; ARM base or pt
    local extra=()
    if [ "$1" = pt ]; then
        extra=(--set pretrain.epochs=15 --set pretrain.patches_per_image=16)
    fi
    mammofed-sim crossval --config "$C" --folds 5 --out "out/mias04$1-seed$2" \
        --set "seed=$2" --set epochs=40 --set augment.patch=256 \
        --set augment.patch_lesion_p=0.7 --set augment.hard_negative_p=0.7 \
        --set augment.hard_negative_every=10 --set augment.hard_negative_per_image=4 \
        --set model.breast_mask=true --set ema_decay=0.999 "${extra[@]}" \
        ${3:+--only-folds "$3"}
}
if [ "${PART:-train}" = train ]; then
    { cvp base 0; cvp pt 0 0,1,2; cvp base 1; cvp pt 1 0,1,2; } > out/mias04pt-a.log 2>&1 &
    { cvp pt 0 3,4; cvp pt 1 3,4; cvp base 2; cvp pt 2; } > out/mias04pt-b.log 2>&1 &
    wait
fi
for a in base pt; do for s in 0 1 2; do cvp "$a" "$s"; done; done  # pool (EMA and student)
for arm in ema:oof_predictions student:oof_predictions-student; do
    f=${arm#*:}
    python -m benchmarks.compare_runs \
        --a out/mias04base-seed{0,1,2}/$f.json --b out/mias04pt-seed{0,1,2}/$f.json \
        --label "mias-04-pretrain-vs-none-3seeds-${arm%%:*}" \
        --results benchmarks/results
done
# keep what a later run pairs with: cv_metrics and the out-of-fold files, compressed
for a in base pt; do for s in 0 1 2; do
    cp "out/mias04$a-seed$s/cv_metrics.json" "benchmarks/results/mias_04_pretrain/cv_metrics-$a-seed$s.json"
    for f in oof_predictions oof_predictions-student; do
        gzip -c "out/mias04$a-seed$s/$f.json" > "benchmarks/results/mias_04_pretrain/$f-$a-seed$s.json.gz"
    done
done; done
