#!/usr/bin/env bash
# Stop 45: the other breast as a second input channel (PLAN.md beside this file,
# written before the run). The stop-44 baseline recipe plus model.contralateral,
# three seeds, the same folds; paired with the baseline's kept out-of-fold files
# (benchmarks/results/mias_04_pretrain/oof_predictions*-base-seed*.json.gz).
# mini-MIAS 5-fold CV, two processes of one thread on 2 cores (~50 min).
set -euo pipefail
export OMP_NUM_THREADS=1
C=configs/real/mini-mias-cv.yaml
K=benchmarks/results/mias_04_pretrain
R=benchmarks/results/mias_04_contralateral
cvc() {  # cvc SEED [FOLDS]
    mammofed-sim crossval --config "$C" --folds 5 --out "out/mias04cl-seed$1" \
        --set "seed=$1" --set epochs=40 --set augment.patch=256 \
        --set augment.patch_lesion_p=0.7 --set augment.hard_negative_p=0.7 \
        --set augment.hard_negative_every=10 --set augment.hard_negative_per_image=4 \
        --set model.breast_mask=true --set ema_decay=0.999 \
        --set model.contralateral=true ${2:+--only-folds "$2"}
}
if [ "${PART:-train}" = train ]; then
    { cvc 0 0,1,2; cvc 1; } > out/mias04cl-a.log 2>&1 &
    { cvc 0 3,4; cvc 2; } > out/mias04cl-b.log 2>&1 &
    wait
fi
for s in 0 1 2; do cvc "$s"; done  # pool (EMA and student)
python -m benchmarks.compare_runs \
    --a $K/oof_predictions-base-seed{0,1,2}.json.gz \
    --b out/mias04cl-seed{0,1,2}/oof_predictions.json \
    --label mias-04-contralateral-vs-none-3seeds-ema --results benchmarks/results
python -m benchmarks.compare_runs \
    --a $K/oof_predictions-student-base-seed{0,1,2}.json.gz \
    --b out/mias04cl-seed{0,1,2}/oof_predictions-student.json \
    --label mias-04-contralateral-vs-none-3seeds-student --results benchmarks/results
for s in 0 1 2; do
    cp "out/mias04cl-seed$s/cv_metrics.json" "$R/cv_metrics-cl-seed$s.json"
    for f in oof_predictions oof_predictions-student; do
        gzip -c "out/mias04cl-seed$s/$f.json" > "$R/$f-cl-seed$s.json.gz"
    done
done
