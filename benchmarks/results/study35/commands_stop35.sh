#!/usr/bin/env bash
# Stop 35: how benchmarks/results/study35/ and the stop-35 lines of
# benchmarks/results/study_confirm/compare_runs.jsonl were made (2 cores).
set -euo pipefail
FLAGS="--federation configs/federation/sim-demo.yaml --base-checkpoint models/demo-base-h.pt --seeds 0,1,2 --threads 1"

# 1. make study on the fixed code, fresh data and output: 44 min
#    (benchmarks/results/study_make/, study_time.jsonl)
make study STUDY_OUT=out/study35 STUDY_DATA=out/study35-data \
    STUDY_REGIMES="base local-only fedavg fedprox personalized personalized-ssl personalized-dp personalized-dp+local personalized-dp+tuned personalized-dp+tuned+local oracle"

# 2. the candidate: the recommended recipe around personalized-ssl (5 min)
mammofed-sim run --scenario configs/simulation/study.yaml $FLAGS --parallel 2 \
    --data out/study35-data --out out/study35-ssl --reuse out/study35 \
    --regime base --regime local-only --regime personalized-ssl \
    --regime personalized-ssl-tuned --regime personalized-ssl+tuned+local --regime oracle

# 3. its confirmation on 40-44 new women per site (5 min; the rest read from
#    stop 33's confirmation runs)
mammofed-sim run --scenario configs/simulation/study-confirm.yaml $FLAGS --parallel 2 \
    --data out/confirm-data --out out/confirm35-ssl --reuse out/confirm-fix --reuse out/confirm-fix2 \
    --regime base --regime local-only --regime personalized-ssl \
    --regime personalized-ssl-tuned --regime personalized-ssl+tuned+local --regime oracle
C="out/confirm35-ssl/seed-0/personalized-ssl+tuned+local out/confirm35-ssl/seed-1/personalized-ssl+tuned+local out/confirm35-ssl/seed-2/personalized-ssl+tuned+local"
for a in base local-only oracle; do
    python -m benchmarks.compare_runs --cases='-01[0-9]{3}$' \
        --a out/confirm35-ssl/seed-{0,1,2}/$a --b $C \
        --label confirm35-sslrecipe-vs-$a --results benchmarks/results/study_confirm
done
python -m benchmarks.compare_runs --cases='-01[0-9]{3}$' \
    --a out/confirm-fix2/seed-{0,1,2}/personalized-dp+tuned+local --b $C \
    --label confirm35-sslrecipe-vs-dp-recipe --results benchmarks/results/study_confirm

# 4. one report with every regime of steps 1 and 2 (nothing trained: 10 min)
mammofed-sim run --scenario configs/simulation/study.yaml $FLAGS --parallel 2 \
    --data out/study35-data --out out/study35-all --reuse out/study35 --reuse out/study35-ssl \
    --regime base --regime local-only --regime fedavg --regime fedprox --regime personalized \
    --regime personalized-ssl --regime personalized-ssl-tuned --regime personalized-ssl+tuned+local \
    --regime personalized-dp --regime personalized-dp+local --regime personalized-dp+tuned \
    --regime personalized-dp+tuned+local --regime oracle --regime personalized-dp-tuned
cp out/study35-all/report/* benchmarks/results/study35/

# 5. the recommended regime as a hospital gets it (site B, seed 0): every CPM
#    the study's (benchmarks/results/hospital_path.jsonl)
python -m benchmarks.hospital_path --study out/study35-ssl --data out/study35-data \
    --site B --seed 0 --regime personalized-ssl --work out/hp35
