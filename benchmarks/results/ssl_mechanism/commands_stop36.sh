#!/usr/bin/env bash
# Stop 36: what semi-supervision's gain on the partly labeled site comes from
# (docs/adaptation.md, "What the unlabeled images give"). 2 cores; the study's
# data and runs of stop 35 (benchmarks/results/study35/commands_stop35.sh:
# out/study35, out/study35-ssl, out/study35-data), stop 34's study
# (out/study34: personalized-all-labels; benchmarks/results/study_fix/) and the
# confirmation runs of stops 33-34 (out/confirm-fix, out/confirm-data). The
# runs were made in two checkouts (/tmp/cf/main and /work/main), so the
# result lines name absolute paths for some of them; the folders are these.
set -euo pipefail
# The runs were made with copies of configs/federation/sim-demo.yaml that
# changed one option each (sim-demo-ssl-bn.yaml, sim-demo-ssl-ratio4.yaml);
# since stop 37 `--set` changes the option instead (the resolved settings are
# the same but for the config's `name`, which no result depends on).
FLAGS="--base-checkpoint models/demo-base-h.pt --seeds 0,1,2 --parallel 2 --threads 1"
R=benchmarks/results

# 1. personalized-ssl with the consistency loss's weight at 0 (9 min a set).
#    These two runs were made at commit 3ad479d, when a site still counted
#    the unlabeled images in its averaging weight with the loss off; since
#    then it does not (step 4 is the same run with the rule).
mammofed-sim run --scenario configs/simulation/study.yaml $FLAGS \
    --federation configs/federation/sim-demo.yaml --set trainer.options.ssl_unsup_weight=0 \
    --data out/study35-data --out out/ssl-bn --regime personalized-ssl
mammofed-sim run --scenario configs/simulation/study-confirm.yaml $FLAGS \
    --federation configs/federation/sim-demo.yaml --set trainer.options.ssl_unsup_weight=0 \
    --data out/confirm-data --out out/confirm-ssl-bn --regime personalized-ssl
for a in personalized-ssl personalized; do
    python -m benchmarks.compare_runs --a out/study35/seed-{0,1,2}/$a \
        --b out/ssl-bn/seed-{0,1,2}/personalized-ssl --label stop36-ssl-bn-vs-$a --results $R
done
for a in personalized-ssl personalized personalized-all-labels; do
    python -m benchmarks.compare_runs --cases='-01[0-9]{3}$' --a out/confirm-fix/seed-{0,1,2}/$a \
        --b out/confirm-ssl-bn/seed-{0,1,2}/personalized-ssl \
        --label stop36-confirm-ssl-bn-vs-$a --results $R
done

# 2. how right the federated model's pseudo boxes are on the unlabeled women
#    (40 s)
python -m benchmarks.pseudo_precision --study out/study35-ssl --data out/study35-data \
    --regime personalized-ssl --site C --site D --threads 2 --results $R

# 3. four unlabeled batches per labeled one (ssl_unlabeled_ratio 4)
mammofed-sim run --scenario configs/simulation/study.yaml $FLAGS \
    --federation configs/federation/sim-demo.yaml --set trainer.options.ssl_unlabeled_ratio=4 \
    --data out/study35-data --out out/ssl-r4 --regime personalized-ssl
for a in personalized-ssl personalized; do
    python -m benchmarks.compare_runs --a out/study35/seed-{0,1,2}/$a \
        --b out/ssl-r4/seed-{0,1,2}/personalized-ssl --label stop36-ssl-ratio4-vs-$a --results $R
done
python -m benchmarks.compare_runs --a out/ssl-r4/seed-{0,1,2}/personalized-ssl \
    --b out/study34/seed-{0,1,2}/personalized-all-labels --label stop36-ssl-ratio4-gap --results $R

# 4. weight 0 with the averaging weight from the labeled images only (the
#    rule since 3ad479d; 9 min)
mammofed-sim run --scenario configs/simulation/study.yaml $FLAGS \
    --federation configs/federation/sim-demo.yaml --set trainer.options.ssl_unsup_weight=0 \
    --data out/study35-data --out out/ssl-bn2 --regime personalized-ssl
for a in personalized-ssl personalized; do
    python -m benchmarks.compare_runs --a out/study35/seed-{0,1,2}/$a \
        --b out/ssl-bn2/seed-{0,1,2}/personalized-ssl \
        --label stop36-ssl-bn-labeled-weight-vs-$a --results $R
done
python -m benchmarks.compare_runs --a out/ssl-bn/seed-{0,1,2}/personalized-ssl \
    --b out/ssl-bn2/seed-{0,1,2}/personalized-ssl \
    --label stop36-ssl-bn-labeled-weight-vs-ssl-bn --results $R

# 5. the norm statistics alone, in central training: the site's own model and
#    the recommended recipe's tuned member with the unlabeled images run
#    through them, loss weight 0 (the -unlab regimes; 20 min, one seed at a
#    time beside other work)
mammofed-sim run --scenario configs/simulation/study.yaml \
    --federation configs/federation/sim-demo.yaml --base-checkpoint models/demo-base-h.pt \
    --seeds 0,1,2 --parallel 1 --threads 1 --data out/study35-data --out out/unlab \
    --reuse out/study35-ssl --regime base --regime local-only --regime personalized-ssl \
    --regime personalized-ssl-tuned --regime personalized-ssl+tuned+local \
    --regime local-only-unlab --regime personalized-ssl-tuned-unlab \
    --regime personalized-ssl+tuned+local-unlab --regime oracle
for p in "local-only local-only-unlab" "personalized-ssl-tuned personalized-ssl-tuned-unlab" \
         "personalized-ssl+tuned+local personalized-ssl+tuned+local-unlab"; do
    set -- $p
    python -m benchmarks.compare_runs --a out/unlab/seed-{0,1,2}/$1 \
        --b out/unlab/seed-{0,1,2}/$2 --label stop36-$2-vs-$1 --results $R
done
