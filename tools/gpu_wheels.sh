#!/usr/bin/env bash
# Fills .whl/ with every wheel the offline GPU machine lacks: DeepSpeed and its pure-Python needs
# (../shared/gpu/prepare-wheels.sh), liger-kernel (--kernels liger) and blake3 (checkpoint
# digests), the latter for the machine's Python 3.12. Run once from the project root, with torch
# installed; then carry [".whl"] and begin each device command with ../shared/gpu/README.md's line.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
bash ../shared/gpu/prepare-wheels.sh
python3 -m pip download -q --no-deps -d .whl liger-kernel==0.8.5
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl "blake3>=1.0"
ls -1 .whl
