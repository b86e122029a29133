# The README's commands. Every target sets up .venv itself (scripts/dev_env.sh).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test lint wheel-check sanitize triton-aot triton-aot-ci env emu clean

env:
	bash scripts/dev_env.sh

## run: the main job — the conversion demo, then the micro-benchmarks (--quick unless
## ARGS says otherwise: ARGS="--suite default" rewrites benchmarks/results/)
ARGS ?= --quick
run: env
	$(PY) -m mmattn.bench $(ARGS)

## emu: mmattn._C_emu, the CUDA kernels built for the CPU SIMT emulator (tests only)
emu: env
	MMATTN_CUDA_EMULATION=1 $(PY) scripts/build_cuda_emu.py

## test: the full test suite (Triton under TRITON_INTERPRET=1, CUDA C++ kernels under
## the SIMT emulator when no GPU) and ruff
test: env emu
	$(PY) -m ruff check .
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

## triton-aot: compile every Triton kernel config for sm_80 and sm_90 (no GPU needed),
## fail on spills / shared memory / missing tensor cores; rewrites
## benchmarks/results/triton_aot.{md,csv} (~30 min on 2 cores)
triton-aot: env
	$(PY) scripts/triton_aot_check.py --write

## triton-aot-ci: the CI subset of triton-aot (~3 min on 2 cores), prints only
triton-aot-ci: env
	$(PY) scripts/triton_aot_check.py --quick

## wheel-check: abi3 wheel with sm_80/sm_90 code, installed into a fresh venv
wheel-check: env
	bash scripts/check_wheel.sh

## sanitize: mmattn._C built with ASan+UBSan in .sanitize/, the CPU tests run against it
sanitize: env
	bash scripts/sanitize.sh

clean:
	rm -rf build dist .wheelcheck .sanitize .sanitize.*.log *.egg-info mmattn/_C*.so \
		mmattn/_build_info.py
