"""DESIGN's tolerance rule, in one place for every test file.

A backend's error against the float64 oracle may be at most twice the error of
the same-dtype PyTorch reference, plus a small absolute slack for the dtype.
"""

from __future__ import annotations

import math

import torch

ATOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FACTOR = 2.0


def max_error(actual: torch.Tensor, oracle: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return (actual.double() - oracle.double()).abs().max().item()


def assert_within_rule(actual: torch.Tensor, same_dtype_reference: torch.Tensor,
                       oracle64: torch.Tensor, *, factor: float = FACTOR,
                       name: str = "") -> None:
    """Assert ``|actual - oracle| <= factor * |reference - oracle| + atol(dtype)``."""
    assert actual.shape == oracle64.shape, f"{name}: shape {actual.shape} != {oracle64.shape}"
    assert not torch.isnan(actual).any(), f"{name}: NaN in result"
    ours = max_error(actual, oracle64)
    theirs = max_error(same_dtype_reference, oracle64)
    bound = factor * theirs + ATOL[actual.dtype]
    assert ours <= bound, (f"{name}: error {ours:.3e} against float64 exceeds {factor} x "
                           f"reference error {theirs:.3e} + atol {ATOL[actual.dtype]:.1e}")


def rule_terms(actual: torch.Tensor, same_dtype_reference: torch.Tensor,
               oracle64: torch.Tensor, *, factor: float = FACTOR) -> tuple[float, float, float]:
    """``(ours, theirs, bound)`` of the rule, for results that may hold infinities (an lse
    of a row with no visible key): those must sit exactly where the oracle's are (else
    ``ours`` is inf), and the errors are measured on the finite entries. A NaN in
    ``actual`` makes ``ours`` NaN (never within the bound); a same-dtype reference that
    overflowed where the oracle is finite sets no bound (``theirs`` inf)."""
    if actual.shape != oracle64.shape:
        return math.inf, 0.0, 0.0
    a, r, o = actual.double(), same_dtype_reference.double(), oracle64.double()
    if torch.isnan(a).any():
        return math.nan, 0.0, 0.0
    finite = torch.isfinite(o)
    if not bool(finite.all()):
        if not torch.equal(a[~finite], o[~finite]):
            return math.inf, 0.0, 0.0
        a, r, o = a[finite], r[finite], o[finite]
    ours = max_error(a, o)
    theirs = max_error(r, o) if bool(torch.isfinite(r).all()) else math.inf
    return ours, theirs, factor * theirs + ATOL[actual.dtype]
