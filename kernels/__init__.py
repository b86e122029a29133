"""Triton kernels of mmattn, shipped as ``mmattn.kernels``.

Importing this package does not import Triton; each kernel module does, so a
machine without Triton can still use the rest of mmattn. To run these kernels
on CPU tensors set ``TRITON_INTERPRET=1`` before the first kernel module is
imported.

Modules:
    philox: Philox4x32-10 uniforms, bit-identical to mmattn.philox and csrc/philox.h.
    attention: fused attention (FlashAttention-2 style) forward, weights pass, backward.
    ws_linear: Watts-Strogatz sparse linear: CSR SpMM, transposed SpMM, SDDMM.

Dispatch and validation live in mmattn/backends/triton.py; the ahead-of-time compile
check of every kernel config for sm_80 / sm_90 is scripts/triton_aot_check.py.
"""
