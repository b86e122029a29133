"""Timing and reporting shared by the benchmark scripts.

Every benchmark times the anchor (the PyTorch baseline) in the same run as
mmattn and reports the ratio, because absolute times on shared machines drift.
"""

from __future__ import annotations

import csv
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


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


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {device}")


@dataclass
class Table:
    """Rows of (case, anchor name, anchor ms, mmattn ms, ratio, target, note)."""

    title: str
    rows: list[dict[str, object]] = field(default_factory=list)

    def add(self, case: str, anchor: str, anchor_ms: float, ours_ms: float,
            target: str = "", note: str = "") -> None:
        self.rows.append({
            "case": case, "anchor": anchor, "anchor_ms": round(anchor_ms, 3),
            "mmattn_ms": round(ours_ms, 3), "speedup": round(anchor_ms / ours_ms, 2),
            "target": target, "note": note,
        })

    def render(self) -> str:
        cols: Sequence[str] = ("case", "anchor", "anchor_ms", "mmattn_ms", "speedup",
                               "target", "note")
        widths = {c: max(len(c), *(len(str(r[c])) for r in self.rows)) for c in cols}
        line = " | ".join(c.ljust(widths[c]) for c in cols)
        out = [f"## {self.title}", f"machine: {machine_description()}", "", line,
               "-+-".join("-" * widths[c] for c in cols)]
        for r in self.rows:
            out.append(" | ".join(str(r[c]).ljust(widths[c]) for c in cols))
        return "\n".join(out)

    def write(self, stem: str) -> Path:
        """Write ``results/<stem>.csv`` and ``results/<stem>.md``; returns the .md path."""
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        with open(RESULTS_DIR / f"{stem}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.rows[0].keys()))
            writer.writeheader()
            writer.writerows(self.rows)
        md = RESULTS_DIR / f"{stem}.md"
        md.write_text(self.render() + "\n")
        return md
