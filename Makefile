# The two commands a newcomer needs (each creates .venv on first use):
#   make run    - run the default pipeline (embedded glyph dataset)
#   make test   - run the test suite (what CI runs)
# and, while editing: make test-fast - the suite without Snakemake, DVC and SLURM runs (about 2 minutes);
# on a GPU machine: make gpu-check - CUDA tests, CPU agreement, benchmarks, the tiny pipeline on the GPU
VENV ?= .venv
CORES ?= all
export PATH := $(abspath $(VENV))/bin:$(PATH)
# Idle OpenMP threads sleep instead of spinning (see dfml/__init__.py).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: run test test-fast gpu-check venv clean

venv:
	@bash scripts/bootstrap.sh

run: venv
	snakemake --cores $(CORES) --workflow-profile workflow/profiles/local

test: venv
	python -m pytest tests $(PYTEST_ARGS)

test-fast: venv
	python -m pytest tests -m "not slow and not workflow" $(PYTEST_ARGS)

gpu-check: venv
	bash tools/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf results logs benchmarks .snakemake report.html
