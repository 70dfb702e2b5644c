#!/usr/bin/env bash
# The study's main question at GPU scale, in one device call (CI never has a
# GPU; every path here also runs on CPU, see the smoke test below).
#
# MODE=recommended (default): the study scenario (configs/simulation/study.yaml,
#   60 test women per non-H site) with the GPU federation
#   (configs/federation/sim-gpu.yaml: ResNet-18 FCOS, 40 rounds), three seeds
#   side by side: base, local-only, the recommended regime
#   (personalized-ssl+tuned+local, simulation.regimes.RECOMMENDED) with its
#   members, and the oracle: the issue's main test (the recommended regime
#   against the base and local-only, and its share of the oracle). Regimes
#   run in the report's order (simulation.regimes.ORDER); a report over what
#   finished (paired intervals over women and seeds) is written even when T
#   cuts the run. REGIMES="... personalized personalized-all-labels" adds
#   the labels' gap of semi-supervision.
# MODE=shift: the earlier vendor-shift study (base, local-only and oracle of
#   the demo scenario, one seed; about 150 s on an H100 after a 20 s set-up).
#
# Usage (repo root): OUT=dir T=seconds [W=workers] [MODE=...] bash benchmarks/gpu_study.sh
#   T: seconds the study may run (default 480: one 10-minute device call
#   leaves room for the set-up and the report). Overrides for other sizes
#   and for the CPU smoke test (tests/benchmarks/test_gpu_study.py):
#   SCENARIO, FED, SEEDS (comma-separated), REGIMES (space-separated),
#   PARALLEL (seeds at once), N_BOOT, EXTRA (more mammofed-sim run flags).
#   Work folders go under WORK (default /tmp/gpustudy).
set -euo pipefail
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
fi
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUTD=${OUT:-/tmp/gpuout}
WORK=${WORK:-/tmp/gpustudy}
mkdir -p "$OUTD" "$WORK"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    | tee "$OUTD/device.txt"

MODE=${MODE:-recommended}
case "$MODE" in
recommended)
    SCENARIO=${SCENARIO:-configs/simulation/study.yaml}
    FED=${FED:-configs/federation/sim-gpu.yaml}
    SEEDS=${SEEDS:-0,1,2}
    REGIMES=${REGIMES:-base local-only personalized-ssl personalized-ssl-tuned personalized-ssl+tuned+local oracle}
    PARALLEL=${PARALLEL:-3}
    ;;
shift)
    SCENARIO=${SCENARIO:-configs/simulation/demo.yaml}
    FED=${FED:-configs/federation/sim-gpu.yaml}
    SEEDS=${SEEDS:-0}
    REGIMES=${REGIMES:-base local-only oracle}
    PARALLEL=${PARALLEL:-1}
    ;;
*)
    echo "MODE: recommended or shift, got '$MODE'" >&2
    exit 2
    ;;
esac
RUN=$WORK/run
FLAGS=(--scenario "$SCENARIO" --federation "$FED" --out "$RUN" --data "$WORK/data"
       --seeds "$SEEDS" --parallel "$PARALLEL" --workers "${W:-16}" --n-boot "${N_BOOT:-500}")
for r in $REGIMES; do FLAGS+=(--regime "$r"); done
# shellcheck disable=SC2206  # EXTRA is flags, split on purpose
FLAGS+=(${EXTRA:-})
echo "mammofed-sim run ${FLAGS[*]} (limit ${T:-480} s)" | tee "$OUTD/command.txt"
t0=$(date +%s)
rc=0
# timeout signals the whole process group: the seeds' worker processes too
timeout --kill-after=20 "${T:-480}" "$PY" -m simulation.cli run "${FLAGS[@]}" \
    > "$WORK/run.log" 2>&1 || rc=$?
echo "run exit $rc after $(( $(date +%s) - t0 )) s" | tee "$OUTD/exit.txt"
grep -E "CPM|done in|regime .* \(|rror" "$WORK/run.log" > "$OUTD/summary.txt" || true
tail -80 "$WORK/run.log" > "$OUTD/log.txt"

# what finished: each seed's regimes with a metrics.json, and their report
shopt -s nullglob
seeds=("$RUN"/seed-*)
[ ${#seeds[@]} -eq 0 ] && [ -f "$RUN/run.json" ] && seeds=("$RUN")
for s in "${seeds[@]}"; do
    for m in "$s"/*/metrics.json; do
        d=$OUTD/$(basename "$s")/$(basename "$(dirname "$m")")
        mkdir -p "$d" && cp "$m" "$d/"
    done
done
if [ -f "$RUN/report/report.md" ]; then
    cp "$RUN"/report/report.md "$RUN"/report/report.json "$OUTD/"
    cp "$RUN"/report/*.png "$OUTD/" 2>/dev/null || true
elif [ ${#seeds[@]} -gt 0 ]; then
    # cut by T: report what the seeds finished (run.json is written at the
    # end of a seed, so an unfinished seed is reported from its regimes)
    for s in "${seeds[@]}"; do
        [ -f "$s/run.json" ] || "$PY" - "$s" "$SCENARIO" <<'EOF' || true
import sys
from pathlib import Path
from common.wire import runfolder as RF
run, scenario = Path(sys.argv[1]), sys.argv[2]
done = sorted(p.parent.name for p in run.glob("*/metrics.json"))
if done:
    import yaml
    sc = yaml.safe_load(Path(scenario).read_text())
    sites = [s["name"] for s in sc["sites"]]
    base = [s["name"] for s in sc["sites"] if s.get("role") == "base"]
    RF.write_record(run / RF.RUN_JSON, RF.StudyRun(
        scenario=sc["name"], sites=sites, regimes=done,
        working_spacing_mm=float(sc["working_spacing_mm"]), base_sites=base))
EOF
    done
    timeout 300 "$PY" -m simulation.cli report --out "$WORK/report" "${seeds[@]}" \
        > "$WORK/report.log" 2>&1 && cp "$WORK"/report/report.md "$WORK"/report/report.json "$OUTD/" \
        || tail -20 "$WORK/report.log" >> "$OUTD/log.txt"
fi
ls "$OUTD"
