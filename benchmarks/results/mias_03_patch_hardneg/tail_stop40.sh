#!/usr/bin/env bash
# Stop 40, after commands_stop40.sh: the 0.3 mm runs' keys and pixels are those of
# cache-03, so each is mapped into the 0.4 mm cache's pixels and keys (through the
# geometry each cache recorded for the same source file) before pairing:
# benchmarks.mias_classwise --take all writes oof_predictions-mapped.json beside each
# 0.3 mm file and the paired difference (0.3 mm - 0.4 mm), seeds pooled.
set -euo pipefail
python -m benchmarks.mias_classwise --take all \
    --mass out/mias04p-seed{0,1,2}/oof_predictions.json --mass-cache out/mini-mias/cache \
    --calc out/mias03p-seed{0,1,2}/oof_predictions.json --calc-cache out/mini-mias/cache-03 \
    --label 03-vs-04-patch-hardneg-3seeds --results benchmarks/results
python -m benchmarks.compare_runs --a out/mias04-seed{0,1,2}-mask/oof_predictions.json \
    --b out/mias03p-seed{0,1,2}/oof_predictions-mapped.json \
    --label mias-03-patch-hardneg-vs-04-whole-3seeds --results benchmarks/results
