#!/usr/bin/env bash
# Build the abi3 wheel (CUDA warnings are errors), check its CUDA code (sm_80 and
# sm_90 SASS) with cuobjdump, print every kernel's registers, stack and shared memory
# and fail when one spills on sm_90, install the wheel into a fresh venv that has
# torch, and check the ops register on CPU and CUDA. Needs the dev venv
# (scripts/dev_env.sh) for the build itself.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
WORK="$(pwd)/.wheelcheck"
rm -rf "$WORK" && mkdir -p "$WORK/dist"

MMATTN_CUDA_WERROR=1 "$VENV/bin/python" -m pip wheel -q --no-build-isolation --no-deps \
  -w "$WORK/dist" .
WHEEL=$(ls "$WORK"/dist/mmattn-*.whl)
echo "built: $(basename "$WHEEL")"
case "$(basename "$WHEEL")" in
  *-cp310-abi3-*) ;;
  *) echo "FAIL: wheel is not tagged cp310-abi3"; exit 1 ;;
esac

"$VENV/bin/python" - "$WHEEL" "$WORK/so" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    names = [n for n in z.namelist() if n.endswith(".so")]
    assert names == ["mmattn/_C.abi3.so"], names
    assert "mmattn/kernels/philox.py" in z.namelist(), "mmattn.kernels missing from wheel"
    z.extract(names[0], sys.argv[2])
PY
SO="$WORK/so/mmattn/_C.abi3.so"

if command -v nvcc >/dev/null 2>&1 && [ "${MMATTN_CUDA:-auto}" != "0" ]; then
  case "$(basename "$WHEEL")" in
    *+cu*) ;;
    *) echo "FAIL: CUDA compiled but the wheel has no +cuXX local version"; exit 1 ;;
  esac
  # cuobjdump: on PATH, else the one triton's wheel carries, else from pip.
  CUOBJDUMP=$(command -v cuobjdump || find "$VENV" -type f -name cuobjdump | head -n 1)
  if [ -z "$CUOBJDUMP" ]; then
    "$VENV/bin/python" -m pip install -q nvidia-cuda-cuobjdump
    CUOBJDUMP=$(find "$VENV" -type f -name cuobjdump | head -n 1)
  fi
  ELF=$("$CUOBJDUMP" --list-elf "$SO")
  echo "$ELF"
  for arch in sm_80 sm_90; do
    echo "$ELF" | grep -q "$arch" || { echo "FAIL: no $arch code in $SO"; exit 1; }
  done
  # Captured first: `grep -q` would close the pipe early and, under pipefail, fail it.
  PTX=$("$CUOBJDUMP" --list-ptx "$SO")
  echo "$PTX" | grep -Eq "(sm|compute)_90\.ptx" || { echo "FAIL: no compute_90 PTX"; exit 1; }
  if ldd "$SO" | grep -q libcudart; then echo "FAIL: cudart is linked dynamically"; exit 1; fi
  echo "CUDA kernels in $(basename "$SO") (cuobjdump --dump-resource-usage):"
  "$VENV/bin/python" scripts/cuda_resources.py --cuobjdump "$CUOBJDUMP" --fail-on-spill sm_90 "$SO"
  EXPECT_CUDA=1
else
  EXPECT_CUDA=0
fi

python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q torch==2.13.0
"$WORK/venv/bin/python" -m pip install -q --no-deps "$WHEEL"
(cd "$WORK" && EXPECT_CUDA=$EXPECT_CUDA "$WORK/venv/bin/python" - <<'PY'
import os, torch, mmattn, mmattn.kernels
from mmattn._extension import extension_loaded, has_kernel
assert extension_loaded(), "mmattn._C did not load from the wheel"
assert "/.wheelcheck/venv/" in mmattn.__file__, mmattn.__file__
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("mmattn::"))
print("ops:", ", ".join(ops))
assert has_kernel("philox_uniform", "CPU")
if os.environ["EXPECT_CUDA"] == "1":
    for op in ("philox_uniform", "cuda_attention_fwd", "cuda_attention_bwd", "cuda_ws_spmm",
               "cuda_ws_spmm_backward"):
        assert has_kernel(op, "CUDA"), f"CUDA kernel {op} not registered"
q = torch.randn(1, 2, 3, 4)
print("cross_attention from the wheel:", tuple(mmattn.cross_attention(q, q, q).shape))
PY
)
echo "wheel check passed: $(basename "$WHEEL")"
