#!/usr/bin/env bash
# Vendor-shift study on a GPU box (torch present, Flower absent): base, local-only and
# oracle regimes of the demo scenario with the ResNet-18 detector.
# Usage (repo root): OUT=dir T=seconds W=workers bash benchmarks/gpu_study.sh
# On an H100 the three regimes take about 150 s after a 20 s setup: give T=240.
set -e
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site:$PWD; else export PYTHONPATH=$PWD; fi
export PYTHONUNBUFFERED=1
OUTD=${OUT:-/tmp/gpuout}; mkdir -p $OUTD
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available())"
timeout ${T:-150} python3 -m simulation.cli run --scenario configs/simulation/demo.yaml --federation configs/federation/sim-gpu.yaml --out /tmp/gpu --data /tmp/gpudata --regime base --regime local-only --regime oracle --workers ${W:-16} --n-boot 500 ${EXTRA} > /tmp/gpu.log 2>&1 || echo "run exit $?"
grep -E "CPM|done in|error|Error" /tmp/gpu.log > $OUTD/summary.txt || true
tail -60 /tmp/gpu.log > $OUTD/log.txt
for r in /tmp/gpu/*/metrics.json; do [ -f "$r" ] && mkdir -p $OUTD/$(basename $(dirname $r)) && cp $r $OUTD/$(basename $(dirname $r))/; done
cp /tmp/gpu/report/report.md /tmp/gpu/report/report.json /tmp/gpu/run.json $OUTD/ 2>/dev/null || true
cp /tmp/gpu/report/froc_A.png /tmp/gpu/report/froc_B.png $OUTD/ 2>/dev/null || true
ls $OUTD
