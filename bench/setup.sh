#!/usr/bin/env bash
# A virtualenv with PyTorch for the benchmark's competitor side, and a release build of nuwa.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-bench
.venv-bench/bin/pip install --quiet --upgrade pip
.venv-bench/bin/pip install --quiet torch numpy
cargo build --release
echo "ready: .venv-bench/bin/python bench/compare.py"
