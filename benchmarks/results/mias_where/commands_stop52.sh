#!/usr/bin/env bash
# Stop 52: do the false positives at 1 FP/image differ from the hits in
# anything but appearance? Where a mass mark lies in the breast, its size,
# its rank in its image, its image's best score and the film's density,
# each set fed with the detector's logit to a logistic re-scorer fitted on
# the other folds (benchmarks.mias_posthoc --analyses where), on stop 51's
# three seeds of the recommended 0.4 mm recipe (mias_ignore). Seconds a file
# on 2 cores, minutes with the bootstrap.
set -euo pipefail
K=benchmarks/results/mias_ignore
python -m benchmarks.mias_posthoc --analyses where --cache out/mini-mias/cache \
    --results benchmarks/results/mias_where \
    --oof $K/oof_predictions-ignore-seed{0,1,2}.json.gz
