#!/usr/bin/env bash
# The judged path of issue 13 (benchmarks/results/judged_path/rehearsal.sh) with
# model.speck_clusters on: the final recipe trained on the first 92 development women,
# its clusters from the specks that ingest keeps (configs/sites/mini-mias.yaml:
# specks: true), scored by evaluate and predict on the last 20 women (one cluster).
# Stop 46: masses as without it (CPM 0.829, 7 masses); the one cluster (mdb256) is
# missed (CPM 0.0; the network's own clusters 0.2): metrics-new-women.json here.
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=${OUT:-out/rehearsal-specks} TRAIN_SET="--set model.speck_clusters=true" \
  bash benchmarks/results/judged_path/rehearsal.sh
