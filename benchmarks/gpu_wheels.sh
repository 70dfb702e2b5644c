#!/usr/bin/env bash
# The cp312 wheels a device call needs beside the device's own torch,
# torchvision and numpy: Flower (the version this checkout runs) and its
# dependencies, pydicom and PyYAML, into .whl/ (ignored by git; carry it:
# `run(carry=[".whl"], ...)`). benchmarks/gpu_study.sh and gpu_mias.sh install
# them with pip --no-index --no-deps when .whl exists.
# Usage (repo root, here, with the registry reachable): bash benchmarks/gpu_wheels.sh
# PKGS overrides the list: gpu_mias.sh needs only `PKGS="pydicom pyyaml"` (1 MB,
# beside the 47 MB of mini-MIAS it carries).
# numpy, torch and uv are left out (the device has the first two; Flower's
# in-process engine does not run uv), which keeps .whl near 37 MB of the
# 64 MiB a call carries.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
FLWR=$("$PY" -c "import flwr; print(flwr.__version__)")
# shellcheck disable=SC2206  # a list of requirement specifiers
PKGS=(${PKGS:-flwr==$FLWR pydicom pyyaml})
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --only-binary=:all: --implementation cp --python-version 312 \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform any \
    -d .whl "${PKGS[@]}"
rm -f .whl/numpy-* .whl/torch-* .whl/uv-*
du -sh .whl
