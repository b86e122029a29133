# The README's commands. Every target sets up .venv itself (scripts/dev_env.sh).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test lint wheel-check triton-aot triton-aot-ci env clean

env:
	bash scripts/dev_env.sh

## run: the main job — the conversion demo and the CPU micro-benchmarks
run: env
	$(PY) -m mmattn.bench $(ARGS)

## test: the full test suite (Triton under TRITON_INTERPRET=1 when no GPU) and ruff
test: env
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

clean:
	rm -rf build dist .wheelcheck *.egg-info mmattn/_C*.so mmattn/_build_info.py
