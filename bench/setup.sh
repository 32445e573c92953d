#!/usr/bin/env bash
# A virtualenv with PyTorch for the benchmark's competitor side, and a release build of nuwa.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-bench
.venv-bench/bin/pip install --quiet --upgrade pip
.venv-bench/bin/pip install --quiet torch numpy
# llama.cpp for bench/llamacpp_compare.py: llama-cpp-python compiles llama.cpp from PyPI's source
# (a few minutes), with this CPU's own instruction set; its converter needs transformers and
# sentencepiece.
CMAKE_ARGS="-DGGML_NATIVE=ON" .venv-bench/bin/pip install --quiet llama-cpp-python transformers sentencepiece
cargo build --release
echo "ready: .venv-bench/bin/python bench/compare.py (and bench/llamacpp_compare.py, bench/nanogpt_compare.py)"
