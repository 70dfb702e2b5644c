#!/usr/bin/env bash
# Stop 50: the recommended 0.4 mm mini-MIAS recipe's seeds 1 and 2 trained
# again with today's inference (stop 48 made an image's findings independent
# of its batch; the hard-negative miner detects during training, so training
# changes too). Seed 0 was rerun at stop 48 (out/mias48base-seed0, +0.005
# [-0.030, 0.032] mass CPM against its stop-44 run). The same command as
# stop 44's base arm (benchmarks/results/mias_04_pretrain/commands_stop44.sh),
# the same folds; two processes of one thread on 2 cores (~15 min a seed).
# Then: each rerun paired with its stop-44 run, and the three seeds of today's
# code pooled (the README's headline figure).
set -euo pipefail
export OMP_NUM_THREADS=1
C=configs/real/mini-mias-cv.yaml
R=benchmarks/results/mias_04_limits
K=benchmarks/results/mias_04_pretrain
cv() {  # cv OUT SEED [FOLDS]
    mammofed-sim crossval --config "$C" --folds 5 --out "$1" \
        --set "seed=$2" --set epochs=40 --set augment.patch=256 \
        --set augment.patch_lesion_p=0.7 --set augment.hard_negative_p=0.7 \
        --set augment.hard_negative_every=10 --set augment.hard_negative_per_image=4 \
        --set model.breast_mask=true --set ema_decay=0.999 \
        ${3:+--only-folds "$3"}
}
if [ "${PART:-train}" = train ]; then
    for s in 1 2; do
        cv "out/mias50base-seed$s" "$s" 0,1,2 > "out/mias50-$s-a.log" 2>&1 &
        cv "out/mias50base-seed$s" "$s" 4,3 > "out/mias50-$s-b.log" 2>&1
        wait
        cv "out/mias50base-seed$s" "$s" > "out/mias50-$s-pool.log" 2>&1
    done
fi
for s in 1 2; do
    gunzip -c "$K/oof_predictions-base-seed$s.json.gz" > "out/stop44-base-seed$s.json"
    python -m benchmarks.compare_runs --a "out/stop44-base-seed$s.json" \
        --b "out/mias50base-seed$s/oof_predictions.json" \
        --label "stop50-rerun-vs-stop44-base-seed$s" --results "$R"
done
gunzip -c "$K/oof_predictions-base-seed0.json.gz" > out/stop44-base-seed0.json
python -m benchmarks.compare_runs --a out/stop44-base-seed{0,1,2}.json \
    --b out/mias48base-seed0/oof_predictions.json out/mias50base-seed{1,2}/oof_predictions.json \
    --label "stop50-rerun-vs-stop44-base-3seeds" --results "$R"
for s in 1 2; do
    cp "out/mias50base-seed$s/cv_metrics.json" "$R/cv_metrics-rerun-seed$s.json"
    gzip -c "out/mias50base-seed$s/oof_predictions.json" > "$R/oof_predictions-rerun-seed$s.json.gz"
done
cp out/mias48base-seed0/cv_metrics.json "$R/cv_metrics-rerun-seed0.json"
gzip -c out/mias48base-seed0/oof_predictions.json > "$R/oof_predictions-rerun-seed0.json.gz"
