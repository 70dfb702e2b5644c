#!/usr/bin/env bash
# Stop 40: the patch recipe (lesion-centred and random breast patches plus
# hard negatives mined from the model's own false positives) at the recommended
# 0.4 mm working spacing, where masses keep their context: 256 px patches = 102 mm.
# The native 0.2 mm patch recipe gained +0.135 mass CPM from mining (stops 38-39) but
# its 51 mm patches kept it below the 0.4 mm whole-image recipe; this asks whether
# mining helps at 0.4 mm. Baseline: the 0.4 mm whole-image recipe's three seeds of
# stop 39 (out/mias04-seed{0,1,2}-mask, configs/real/mini-mias-cv.yaml with the
# breast mask, which changed nothing there), the same folds and women.
# mini-MIAS 5-fold CV, three seeds, two processes of one thread on 2 cores.
set -euo pipefail
export OMP_NUM_THREADS=1
C=configs/real/mini-mias-cv.yaml
cvp() {  # cvp SEED [FOLDS]
    mammofed-sim crossval --config "$C" --folds 5 --out "out/mias04p-seed$1" \
        --set "seed=$1" --set epochs=40 --set augment.patch=256 \
        --set augment.patch_lesion_p=0.7 --set augment.hard_negative_p=0.7 \
        --set augment.hard_negative_every=10 --set augment.hard_negative_per_image=4 \
        --set model.breast_mask=true ${2:+--only-folds "$2"}
}
if [ "${PART:-train}" = train ]; then
    { cvp 0 0,1,2; cvp 1 3,4; cvp 2 0,1,2; } > out/mias04p-a.log 2>&1 &
    { cvp 0 3,4; cvp 1 0,1,2; cvp 2 3,4; } > out/mias04p-b.log 2>&1 &
    wait
fi
for s in 0 1 2; do cvp "$s"; done   # pool each seed's folds
python -m benchmarks.compare_runs --a out/mias04-seed{0,1,2}-mask/oof_predictions.json \
    --b out/mias04p-seed{0,1,2}/oof_predictions.json \
    --label mias-04-patch-hardneg-vs-whole-3seeds --results benchmarks/results
