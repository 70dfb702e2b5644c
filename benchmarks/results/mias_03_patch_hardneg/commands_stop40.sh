#!/usr/bin/env bash
# Stop 40: the 0.4 mm patch + hard-negative recipe (../mias_04_patch_hardneg/) at a
# 0.3 mm working spacing: finer pixels for calcification specks, and 256 px patches
# (77 mm) that still hold a mass with its margin. The patch recipe trains in a third
# of the whole-image recipe's time, which pays for the 1.8x pixels of inference and
# mining. Baseline: the 0.4 mm patch runs (same settings, same folds and women).
# mini-MIAS 5-fold CV, three seeds, two processes of one thread on 2 cores.
set -euo pipefail
export OMP_NUM_THREADS=1
R=benchmarks/results/mias_03_patch_hardneg
[ -f out/mini-mias/cache-03/manifest.csv ] || mammofed-client ingest out/mini-mias/site \
    --out out/mini-mias/cache-03 --site-config "$R/site.yaml"
C=configs/real/mini-mias-cv.yaml
cvp() {  # cvp SEED [FOLDS]
    mammofed-sim crossval --config "$C" --folds 5 --out "out/mias03p-seed$1" \
        --set "caches=[out/mini-mias/cache-03]" --set model.working_spacing_mm=0.3 \
        --set "seed=$1" --set epochs=40 --set augment.patch=256 \
        --set augment.patch_lesion_p=0.7 --set augment.hard_negative_p=0.7 \
        --set augment.hard_negative_every=10 --set augment.hard_negative_per_image=4 \
        --set model.breast_mask=true ${2:+--only-folds "$2"}
}
if [ "${PART:-train}" = train ]; then
    { cvp 0 0,1,2; cvp 1 3,4; cvp 2 0,1,2; } > out/mias03p-a.log 2>&1 &
    { cvp 0 3,4; cvp 1 0,1,2; cvp 2 3,4; } > out/mias03p-b.log 2>&1 &
    wait
fi
for s in 0 1 2; do cvp "$s"; done   # pool each seed's folds
# then tail_stop40.sh: the pairing (the 0.3 mm keys and pixels are cache-03's, so
# compare_runs on the raw files refused them: "the image sets differ").
