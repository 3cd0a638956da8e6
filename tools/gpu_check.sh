#!/usr/bin/env bash
# The GPU check in one command (docs/performance.md "GPU check"): CUDA tests, float32 agreement with the CPU, the
# training-engine and evaluation benchmarks, and the tiny pipeline through Snakemake on the GPU beside the CPU.
# Under 8 minutes on one H200; every figure lands in results/gpu_check/summary.md (and summary.json).
#   bash tools/gpu_check.sh                # on a GPU machine, from the repository root
#   bash tools/gpu_check.sh --device cpu --smoke   # the same steps at toy sizes on a CPU (a test of the script)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec "$PYTHON" tools/gpu_check.py "$@"
