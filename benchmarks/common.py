"""A plain wall-clock timer for the examples (``examples/*.py`` print a ratio with it).

The benchmark suite itself times with ``torch.utils.benchmark`` / ``triton.testing``
(:mod:`benchmarks.core`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_ms(fn: Callable[[], object], *, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA-synchronised when relevant)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)
