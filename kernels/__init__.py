"""Triton kernels of mmattn, shipped as ``mmattn.kernels``.

Importing this package does not import Triton; each kernel module does, so a
machine without Triton can still use the rest of mmattn. To run these kernels
on CPU tensors set ``TRITON_INTERPRET=1`` before the first kernel module is
imported.

Modules:
    philox: Philox4x32-10 uniforms, bit-identical to mmattn.philox and csrc/philox.h.
"""
