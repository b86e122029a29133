"""``python -m mmattn.bench``: the README's main job.

Runs, in order: a quick check of ``cross_attention`` against SDPA at DESIGN's
anchor shape; the conversion demo (``examples/convert_demo.py``); then every
micro-benchmark ``benchmarks/bench_*.py`` of the source checkout (each has
``main(quick)`` and writes its table under ``benchmarks/results/``). Each
benchmark times its anchor in the same run and reports the ratio.

Usage: ``python -m mmattn.bench [--quick] [--only NAME ...] [--list]``
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

import mmattn

REPO = Path(__file__).resolve().parent.parent


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"mmattn_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def suites() -> dict[str, Path]:
    """Name -> script of every suite found in the source checkout."""
    found: dict[str, Path] = {}
    demo = REPO / "examples" / "convert_demo.py"
    if demo.exists():
        found["convert"] = demo
    for path in sorted((REPO / "benchmarks").glob("bench_*.py")):
        found[path.stem.removeprefix("bench_")] = path
    return found


def quick_check() -> None:
    """cross_attention with automatic backend choice vs SDPA, one shape, same run."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from common import time_ms
    finally:
        sys.path.pop(0)
    q = torch.randn(4, 8, 256, 64)
    k = torch.randn(4, 8, 1024, 64)
    v = torch.randn(4, 8, 1024, 64)
    ours = mmattn.cross_attention(q, k, v)
    err = (ours - F.scaled_dot_product_attention(q, k, v)).abs().max().item()
    sdpa_ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v), repeats=5)
    ours_ms = time_ms(lambda: mmattn.cross_attention(q, k, v), repeats=5)
    backend = mmattn.attention.attention_backend(q, k, v)
    print(f"cross_attention B4 H8 Lq256 Lk1024 D64 fp32 on CPU, backend={backend}: "
          f"{ours_ms:.1f} ms vs SDPA {sdpa_ms:.1f} ms (speedup {sdpa_ms / ours_ms:.2f}x), "
          f"max |diff| {err:.2e}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmattn.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--only", nargs="*", default=None, help="suite names to run")
    parser.add_argument("--list", action="store_true", help="list the suites and exit")
    args = parser.parse_args(argv)
    available = suites()
    if args.list:
        print("\n".join(["check", *available]))
        return
    wanted = args.only if args.only is not None else ["check", *available]
    unknown = [n for n in wanted if n != "check" and n not in available]
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; available: check, {', '.join(available)}")
    if not (REPO / "benchmarks").is_dir():
        parser.error("the benchmarks live in the source checkout; run from a clone of mmattn")
    for name in wanted:
        start = time.perf_counter()
        print(f"\n=== {name} ===", flush=True)
        if name == "check":
            quick_check()
        else:
            _load(available[name]).main(quick=args.quick)
        print(f"[{name}: {time.perf_counter() - start:.1f} s]", flush=True)


if __name__ == "__main__":
    main()
