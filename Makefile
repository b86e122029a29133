# The README's commands. Every target sets up .venv itself (scripts/dev_env.sh).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test lint wheel-check sanitize triton-aot triton-aot-ci triton-gpu-version env emu \
	clean

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

## The Triton of the GPU machines (torch 2.11 cu130 ships it), installed alone into
## .triton36/ and put ahead of .venv's on PYTHONPATH: config lists must compile
## spill-free under both versions (six spilled under 3.6 only).
TRITON_GPU_VERSION ?= 3.6.0
TRITON_GPU_DIR := .triton36

triton-gpu-version: env
	test -f $(TRITON_GPU_DIR)/triton-$(TRITON_GPU_VERSION).dist-info/METADATA || \
		$(PY) -m pip install -q --no-deps --target $(TRITON_GPU_DIR) triton==$(TRITON_GPU_VERSION)

## triton-aot: compile every Triton kernel config for sm_80 and sm_90 (no GPU needed),
## fail on spills / shared memory / missing tensor cores; rewrites
## benchmarks/results/triton_aot.{md,csv} (triton 3.8) and triton_aot_triton36.{md,csv}
## (~30 min on 2 cores)
triton-aot: env triton-gpu-version
	$(PY) scripts/triton_aot_check.py --write
	PYTHONPATH=$(TRITON_GPU_DIR) $(PY) scripts/triton_aot_check.py --write \
		--out benchmarks/results/triton_aot_triton36

## triton-aot-ci: the CI subset of triton-aot under triton 3.8 and 3.6 (~4 min on 2
## cores), prints only
triton-aot-ci: env triton-gpu-version
	$(PY) scripts/triton_aot_check.py --quick
	PYTHONPATH=$(TRITON_GPU_DIR) $(PY) scripts/triton_aot_check.py --quick

## wheel-check: abi3 wheel with sm_80/sm_90 code, installed into a fresh venv
wheel-check: env
	bash scripts/check_wheel.sh

## sanitize: mmattn._C built with ASan+UBSan in .sanitize/, the CPU tests run against it
sanitize: env
	bash scripts/sanitize.sh

clean:
	rm -rf build dist .wheelcheck .sanitize .sanitize.*.log .triton36 *.egg-info mmattn/_C*.so \
		mmattn/_build_info.py
