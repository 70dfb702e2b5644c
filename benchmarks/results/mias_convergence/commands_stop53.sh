#!/usr/bin/env bash
# Stop 53: does the classic CAD mass filter separate the false marks from the
# hits? Each mass mark's gradient convergence index (Kobatake's iris /
# Karssemeijer's gradient-concentration family: the mean cosine between the
# gradient's direction on an annulus and the direction back to the mark,
# 2-6, 4-12 and 8-24 mm) and the gradient's coherence, fed with the
# detector's logit to the logistic re-scorer fitted on the other folds
# (benchmarks.mias_posthoc --analyses convergence), on stop 51's three seeds
# of the recommended 0.4 mm recipe (mias_ignore). About a minute a file on
# 2 cores.
set -euo pipefail
K=benchmarks/results/mias_ignore
python -m benchmarks.mias_posthoc --analyses convergence --cache out/mini-mias/cache \
    --results benchmarks/results/mias_convergence \
    --oof $K/oof_predictions-ignore-seed{0,1,2}.json.gz
