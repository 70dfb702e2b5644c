#!/usr/bin/env bash
# mini-MIAS 5-fold cross-validation of several detector recipes at once, for a
# session lent a GPU (issue 13: "find the lesions"). One call, under 10 minutes
# on an H100/H200: every fold of every recipe is its own process on the one GPU.
#
# Usage (repo root):
#   mkdir -p .devcarry && cp -r ../shared/data/mini-mias .devcarry/   # 47 MB, ignored
#   OUT=dir T=seconds bash benchmarks/gpu_mias.sh
# carry: .devcarry (and .whl: cp312 wheels of pydicom and pyyaml where the box lacks them;
# `PKGS="pydicom pyyaml" bash benchmarks/gpu_wheels.sh` makes them).
# RECIPES: space-separated "name=config[,epochs[,seed]]" (configs under configs/real/;
# epochs and seed override the config's; an empty epochs keeps it: "cfg.yaml,,1").
# Two seeds a recipe: one run of the CPU recipe moves by about 0.05 mass CPM with the
# seed (docs/detector.md), as much as any recipe change. The CPU recipe at 60 epochs
# is measured on the CPU (one seed, no gain over 25), so it is not here.
# On the CPU (CI, a check of this script) give RECIPES with 1 epoch and FOLDS=2.
# Writes $OUT/summary.txt and $OUT/results.tar (per recipe cv-<name>/: cv_metrics.json,
# FROC and error-gallery PNGs, out-of-fold predictions for benchmarks.ensemble --oof).
set -euo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${THREADS:-2}
OUTD=${OUT:-/tmp/gpu-mias}; mkdir -p "$OUTD"
MIAS=${MIAS:-.devcarry/mini-mias}
WORK=${WORK:-/tmp/gpu-mias-work}
FOLDS=${FOLDS:-5}
RECIPES=${RECIPES:-"resnet18=mini-mias-cv-gpu.yaml resnet18-s1=mini-mias-cv-gpu.yaml,,1 native=mini-mias-native-cv.yaml,40 native-s1=mini-mias-native-cv.yaml,40,1"}
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
mkdir -p "$WORK"
[ -d "$WORK/site" ] || python3 -m simulation.cli import-mias "$MIAS" "$WORK/site" > "$WORK/prep.log" 2>&1
declare -A CFG
for r in $RECIPES; do
  name=${r%%=*}; rest=${r#*=}; conf=${rest%%,*}; ep=""; seed=""
  [ "$rest" != "$conf" ] && { ep=${rest#*,}; [ "$ep" != "${ep%%,*}" ] && seed=${ep#*,}; ep=${ep%%,*}; }
  # the config with this box's cache and output folder; prints the cache it needs
  cache=$(python3 - "$conf" "$WORK" "$name" "$ep" "$seed" <<'PY'
import sys, yaml
conf, work, name, ep, seed = sys.argv[1:]
d = yaml.safe_load(open(f"configs/real/{conf}"))
cache = "cache-native" if any("native" in c for c in d["caches"]) else "cache"
d["caches"] = [f"{work}/{cache}"]
d["out_dir"] = f"{work}/cv-{name}"
d["device"] = "auto"
if ep:
    d["epochs"] = int(ep)
if seed:
    d["seed"] = int(seed)
yaml.safe_dump(d, open(f"{work}/{name}.yaml", "w"))
print(cache)
PY
)
  site=mini-mias; [ "$cache" = cache-native ] && site=mini-mias-native
  [ -d "$WORK/$cache" ] || python3 -m client.cli ingest "$WORK/site" --out "$WORK/$cache" \
      --site-config configs/sites/$site.yaml >> "$WORK/prep.log" 2>&1
  CFG[$name]=$WORK/$name.yaml
  echo "$name: $conf${ep:+ ($ep epochs)}${seed:+ (seed $seed)} on $cache, $FOLDS folds started $(date +%T)"
  for f in $(seq 0 $((FOLDS - 1))); do
    timeout ${T:-480} python3 -m simulation.cli crossval --config "$WORK/$name.yaml" \
      --folds "$FOLDS" --only-folds $f > "$WORK/$name-fold$f.log" 2>&1 &
  done
done
wait || true
echo "folds trained $(date +%T)"
for name in "${!CFG[@]}"; do
  # pools the folds (each is only re-predicted) and writes the galleries
  timeout ${TP:-300} python3 -m simulation.cli crossval --config "${CFG[$name]}" --folds "$FOLDS" \
    > "$WORK/$name-pool.log" 2>&1 || echo "$name: pooling failed or timed out (TP=${TP:-300} s; see $WORK/$name-pool.log)"
  (cd "$WORK" && tar rf "$OUTD/results.tar" "cv-$name"/cv_metrics.json "cv-$name"/*.png \
      "cv-$name"/oof_predictions*.json 2>/dev/null) || true
  grep -h "CV .* folds\|fold .*: CPM" "$WORK/$name"-*.log | sed "s/^/$name: /" >> "$OUTD/summary.txt" || true
done
cat "$OUTD/summary.txt" 2>/dev/null || echo "no summary"
