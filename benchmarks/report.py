"""Reporting: GitHub Markdown tables, CSV, PNG plots and the README's tables.

Files (``<device>`` is ``cpu`` or ``cuda``), all rewritten by ``--suite default|full``:

- ``<family>_<device>.csv``: one row per (case, implementation), columns ``core.COLUMNS``
  (device name, torch / triton / mmattn versions and git sha on every row);
- ``<family>_<device>.md``: the same as Markdown tables, one per sweep;
- ``headline_<device>.md``: the headline cases, mmattn against each anchor;
- ``cross_attention_seqlen_<device>.png``, ``block_sparse_density_<device>.png``,
  ``ws_linear_density_<device>.png``: time against sequence length / density.

The README's headline and modules tables sit between ``<!-- bench:... -->`` markers and
are regenerated from the CSV files of the results directory.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.core import BACKENDS, COLUMNS, FAMILIES, NUMERIC, REPO

TITLES = {
    "cross_attention": "cross_attention: forward, backward, forward+backward",
    "block_sparse": "Block-sparse attention",
    "ws_linear": "ws_linear (Watts-Strogatz sparse linear)",
    "modules": "mmattn.nn modules against the modules they replace",
}
SWEEP_TITLES = {
    "": "base shape", "Lk": "time vs Lk (Lq small: few queries, many keys)",
    "Lq": "time vs Lq (Lk small: many queries, few keys)", "head_dim": "head dim",
    "gqa": "GQA ratio Hq / Hkv", "batch": "batch", "dtype": "dtype",
    "density": "density", "block": "block size", "pattern": "mask pattern",
    "n": "features n (n x n)", "beta": "rewiring beta", "modules": "modules",
}


# ---- formatting --------------------------------------------------------------------------

def _num(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def fmt_ms(value: Any) -> str:
    v = _num(value)
    if v is None:
        return ""
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _fmt(value: Any, spec: str) -> str:
    v = _num(value)
    return "" if v is None else format(v, spec)


def fmt_ratio(value: Any) -> str:
    v = _num(value)
    return "" if v is None else f"{v:.2f}x"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table; columns empty in every row are dropped."""
    body = [[_cell(c) for c in row] for row in rows]
    keep = [i for i in range(len(header)) if i == 0 or any(r[i] for r in body)]
    lines = ["| " + " | ".join(header[i] for i in keep) + " |",
             "| " + " | ".join("---" for _ in keep) + " |"]
    lines += ["| " + " | ".join(r[i] for i in keep) + " |" for r in body]
    return "\n".join(lines)


def environment_line(row: dict[str, Any]) -> str:
    threads = str(row.get("threads", "?"))
    plural = "" if threads == "1" else "s"
    return (f"{row.get('device_name', '?')}, {threads} thread{plural}; torch "
            f"{row.get('torch', '?')}, triton {row.get('triton', '?')}, mmattn "
            f"{row.get('mmattn', '?')}, git {row.get('git_sha', '?')}; suite "
            f"`{row.get('suite', '?')}`, {row.get('date', '?')}")


def environments(rows: Sequence[dict[str, Any]]) -> str:
    """The environment line of each run the rows come from, with the families it covers."""
    runs: dict[str, list[str]] = {}
    for r in rows:
        families = runs.setdefault(environment_line(r), [])
        if r["family"] not in families:
            families.append(r["family"])
    if len(runs) == 1:
        return next(iter(runs))
    return "\n".join(f"- {', '.join(families)}: {line}" for line, families in runs.items())


# ---- the per-family document -------------------------------------------------------------

def _backend_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """mmattn backends with a speed-up in these rows (the reference only if alone)."""
    found = [b for b in BACKENDS if any(_num(r.get(f"speedup_{b}")) for r in rows)]
    kernels = [b for b in found if b != "reference"]
    return kernels or found


