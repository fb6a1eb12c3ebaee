# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
# Both create the local virtual environment (.venv) when it is missing.

PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU build of torch from the machine's local wheel store; an unpinned torch would pull a CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo test test-fast bench gpu-suite lint clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

# Fixed work (1573 steps, seed 0: docs/demo.md). A short run resumes with
#   make demo ARGS="--out demo_out --resume"
demo: $(STAMP)
	$(BIN)/dream-fast demo $(ARGS)

# Default test run (~6 min on 2 cores): unit, distributed and slow tests, then the Triton kernels
# under the CPU interpreter (TRITON_INTERPRET must be set before the kernel modules are imported,
# hence its own process). GPU tests skip with a reason without CUDA.
test: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/pytest -m "not interpreter" --durations=15 $(PYTEST_ARGS)
	TRITON_INTERPRET=1 OMP_NUM_THREADS=2 $(BIN)/pytest -m interpreter $(PYTEST_ARGS)

# Quick loop while developing: skips the multi-process launcher/parity/resume tests.
test-fast: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/pytest -m "not interpreter and not slow and not gpu" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_cpu

# On a CUDA machine, from a bare checkout with the system's python3 (torch + triton; no venv, no
# install: docs/gpu.md): every kernel vs its reference (bf16/fp16/fp32), ceilings, train step,
# sampler, kernel and attention benchmarks; CSV, checks, summary and log in OUT; a short table last.
GPU_OUT ?= benchmarks/results/gpu_$(shell date -u +%Y%m%d-%H%M)
OUT ?= $(GPU_OUT)
BUDGET_S ?= 480
gpu-suite:
	PYTHONPATH=. python3 -m benchmarks.gpu_suite --out $(OUT) --budget-s $(BUDGET_S) $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check dream_fast kernels benchmarks tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
