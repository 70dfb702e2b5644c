#!/usr/bin/env bash
# The judged path of issue 13, rehearsed: the final recipe (configs/real/mini-mias.yaml)
# trained on the first 92 development women, then import-mias + ingest + evaluate /
# predict on the last 20, which it never saw (stop 45: 4.3 min of training on 2 cores).
# evaluate scores every new woman (the model records its training images, none of
# them are here); on the training cache it refuses, counting the shared images;
# predict reads the imported folder's images.csv (no --spacing-mm).
set -euo pipefail
cd "$(dirname "$0")/../../.."
R=${OUT:-out/rehearsal}
S=${MIAS:-../shared/data/mini-mias}
rm -rf $R/dev $R/new $R/*-site $R/*-cache $R/train $R/ev-* $R/pred
mkdir -p $R/dev/png $R/new/png
ls $S/png | head -n 184 > $R/dev.list   # women 2..93 (mdb003..mdb186)
ls $S/png | tail -n 40 > $R/new.list    # the last 20 women
for part in dev new; do
  while read -r f; do cp "$S/png/$f" "$R/$part/png/"; done < $R/$part.list
  ids=$(sed 's/\.png$//' $R/$part.list | paste -sd'|')
  grep -E "^($ids) " $S/Info.txt > $R/$part/Info.txt
  mammofed-sim import-mias $R/$part $R/$part-site
  mammofed-client ingest $R/$part-site --out $R/$part-cache --site-config configs/sites/mini-mias.yaml > $R/ingest-$part.log 2>&1
done
# TRAIN_SET: more `--set` arguments for train (benchmarks/results/mias_04_specks/rehearsal.sh)
# shellcheck disable=SC2086
time mammofed-sim train --config configs/real/mini-mias.yaml --set "caches=[$PWD/$R/dev-cache]" ${TRAIN_SET:-} --out $R/train > $R/train.log 2>&1
mammofed-client evaluate --checkpoint $R/train/final.pt --cache $R/new-cache --out $R/ev-new 2>&1 | tail -n 4
mammofed-client evaluate --checkpoint $R/train/final.pt --cache $R/dev-cache --out $R/ev-dev 2>&1 | tail -n 2 || true
mammofed-client predict --checkpoint $R/train/final.pt $R/new-site --out $R/pred 2>&1 | tail -n 2
