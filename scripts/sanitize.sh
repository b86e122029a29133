#!/usr/bin/env bash
# `make sanitize`: build mmattn._C with AddressSanitizer + UndefinedBehaviorSanitizer
# (MMATTN_SANITIZE=1, host C++ only, no CUDA) into .sanitize/lib -- the editable dev
# install is untouched -- and run the CPU tests against it. The interpreter is not
# instrumented, so libasan is preloaded. Fails on any sanitizer report.
#
# Environment: SANITIZE_TESTS (pytest arguments; default: the CPU kernel tests),
# SANITIZE_DIR (default .sanitize), VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
OUT=${SANITIZE_DIR:-.sanitize}
PY="$VENV/bin/python"
"$PY" -c "import torch" 2>/dev/null || bash scripts/dev_env.sh

echo "== building mmattn._C with -fsanitize=address,undefined into $OUT/lib"
# incremental: build_ext relinks only when a source is newer than the built .so
MMATTN_SANITIZE=1 MMATTN_CUDA=0 "$PY" setup.py -q build_py --build-lib "$OUT/lib" \
  build_ext --build-lib "$OUT/lib" --build-temp "$OUT/tmp" > "$OUT.build.log" 2>&1 \
  || { tail -40 "$OUT.build.log"; exit 1; }

# libstdc++ preloaded with libasan: the interpreter does not link it, and ASan must find
# the real __cxa_throw when it starts (else "CHECK failed ... real___cxa_throw" on the
# first C++ exception).
ASAN_LIB="$(${CXX:-g++} -print-file-name=libasan.so) $(${CXX:-g++} -print-file-name=libstdc++.so.6)"
# detect_leaks=0: CPython and torch keep allocations alive until exit by design.
# Reports also go to files: pytest captures fd 2, and a sanitizer ends the process.
REPORTS="$PWD/$OUT/reports"
rm -rf "$REPORTS" && mkdir -p "$REPORTS"
export ASAN_OPTIONS="detect_leaks=0:print_summary=1:log_path=$REPORTS/asan:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$REPORTS/ubsan:${UBSAN_OPTIONS:-}"
export MMATTN_SKIP_INDUCTOR=1     # inductor's own C++ is not ours to sanitize (and slow)
export MMATTN_FUZZ_EXAMPLES=${MMATTN_FUZZ_EXAMPLES:-40}
TESTS=${SANITIZE_TESTS:-"tests/test_attention_cpu.py tests/test_ws_linear_cpu.py
  tests/test_ws_modules.py tests/test_block_mask.py tests/test_philox.py
  tests/test_backends.py tests/test_layout.py tests/test_fuzz.py
  tests/test_determinism_threads.py tests/test_large_index.py"}
LOG="$OUT.test.log"
# The tests must run the instrumented kernels, not the dev build or the reference.
env LD_PRELOAD="$ASAN_LIB" PYTHONPATH="$OUT/lib" "$PY" -P -c "
import sys, mmattn
from mmattn import _extension
assert mmattn.__file__.startswith('$PWD/$OUT/lib'), mmattn.__file__
assert _extension.extension_loaded(), _extension.extension_error()
print('== mmattn._C (sanitized) from', _extension.__file__.rsplit('/', 1)[0])"
echo "== CPU tests under ASan+UBSan (log: $LOG)"
# pytest as a script, not `python -m`: the working directory must not shadow .sanitize/lib
set +e
env LD_PRELOAD="$ASAN_LIB" PYTHONPATH="$OUT/lib" "$VENV/bin/pytest" -q -p no:cacheprovider --capture=sys \
  $TESTS -k "not compile" 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
set -e
if [ -n "$(ls -A "$REPORTS")" ] || grep -qE "ERROR: AddressSanitizer|runtime error:" "$LOG"
then
  echo "== sanitizer reports found:"; head -60 "$REPORTS"/* 2>/dev/null; exit 1
fi
echo "== no sanitizer report; pytest exit status $status"
exit "$status"
