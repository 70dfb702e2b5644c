#!/usr/bin/env bash
# The study's main question at GPU scale, in one device call. CI never has a
# GPU: the same path runs on CPU at test size in tests/benchmarks/test_gpu_study.py.
#
# MODE=recommended (default): the study scenario (configs/simulation/study.yaml,
#   60 test women per non-H site) with the GPU federation
#   (configs/federation/sim-gpu.yaml: ResNet-18 FCOS, 40 rounds), three seeds
#   side by side: base, local-only, the recommended regime
#   (personalized-ssl+tuned+local-unless-fewshot, simulation.regimes.RECOMMENDED) with its
#   members, and the oracle: the issue's main test (the recommended regime
#   against the base and local-only, and its share of the oracle). Regimes
#   run in the report's order (simulation.regimes.ORDER, the oracle last); a
#   report over what finished (paired intervals over women and seeds) is
#   written even when T cuts the run. REGIMES="... personalized
#   personalized-all-labels" adds the labels' gap of semi-supervision.
# MODE=shift: the earlier vendor-shift study (base, local-only and oracle of
#   the demo scenario, one seed; about 150 s on an H100 after a 20 s set-up).
#
# The device's image lacks Flower and pydicom (and may hold other versions of
# their dependencies): carry `.whl`, the cp312 wheels of Flower, pydicom and
# PyYAML and their dependencies, made here by `bash benchmarks/gpu_wheels.sh`
# (37 MB of the 64 MiB a call carries); they go first on PYTHONPATH.
#
# Usage (repo root): OUT=dir T=seconds [W=workers] [MODE=...] bash benchmarks/gpu_study.sh
#   T: seconds the study may run (default 330: with the set-up, the cut and
#   a report of what finished (up to 180 s; three seeds' report took 131 s
#   on the 2-core CPU) it stays inside one 10-minute call). Writes to OUT
#   (the device returns at most eight files): summary.txt (exit, timings, the
#   CPM lines), report.md, results.tar (every seed's metrics.json, the
#   report's JSON and PNGs, the run log) and detections-seed-<s>.tar.gz
#   (every regime's detections.json of a seed, left out and named in
#   summary.txt when over DET_LIMIT_MIB, default 15). Overrides for other sizes and for
#   the CPU test: SCENARIO, FED, SEEDS (comma-separated), REGIMES
#   (space-separated), PARALLEL (seeds at once), N_BOOT, EXTRA (more
#   mammofed-sim run flags), PYTHON, WHEELS (empty: install none). Work folders go under WORK (default
#   /tmp/gpustudy; the phantom data there is reused, the run is not).
set -euo pipefail
PY=${PYTHON:-python3}
WHEELS=${WHEELS-.whl}  # WHEELS= (empty): use this Python's own packages
if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
fi
export PYTHONUNBUFFERED=1
OUTD=${OUT:-/tmp/gpuout}
WORK=${WORK:-/tmp/gpustudy}
mkdir -p "$OUTD" "$WORK"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    | tee "$WORK/device.txt"

MODE=${MODE:-recommended}
case "$MODE" in
recommended)
    SCENARIO=${SCENARIO:-configs/simulation/study.yaml}
    FED=${FED:-configs/federation/sim-gpu.yaml}
    SEEDS=${SEEDS:-0,1,2}
    REGIMES=${REGIMES:-base local-only personalized-ssl personalized-ssl-tuned personalized-ssl+tuned+local personalized-ssl+tuned+local-unless-fewshot oracle}
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
rm -rf "$RUN" "$WORK/report"  # a warm machine's last run is not this one's
FLAGS=(--scenario "$SCENARIO" --federation "$FED" --out "$RUN" --data "$WORK/data"
       --seeds "$SEEDS" --parallel "$PARALLEL" --workers "${W:-16}" --n-boot "${N_BOOT:-500}")
for r in $REGIMES; do FLAGS+=(--regime "$r"); done
# shellcheck disable=SC2206  # EXTRA is flags, split on purpose
FLAGS+=(${EXTRA:-})
echo "mammofed-sim run ${FLAGS[*]} (limit ${T:-330} s)" > "$WORK/command.txt"
t0=$(date +%s)
rc=0
# timeout signals the whole process group: the seeds' worker processes too
timeout --kill-after=15 "${T:-330}" "$PY" -m simulation.cli run "${FLAGS[@]}" \
    > "$WORK/run.log" 2>&1 || rc=$?
{
    cat "$WORK/device.txt" "$WORK/command.txt"
    echo "run exit $rc after $(( $(date +%s) - t0 )) s"
    grep -E "CPM|done in|rror" "$WORK/run.log" || true
} > "$OUTD/summary.txt"

# what finished: the seeds with at least one scored regime, and their report
# (run.json lists every regime a seed planned; the report reads the regimes
# from their metrics.json, so a seed cut by T reports what it finished)
shopt -s nullglob
seeds=()
for s in "$RUN"/seed-*; do
    scored=("$s"/*/metrics.json)
    [ ${#scored[@]} -gt 0 ] && seeds+=("$s")
done
REPORT=$RUN/report
if [ ! -f "$REPORT/report.md" ] && [ ${#seeds[@]} -gt 0 ]; then
    REPORT=$WORK/report
    timeout 180 "$PY" -m simulation.cli report --out "$REPORT" "${seeds[@]}" \
        > "$WORK/report.log" 2>&1 || echo "report of the finished regimes failed: $(tail -3 "$WORK/report.log")" >> "$OUTD/summary.txt"
fi
[ -f "$REPORT/report.md" ] && cp "$REPORT/report.md" "$OUTD/"
files=("$WORK/device.txt" "$WORK/command.txt" "$WORK/run.log")
for s in "${seeds[@]}"; do files+=("$s"/*/metrics.json "$s"/run.json); done
files+=("$REPORT"/report.json "$REPORT"/*.png "$WORK"/report.log)
# paths inside the archive relative to WORK (run/seed-0/base/metrics.json ...)
tar -cf "$OUTD/results.tar" -C "$WORK" --ignore-failed-read "${files[@]#"$WORK"/}" \
    2>/dev/null || true
# every regime's detections.json, one archive a seed: what a paired
# comparison beyond the report's own pairs needs (benchmarks.compare_runs).
# The device returns files of at most 16 MiB; a bigger archive is left out,
# named in summary.txt (about 10 MB a seed expected for the study's women)
LIMIT=$(( ${DET_LIMIT_MIB:-15} * 1024 * 1024 ))
rm -f "$OUTD"/detections-seed-*.tar.gz
for s in "${seeds[@]}"; do
    name=detections-$(basename "$s").tar.gz
    dets=("$s"/*/detections.json)
    [ ${#dets[@]} -gt 0 ] || continue
    tar -czf "$OUTD/$name" -C "$WORK" "${dets[@]#"$WORK"/}"
    size=$(stat -c %s "$OUTD/$name")
    if [ "$size" -gt "$LIMIT" ]; then
        rm -f "$OUTD/$name"
        echo "$name left out: $size bytes, over the $LIMIT a returned file may hold" \
            >> "$OUTD/summary.txt"
    fi
done
echo "seeds reported: ${#seeds[@]}" >> "$OUTD/summary.txt"
ls "$OUTD"
