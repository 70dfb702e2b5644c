#!/bin/bash
# The run: mammofed-sim run --scenario configs/simulation/study-confirm.yaml --federation configs/federation/sim-demo.yaml \
#   --base-checkpoint models/demo-base-h.pt --data out/confirm-data --out out/confirm-fix --reuse out/confirm \
#   --seeds 0,1,2 --parallel 2 --threads 1 --regime base --regime local-only --regime personalized \
#   --regime personalized-ssl --regime personalized-all-labels   (22 min on 2 cores, report included)
# (out/confirm-ssl holds the same regimes trained before the fix: make study-confirm-ssl at stop 31)
# paired comparisons on the confirmation's new women, stop 33 (round-seeding fix)
set -e
cd "$(dirname "$0")/../../.."
P=.venv/bin/python
S="seed-0 seed-1 seed-2"
side() { for s in $S; do printf "%s/%s/%s " "$1" "$s" "$2"; done; }
R=${R:-benchmarks/results/study_confirm}
C='-01[0-9]{3}$'
for reg in personalized personalized-ssl personalized-all-labels; do
  $P -m benchmarks.compare_runs --cases="$C" --a $(side out/confirm-ssl $reg) --b $(side out/confirm-fix $reg) \
     --label confirm-new-women-$reg-round-draws-fix-vs-before --results $R
done
for a in base local-only; do
  $P -m benchmarks.compare_runs --cases="$C" --a $(side out/confirm $a) --b $(side out/confirm-fix personalized) \
     --label confirm-new-women-personalized-fixed-vs-$a --results $R
done
$P -m benchmarks.compare_runs --cases="$C" --a $(side out/confirm-fix personalized) --mid $(side out/confirm-fix personalized-ssl) \
   --b $(side out/confirm-fix personalized-all-labels) --label confirm-new-women-ssl-gap-fixed --results $R
$P -m benchmarks.compare_runs --cases="$C" --a $(side out/confirm-fix personalized) --b $(side out/confirm personalized-dp) \
   --label confirm-new-women-dp-price-fixed --results $R
$P -m benchmarks.compare_runs --cases="$C" --a $(side out/confirm-fix personalized) --b $(side out/confirm-fix personalized-ssl) \
   --label confirm-new-women-ssl-vs-labeled-fixed --results $R
# the stop-33 screen of ensembles with the fixed personalized model:
#   python benchmarks/results/study_confirm/fuse_screen.py stop33  (writes out/join33/seed-*/<ensemble>/detections.json)
#   then compare_runs --cases "$C" --a out/confirm/seed-*/base (local-only; out/confirm-ssl: oracle,
#   personalized-dp+tuned+local) --b out/join33/seed-*/<ensemble> --label screen33-<ensemble>-vs-<a>