def _skipped_everywhere(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """impl -> reason(s), for implementations skipped wherever they appear in the table: one
    line under the table says so instead of a row per case."""
    ran = {r["impl"] for r in rows if r.get("status") != "skipped"}
    reasons: dict[str, set[str]] = {}
    for r in rows:
        if r.get("status") == "skipped" and r["impl"] not in ran:
            reasons.setdefault(r["impl"], set()).add(r.get("reason", ""))
    return {impl: " / ".join(sorted(why)) for impl, why in reasons.items()}


def sweep_table(rows: Sequence[dict[str, Any]]) -> str:
    always_skipped = _skipped_everywhere(rows)
    footer = "".join(f"\n\n{impl}: skipped in every case: {reason}"
                     for impl, reason in always_skipped.items())
    rows = [r for r in rows if r["impl"] not in always_skipped]
    backends = _backend_columns(rows)
    header = ["case", "op", "impl", "median ms", "p20–p80 ms", "TFLOP/s", "% of peak", "GB/s",
              "peak MB", "max err", *(f"mmattn[{b}] speed-up" for b in backends),
              "mmattn vs fastest anchor", "compile s", "note"]
    body = []
    for r in rows:
        status = r.get("status", "")
        if status == "ok":
            median = fmt_ms(r["median_ms"])
            spread = f"{fmt_ms(r['p20_ms'])}–{fmt_ms(r['p80_ms'])}"
            note = r.get("note", "")
        else:
            median, spread = status, ""
            note = f"{r.get('reason', '')}; {r.get('note', '')}".strip("; ")
        best = ""
        if _num(r.get("speedup_vs_best_anchor")):
            best = f"{fmt_ratio(r['speedup_vs_best_anchor'])} vs {r['best_anchor']}"
        peak = _num(r.get("peak_fraction"))
        body.append([
            r["case"], r["op"].split(".", 1)[1], r["impl"], median, spread,
            _fmt(r.get("tflops"), ".3g"), "" if peak is None else f"{100 * peak:.1f}",
            _fmt(r.get("gbps"), ".3g"), _fmt(r.get("peak_mem_mb"), ".1f"),
            _fmt(r.get("max_err"), ".1e"), *(fmt_ratio(r.get(f"speedup_{b}")) for b in backends),
            best, _fmt(r.get("compile_s"), ".1f"), note])
    return markdown_table(header, body) + footer


def _by_sweep(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """sweep -> its rows; "" holds the headline cases (the base shape), unless every row
    belongs to one sweep anyway (modules)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    one_sweep = len({str(r.get("sweeps", "")) for r in rows}) == 1
    for r in rows:
        sweeps = [s for s in str(r.get("sweeps", "")).split(",") if s]
        if not sweeps or (int(_num(r.get("headline")) or 0) and not one_sweep):
            groups.setdefault("", []).append(r)
        for sweep in sweeps:
            groups.setdefault(sweep, []).append(r)
    return groups


LEGEND = (
    "Times in ms: median of all samples of the interleaved rounds (p20–p80 beside it). "
    "TFLOP/s counts useful FLOPs (computed blocks only for block-sparse; the same count "
    "in every row of a case); % of peak: of the GPU's datasheet dense peak. Peak MB: CUDA "
    "`max_memory_allocated` above the inputs; CPU peak RSS growth of one call in a worker "
    "process. max err: largest |difference| to mmattn's reference backend on the same inputs "
    "(float64 on CPU, float32 on CUDA; output, and input gradients for backward). "
    "`mmattn[b] speed-up` in an anchor's row: anchor time / mmattn time on backend b "
    "(above 1: mmattn is faster, below 1: slower).")


def family_markdown(family: str, rows: Sequence[dict[str, Any]]) -> str:
    parts = [f"## {TITLES.get(family, family)}", "", environment_line(rows[0]), "", LEGEND]
    for sweep, group in _by_sweep(rows).items():
        parts += ["", f"### {SWEEP_TITLES.get(sweep, sweep)}", "", sweep_table(group)]
    return "\n".join(parts) + "\n"


# ---- CSV ---------------------------------------------------------------------------------

def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: _csv_value(r.get(c)) for c in COLUMNS})


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def read_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key in NUMERIC:
            r[key] = _num(r.get(key))
    return rows


def read_results(out_dir: Path, device: str) -> list[dict[str, Any]]:
    """The rows of every family's CSV of ``device`` in ``out_dir``."""
    rows: list[dict[str, Any]] = []
    for family in FAMILIES:
        path = out_dir / f"{family}_{device}.csv"
        if path.exists():
            rows += read_csv(path)
    return rows


# ---- plots -------------------------------------------------------------------------------

def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ok(rows: Iterable[dict[str, Any]], sweep: str) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("status") == "ok" and _num(r.get("median_ms"))
            and sweep in str(r.get("sweeps", "")).split(",")]


def _params(row: dict[str, Any]) -> dict[str, Any]:
    return json.loads(row["params"]) if isinstance(row["params"], str) else row["params"]


def _lines(ax: Any, rows: list[dict[str, Any]], x_of: Any
           ) -> dict[str, tuple[list[tuple[float, float, float, float]], str]]:
    """One line per implementation (p20–p80 shaded); returns name -> (points, colour)."""
    series: dict[str, list[tuple[float, float, float, float]]] = {}
    for r in rows:
        series.setdefault(r["impl"], []).append(
            (x_of(r), r["median_ms"], r.get("p20_ms") or r["median_ms"],
             r.get("p80_ms") or r["median_ms"]))
    drawn = {}
    for name, points in series.items():
        points.sort()
        xs, ys, lo, hi = zip(*points, strict=True)
        style = "-o" if name.startswith("mmattn") else "--s"
        (line,) = ax.plot(xs, ys, style, markersize=3, label=name,
                          linewidth=2 if name.startswith("mmattn") else 1)
        ax.fill_between(xs, lo, hi, alpha=0.15, color=line.get_color())
        drawn[name] = (points, line.get_color())
    return drawn


def plot_seqlen(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    panels = [(d, s) for d in ("fwd", "bwd", "fwd+bwd") for s in ("Lk", "Lq")
              if any(r["op"].endswith("." + d) for r in _ok(rows, s))]
    if not panels:
        return False
    plt = _pyplot()
    directions = sorted({d for d, _ in panels}, key=("fwd", "bwd", "fwd+bwd").index)
    fig, axes = plt.subplots(len(directions), 2, figsize=(12, 3.6 * len(directions)),
                             squeeze=False)
    for i, direction in enumerate(directions):
        for j, sweep in enumerate(("Lk", "Lq")):
            ax = axes[i][j]
            chosen = [r for r in _ok(rows, sweep) if r["op"].endswith("." + direction)]
            if not chosen:
                ax.set_visible(False)
                continue
            _lines(ax, chosen, lambda r, s=sweep: _params(r)[s])
            fixed = "Lq" if sweep == "Lk" else "Lk"
            ax.set(xscale="log", yscale="log", xlabel=sweep, ylabel="ms",
                   title=f"{direction}: time vs {sweep} ({fixed}={_params(chosen[0])[fixed]}, "
                         f"{chosen[0]['case'].split(' ')[-1]})")
            ax.set_xscale("log", base=2)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"cross_attention on {rows[0]['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_block_density(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    chosen = _ok(rows, "density")
    directions = [d for d in ("fwd", "bwd", "fwd+bwd")
                  if any(r["op"].endswith("." + d) for r in chosen)]
    if not directions:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(directions), figsize=(6.5 * len(directions), 4.2),
                             squeeze=False)
    for ax, direction in zip(axes[0], directions, strict=True):
        mine = [r for r in chosen if r["op"].endswith("." + direction)]
        series = _lines(ax, mine, lambda r: _params(r)["measured_density"])
        for name, (points, colour) in series.items():
            dense = [ms for x, ms, _, _ in points if x >= 0.999]
            if name.startswith("mmattn") and dense:
                xs = [x for x, *_ in points]
                ax.plot(xs, [x * dense[0] for x in xs], ":", color=colour, linewidth=1.2,
                        label=f"ideal: density x {name} at density 1")
        p = _params(mine[0])
        ax.set(yscale="log", xlabel="block density (nonempty blocks / all)", ylabel="ms",
               title=f"{direction}: B{p['B']} H{p['H']} L{p['L']} D{p['D']} block "
                     f"{p['block']}, {p['dtype']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"block-sparse attention on {rows[0]['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_ws_density(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    chosen = _ok(rows, "density")
    directions = [d for d in ("fwd", "fwd+bwd") if any(r["op"].endswith("." + d)
                                                       for r in chosen)]
    if not directions:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(directions), figsize=(6.5 * len(directions), 4.2),
                             squeeze=False)
    for ax, direction in zip(axes[0], directions, strict=True):
        mine = [r for r in chosen if r["op"].endswith("." + direction)]
        _lines(ax, mine, lambda r: _params(r)["density"])
        p = _params(mine[0])
        ax.set(xscale="log", yscale="log", xlabel="density (kept / all weights)", ylabel="ms",
               title=f"ws_linear {direction}: n={p['n']}, batch {p['batch']}, {p['dtype']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"ws_linear on {rows[0]['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


PLOTS = {
    "cross_attention": ("cross_attention_seqlen", plot_seqlen),
    "block_sparse": ("block_sparse_density", plot_block_density),
    "ws_linear": ("ws_linear_density", plot_ws_density),
}


# ---- headline and README -----------------------------------------------------------------

def headline_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Per headline case: mmattn's fastest kernel backend against every anchor that ran."""
    cases: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if int(_num(r.get("headline")) or 0):
            cases.setdefault((r["op"], r["case"]), []).append(r)
    out = []
    for (op, case), group in cases.items():
        ok = [r for r in group if r.get("status") == "ok" and _num(r.get("median_ms"))]
        ours = [r for r in ok if r["kind"] == "mmattn"]
        kernels = [r for r in ours if r.get("backend") != "reference"] or ours
        if not kernels:
            continue
        best = min(kernels, key=lambda r: r["median_ms"])
        for anchor in (r for r in ok if r["kind"] == "anchor"):
            out.append([op, case, best["impl"], fmt_ms(best["median_ms"]), anchor["impl"],
                        fmt_ms(anchor["median_ms"]),
                        fmt_ratio(anchor["median_ms"] / best["median_ms"])])
    return out


def headline_markdown(rows: Sequence[dict[str, Any]]) -> str:
    header = ["op", "case", "mmattn", "ms", "anchor", "anchor ms",
              "speed-up (anchor ms / mmattn ms)"]
    return markdown_table(header, headline_rows(rows))


def _kernel_speedup(row: dict[str, Any]) -> float | None:
    """An anchor row's speed-up of mmattn's fastest kernel backend (the reference backend
    only where no kernel backend ran)."""
    kernels = [_num(row.get(f"speedup_{b}")) for b in BACKENDS if b != "reference"]
    kernels = [v for v in kernels if v]
    if kernels:
        return max(kernels)
    return _num(row.get("speedup_reference"))


def ranges_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Per op and anchor, mmattn's speed-up over every case of the run: how often it
    loses, the worst case, the median, the best."""
    import statistics

    groups: dict[tuple[str, str], list[tuple[float, str]]] = {}
    for r in rows:
        if r.get("kind") != "anchor" or r.get("status") != "ok" or r["family"] == "modules":
            continue
        value = _kernel_speedup(r)
        if value:
            groups.setdefault((r["op"], r["impl"]), []).append((value, r["case"]))
    header = ["op", "anchor", "cases", "mmattn slower in", "worst (case)", "median", "best"]
    body = []
    for (op, anchor), values in groups.items():
        speedups = [v for v, _ in values]
        worst = min(values)
        body.append([op, anchor, str(len(values)), str(sum(v < 1 for v in speedups)),
                     f"{fmt_ratio(worst[0])} ({worst[1]})",
                     fmt_ratio(statistics.median(speedups)), fmt_ratio(max(speedups))])
    return markdown_table(header, body)


def modules_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One line per module case: the module replaced, mmattn as a user gets it (the
    ``auto`` row: automatic choice, no backend context) or else its fastest backend, ratio."""
    header = ["case", "module replaced", "its ms", "mmattn", "mmattn ms",
              "speed-up (its ms / mmattn ms)"]
    body = []
    by_case: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        by_case.setdefault((r["op"], r["case"]), []).append(r)
    for (_op, case), group in by_case.items():
        ok = [r for r in group if r.get("status") == "ok" and _num(r.get("median_ms"))]
        ours = [r for r in ok if r["kind"] == "mmattn"]
        kernels = [r for r in ours if r.get("backend") != "reference"] or ours
        anchors = [r for r in ok if r["kind"] == "anchor"]
        if not kernels or not anchors:
            continue
        auto = [r for r in kernels if r.get("backend") == "auto"]
        best = auto[0] if auto else min(kernels, key=lambda r: r["median_ms"])
        for anchor in anchors:
            body.append([case, anchor["impl"], fmt_ms(anchor["median_ms"]), best["impl"],
                         fmt_ms(best["median_ms"]),
                         fmt_ratio(anchor["median_ms"] / best["median_ms"])])
    return markdown_table(header, body)


def replace_between(text: str, name: str, content: str) -> tuple[str, bool]:
    """Replace what lies between ``<!-- bench:NAME:begin -->`` and ``...:end -->``."""
    pattern = re.compile(rf"(<!-- bench:{re.escape(name)}:begin -->\n).*?(<!-- bench:"
                         rf"{re.escape(name)}:end -->)", re.S)
    new, count = pattern.subn(lambda m: m.group(1) + content.rstrip("\n") + "\n" + m.group(2),
                              text)
    return new, bool(count)


def update_readme(out_dir: Path, device: str, readme: Path = REPO / "README.md") -> list[str]:
    """Regenerate the README's tables of ``device`` from the CSVs in ``out_dir``;
    returns the names of the sections replaced."""
    all_rows = read_results(out_dir, device)
    if not all_rows or not readme.exists():
        return []
    text = readme.read_text()
    done = []
    env = f"\n{environments(all_rows)}\n"
    headline = (headline_markdown(all_rows) + "\n\nmmattn's speed-up over all cases of the "
                "run (anchor time / mmattn time; below 1x mmattn is slower):\n\n" +
                ranges_markdown(all_rows) + "\n" + env)
    text, ok = replace_between(text, f"headline:{device}", headline)
    done += ["headline"] if ok else []
    modules = [r for r in all_rows if r["family"] == "modules"]
    if modules:
        text, ok = replace_between(text, f"modules:{device}", modules_markdown(modules) +
                                   f"\n\n{environments(modules)}\n")
        done += ["modules"] if ok else []
    readme.write_text(text)
    return done


def write_results(rows: Sequence[dict[str, Any]], out_dir: Path, device: str,
                  csv_too: bool = True) -> list[Path]:
    """Write every family's CSV, Markdown and plot, and the headline; returns the paths.
    (``csv_too=False`` re-renders the rest from rows read back from the CSVs.)"""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for family in FAMILIES:
        mine = [r for r in rows if r["family"] == family]
        if not mine:
            continue
        csv_path, md_path = out_dir / f"{family}_{device}.csv", out_dir / f"{family}_{device}.md"
        if csv_too:
            write_csv(mine, csv_path)
            written.append(csv_path)
        md_path.write_text(family_markdown(family, mine))
        written.append(md_path)
        if family in PLOTS:
            stem, plot = PLOTS[family]
            png = out_dir / f"{stem}_{device}.png"
            if plot(mine, png):
                written.append(png)
    headline_rows_all = read_results(out_dir, device)
    if headline_rows_all:
        path = out_dir / f"headline_{device}.md"
        path.write_text(f"# Headline ({device})\n\n{environments(headline_rows_all)}\n\n"
                        f"{headline_markdown(headline_rows_all)}\n\n## Speed-up over all "
                        f"cases (anchor time / mmattn time)\n\n"
                        f"{ranges_markdown(headline_rows_all)}\n")
        written.append(path)
    return written
