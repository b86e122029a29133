"""The benchmark suite runs, lists, and writes well-formed CSV, Markdown and PNG."""

from __future__ import annotations

import csv
import math
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import mmattn  # noqa: E402
from benchmarks import core, report  # noqa: E402
from benchmarks.bench_block_sparse import computed_elements, to_flex_block_mask  # noqa: E402
from mmattn import bench  # noqa: E402


def _cells(line: str) -> list[str]:
    """Cells of a Markdown table line (escaped pipes stay inside their cell)."""
    assert line.startswith("| ") and line.endswith(" |"), line
    return re.split(r"(?<!\\)\|", line[1:-1])


def _tables(text: str) -> list[list[str]]:
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def _check_markdown(text: str) -> int:
    """Every table: header, a --- separator, rows with the header's cell count."""
    tables = _tables(text)
    assert tables
    for table in tables:
        width = len(_cells(table[0]))
        assert all(cell.strip() == "---" for cell in _cells(table[1]))
        assert len(table) > 2
        for line in table[2:]:
            assert len(_cells(line)) == width, line
    return len(tables)


def test_quick_list_prints_cases_and_runs_nothing(capsys: pytest.CaptureFixture) -> None:
    assert bench.main(["--quick", "--list"]) == 0
    out = capsys.readouterr().out
    assert "suite quick on cpu" in out and "after the conversion demo" in out
    for op in ("cross_attention.fwd ", "cross_attention.fwd+bwd", "block_sparse.fwd",
               "ws_linear.fwd ", "ws_linear.fwd+bwd", "modules.inference"):
        assert op in out, op
    assert "seed 000 CrossModalAttention B8 Lq64 Lk197 E768 H12" in out
    assert "conversion demo (examples" not in out  # listed, not run
    # selection flags narrow the list
    assert bench.main(["--suite", "default", "--list", "--op", "block_sparse",
                       "--sweep", "density", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("  ")]
    assert len(lines) == 14 and all("block_sparse" in line and "bf16" in line for line in lines)
    assert "after the conversion demo" not in out


def test_tiny_sweep_writes_csv_markdown_png(tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    rc = bench.main(["--suite", "smoke", "--op", "cross_attention.fwd", "block_sparse.fwd",
                     "ws_linear", "modules", "--threads", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "| impl |" in out  # the Markdown tables go to stdout too
    names = sorted(p.name for p in tmp_path.iterdir())
    for family in ("cross_attention", "block_sparse", "ws_linear", "modules"):
        assert f"{family}_cpu.csv" in names and f"{family}_cpu.md" in names
    for png in ("cross_attention_seqlen_cpu.png", "block_sparse_density_cpu.png",
                "ws_linear_density_cpu.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        import matplotlib.image

        assert matplotlib.image.imread(tmp_path / png).shape[0] > 100
    assert _check_markdown((tmp_path / "headline_cpu.md").read_text()) == 2  # + ranges

    rows = []
    for family in ("cross_attention", "block_sparse", "ws_linear", "modules"):
        with open(tmp_path / f"{family}_cpu.csv", newline="") as f:
            reader = csv.DictReader(f)
            assert tuple(reader.fieldnames) == core.COLUMNS
            rows += list(reader)
        assert _check_markdown((tmp_path / f"{family}_cpu.md").read_text()) >= 1
    for row in rows:
        assert row["device"] == "cpu" and row["device_name"]
        assert row["torch"] == torch.__version__ and row["mmattn"] == mmattn.__version__
        assert row["triton"] and row["git_sha"] and row["date"]
        assert row["status"] in ("ok", "skipped"), row
        if row["status"] == "ok":
            median, p20, p80 = (float(row[k]) for k in ("median_ms", "p20_ms", "p80_ms"))
            assert 0 < p20 <= median <= p80
            assert row["peak_mem_mb"] != ""  # measured in the worker
        else:
            assert row["reason"]
    ours = [r for r in rows if r["impl"] == "mmattn[cpu]"]
    assert ours and all(r["status"] == "ok" for r in ours)
    for row in ours:  # bf16 rows are in the dtype sweep
        assert float(row["max_err"]) < (5e-2 if "bf16" in row["case"] else 1e-4), row
        assert row["best_anchor"] and float(row["speedup_vs_best_anchor"]) > 0
    # triton is never timed under the interpreter (conftest sets TRITON_INTERPRET=1
    # without a GPU); the cuda backend says why it cannot run CPU tensors
    triton_rows = [r for r in rows if r["impl"] == "mmattn[triton]"]
    assert triton_rows and all(r["status"] == "skipped" and "TRITON_INTERPRET" in r["reason"]
                               for r in triton_rows)
    assert all(r["status"] == "skipped" and r["reason"]
               for r in rows if r["impl"] == "mmattn[cuda]")
    sdpa = [r for r in rows if r["impl"] == "SDPA[flash]" and r["status"] == "ok"]
    assert sdpa and all(float(r["speedup_cpu"]) > 0 for r in sdpa)
    assert any(float(r["tflops"] or 0) > 0 for r in rows if r["family"] == "block_sparse")
    assert any(float(r["gbps"] or 0) > 0 for r in rows if r["family"] == "ws_linear")
    seed = [r for r in rows if r["impl"] == "seed 002 WSMultiModalFusion"]
    assert seed and float(seed[0]["max_err"]) < 1e-5

    # --render rebuilds Markdown, plots and headline from the CSVs alone
    markdown = (tmp_path / "block_sparse_cpu.md").read_text()
    for name in ("block_sparse_cpu.md", "block_sparse_density_cpu.png", "headline_cpu.md"):
        (tmp_path / name).unlink()
    assert bench.main(["--render", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "block_sparse_density_cpu.png").read_bytes()[:4] == b"\x89PNG"
    rendered = (tmp_path / "block_sparse_cpu.md").read_text()
    # the same tables (numbers may differ in a last digit: the CSV keeps 6 of them)
    assert [line[:40] for line in rendered.splitlines()] == [
        line[:40] for line in markdown.splitlines()]
    assert _check_markdown((tmp_path / "headline_cpu.md").read_text()) == 2  # + ranges


def test_flex_block_mask_matches_ours() -> None:
    pytest.importorskip("torch.nn.attention.flex_attention")
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    # causal over lengths that are not block multiples: partial blocks and clipped edges
    for mask in (mmattn.BlockMask.causal((96, 96), 32),
                 mmattn.BlockMask.random(128, 32, 0.5, seed=1)):
        flex_mask = to_flex_block_mask(mask, "cpu")
        assert torch.equal(flex_mask.to_dense().bool(), mask.layout)
        length = mask.seq_lengths[0]
        q, k, v = (torch.randn(1, 2, length, 16) for _ in range(3))
        ours = mmattn.cross_attention(q, k, v, block_mask=mask, backend="reference")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
            theirs = flex_attention(q, k, v, block_mask=flex_mask)
        visible = mask.to_dense()[0, 0].any(-1)
        torch.testing.assert_close(theirs[:, :, visible], ours[:, :, visible], atol=1e-5,
                                   rtol=1e-5)


def test_computed_elements_counts_nonempty_blocks_clipped() -> None:
    layout = torch.tensor([[True, False, True], [False, False, True]])
    mask = mmattn.BlockMask.from_layout(layout, (40, 70), 32)  # blocks 32 / 8 rows, 32 / 6 cols
    assert computed_elements(mask, batch=2, heads=3) == 6 * (32 * 32 + 32 * 6 + 8 * 6)


def test_summarize_and_markdown_helpers() -> None:
    assert core.summarize([3.0]) == (3.0, 3.0, 3.0)
    median, p20, p80 = core.summarize([5.0, 1.0, 2.0, 4.0, 3.0])
    assert (median, p20, p80) == (3.0, 1.8, 4.2)
    table = report.markdown_table(["a", "empty", "b"], [["x|y", "", 1], ["z", "", 2]])
    assert table.splitlines()[0] == "| a | b |" and "x\\|y" in table
    assert _check_markdown(table) == 1
    text = "a\n<!-- bench:headline:cpu:begin -->\nold\n<!-- bench:headline:cpu:end -->\nb"
    new, done = report.replace_between(text, "headline:cpu", "new table")
    assert done and "new table" in new and "old" not in new and new.endswith("end -->\nb")
    assert report.replace_between(text, "modules:cpu", "x") == (text, False)
    assert math.isnan(core.max_error([torch.tensor([float("nan")])], [torch.tensor([0.0])],
                                     nan_as_zero=False))
    assert core.max_error([torch.tensor([float("nan")])], [torch.tensor([0.0])],
                          nan_as_zero=True) == 0.0
