"""The ``cuda`` backend: CUDA C++ kernels of ``mmattn._C`` (``csrc/cuda/``) on CUDA tensors.

Only the Philox kernel (``mmattn::philox_uniform``) is built so far: attention and
ws_linear calls are declared unsupported here, and automatic choice moves on to Triton
or the reference. Interface: :mod:`mmattn.backends`.
"""

from __future__ import annotations

from torch import Tensor

from mmattn.backends import AttentionCall

NAME = "cuda"
BACKWARD_EXTRAS: frozenset[str] = frozenset()
# The CUDA kernels have not yet passed the GPU tests on real hardware: until they do,
# automatic choice prefers Triton on CUDA tensors (mmattn.dispatch).
VERIFIED_ON_HARDWARE = False


def attention_unsupported(call: AttentionCall) -> str | None:
    return "no CUDA attention kernel is built into this mmattn"


def ws_linear_unsupported(x: Tensor) -> str | None:
    return "no CUDA ws_linear kernel is built into this mmattn"


def _not_built(*_args, **_kwargs):
    raise NotImplementedError("mmattn's CUDA attention and ws_linear kernels are not built yet")


attention_forward = attention_backward = ws_linear_forward = ws_linear_backward = _not_built
