"""``python -m mmattn.bench``: mmattn's micro-benchmarks, anchors timed in the same run.

Runs the conversion demo (``examples/convert_demo.py``) first, then the benchmark suite
defined in ``benchmarks/`` of the source checkout: ``cross_attention`` (fwd, bwd,
fwd+bwd), block-sparse attention, ``ws_linear`` (fwd, fwd+bwd) and the ``mmattn.nn``
modules, on every mmattn backend the device runs, beside SDPA (each of its backends),
naive attention, compiled FlexAttention, ``torch.sparse``, dense masked ``F.linear``, the
modules mmattn replaces, and flash-attn / xformers when installed.

Suites: ``--quick`` (the headline shapes, under 2 minutes on a 2-core CPU, prints only),
``--suite default`` and ``--suite full`` (every sweep; they rewrite
``benchmarks/results/``: Markdown, CSV, PNG plots, and the README's tables), ``--suite
smoke`` (tiny shapes, for tests).

Examples::

    python -m mmattn.bench --quick
    python -m mmattn.bench --quick --list
    python -m mmattn.bench --suite default
    python -m mmattn.bench --suite default --op block_sparse --backend cpu --dtype bfloat16
    python -m mmattn.bench --suite full --device cuda --op cross_attention.fwd --sweep Lk
    python -m mmattn.bench --suite smoke --op ws_linear --out /tmp/mmattn-results
    python -m mmattn.bench --render      # Markdown, plots, README tables from the CSVs
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parent.parent


def _benchmarks() -> tuple[ModuleType, ModuleType]:
    """``benchmarks.core`` and ``benchmarks.report`` of the source checkout."""
    if not (REPO / "benchmarks" / "core.py").exists():
        raise SystemExit("python -m mmattn.bench: the benchmarks live in the source checkout "
                         "(benchmarks/); run it from a clone of mmattn")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module("benchmarks.core"), importlib.import_module("benchmarks.report")


def _parser(core: ModuleType) -> argparse.ArgumentParser:
    ops = ["convert", *core.FAMILIES]
    for family in core.FAMILIES:
        ops += list(core.family_module(family).OPS)
    parser = argparse.ArgumentParser(prog="python -m mmattn.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    presets = core.PRESETS
    parser.add_argument("--suite", choices=list(presets),
                        help="; ".join(f"{p.name}: {p.description}" for p in presets.values()) +
                        " (default: default)")
    parser.add_argument("--quick", action="store_true", help="same as --suite quick")
    parser.add_argument("--list", action="store_true",
                        help="list the selected cases and exit without running them")
    parser.add_argument("--op", nargs="+", choices=ops, metavar="OP",
                        help=f"operations: a family, one op, or convert (the conversion demo); "
                             f"choices: {', '.join(ops)} (default: all)")
    parser.add_argument("--sweep", nargs="+", metavar="SWEEP",
                        help="only these sweeps (e.g. Lk Lq head_dim gqa batch dtype density "
                             "block pattern n beta modules)")
    parser.add_argument("--backend", nargs="+", choices=core.BACKENDS,
                        help="mmattn backends to run (default: all; one that cannot run a "
                             "case is reported as skipped, with the reason)")
    parser.add_argument("--anchor", nargs="*", metavar="NAME",
                        help="only anchors whose name contains one of these (case-insensitive, "
                             "e.g. SDPA flex sparse); --anchor alone: none")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", nargs="+", choices=list(core.DTYPES),
                        help="run every case in the first; the dtype sweeps use all given")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    parser.add_argument("--render", action="store_true",
                        help="run nothing: rewrite the Markdown, plots and headline (and the "
                             "README's tables for benchmarks/results/) from the CSVs in --out")
    parser.add_argument("--out", type=Path,
                        help="write results there (default: benchmarks/results/ for the "
                             "default and full suites, nowhere for quick and smoke)")
    return parser


def _update_readme(core: ModuleType, report: ModuleType, out: Path, device: str) -> None:
    """The README's tables follow the committed results only (not other --out folders)."""
    if out.resolve() == core.RESULTS_DIR.resolve():
        sections = report.update_readme(out, device)
        if sections:
            print(f"README.md: regenerated {', '.join(sections)} table(s) for {device}")


def main(argv: list[str] | None = None) -> int:
    core, report = _benchmarks()
    parser = _parser(core)
    args = parser.parse_args(argv)
    if args.quick and args.suite not in (None, "quick"):
        parser.error(f"--quick contradicts --suite {args.suite}")
    suite = "quick" if args.quick else (args.suite or "default")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    preset = core.PRESETS[suite]
    selection = core.Selection(
        preset=preset, device=device, ops=tuple(args.op) if args.op else None,
        sweeps=tuple(args.sweep) if args.sweep else None,
        backends=tuple(args.backend) if args.backend else core.BACKENDS,
        anchors=None if args.anchor is None else tuple(args.anchor),
        dtypes=tuple(args.dtype) if args.dtype else None, threads=args.threads,
        memory=not args.no_memory)
    demo = args.op is None or "convert" in args.op
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = core.collect_cases(selection)

    if args.render:
        out = args.out or core.RESULTS_DIR
        rows = report.read_results(out, device)
        if not rows:
            parser.error(f"--render: no *_{device}.csv in {out}")
        for path in report.write_results(rows, out, device, csv_too=False):
            print(f"written: {path}")
        _update_readme(core, report, out, device)
        return 0

    if args.list:
        print(f"suite {suite} on {device}: {len(cases)} case(s)"
              + (" after the conversion demo" if demo else ""))
        print(f"mmattn backends: {', '.join(selection.backends)}")
        for case in cases:
            sweeps = ",".join(case.sweeps) or "-"
            print(f"  {case.op:24s} {sweeps:10s} {'*' if case.headline else ' '} {case.label}")
        print("(* = headline case)")
        return 0

    start = time.perf_counter()
    env = core.environment(device)  # the git sha before anything runs
    if demo:
        print("=== conversion demo (examples/convert_demo.py) ===", flush=True)
        sys.path.insert(0, str(REPO / "examples"))
        importlib.import_module("convert_demo").main(quick=suite in ("quick", "smoke"))
        print(flush=True)
    rows = core.run(selection, cases, env)
    for family in core.FAMILIES:
        mine = [r for r in rows if r["family"] == family]
        if mine:
            print(report.family_markdown(family, mine), flush=True)
    out = args.out or (core.RESULTS_DIR if preset.writes else None)
    if out is not None and rows:
        for path in report.write_results(rows, out, device):
            print(f"written: {path}")
        _update_readme(core, report, out, device)
    failed = [r for r in rows if r.get("status") == "failed"]
    print(f"[suite {suite} on {device}: {len(cases)} case(s), {len(rows)} row(s), "
          f"{len(failed)} failed, {time.perf_counter() - start:.0f} s]")
    for r in failed:
        print(f"FAILED {r['op']} {r['case']} {r['impl']}: {r['reason']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
