"""mmattn's micro-benchmark suite (definitions; the CLI is ``python -m mmattn.bench``).

- :mod:`benchmarks.core`: cases, implementations, the runner (timing, memory, errors,
  metrics) and the presets;
- :mod:`benchmarks.report`: Markdown tables, CSV, plots, the README's tables;
- one module per operation family, each holding its sweeps and anchors:
  :mod:`benchmarks.bench_attention` (``cross_attention`` fwd / bwd / fwd+bwd),
  :mod:`benchmarks.bench_block_sparse`, :mod:`benchmarks.bench_ws_linear` and
  :mod:`benchmarks.bench_modules` (``mmattn.nn`` against the modules they replace).

Committed results live in ``benchmarks/results/``.
"""
