#!/usr/bin/env bash
# Speck clusters on the phantom (stop 46): the demo scenario's four vendors generated
# and ingested with `specks: true`, then the shipped H base model (models/demo-base-h.pt)
# scored on each site's test women with its own clusters and with the speck clusters,
# paired over the same images (benchmarks.speck_clusters --checkpoint; 2 min on 2 cores).
# The finder's settings are the ones fixed on mini-MIAS; nothing was tuned here.
set -euo pipefail
cd "$(dirname "$0")/../../.."
D=${OUT:-out/specks-phantom}
mammofed-sim phantom --scenario configs/simulation/demo.yaml --out $D/sites --workers 2 --no-progress
for s in A B C D; do
  printf 'name: %s\nworking_spacing_mm: 0.4\nspecks: true\nworkers: 2\n' $s > $D/site-$s.yaml
  mammofed-client ingest $D/sites/$s --out $D/cache-$s --site-config $D/site-$s.yaml > $D/ingest-$s.log 2>&1
done
python -m benchmarks.speck_clusters --checkpoint models/demo-base-h.pt \
  --site-caches $D/cache-{A,B,C,D} --results benchmarks/results/mias_04_specks
