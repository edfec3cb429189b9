#!/usr/bin/env bash
# One command for the GPU figures of benchmarks/RESULTS.md (see gpu_check.py):
#   bash benchmarks/gpu_check.sh               # one GPU, ~100M parameters, bf16, < 8 min
#   bash benchmarks/gpu_check.sh --cpu --tiny  # the same path on CPU (the test suite runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_check.py "$@"
