"""The benchmark engine: presets, cases, implementations, and the runner.

A **case** is one operation at one shape (``Case``: an op such as ``cross_attention.fwd``,
JSON-able parameters, the sweeps it belongs to). Its family module builds it into
**implementations** (``Impl``): mmattn on each backend and the anchors (the PyTorch or
third-party code a user would run instead), all on the same inputs. The runner then, per
case:

1. calls every implementation once and compares its result with mmattn's reference backend
   on the same inputs (float64 on CPU, float32 on CUDA): the ``max_err`` column. A backend
   that cannot run the case raises ``mmattn.BackendUnavailableError``: the row is
   *skipped* with that reason. Any other error of an anchor also skips its row; an
   error of mmattn marks the row *failed*;
2. times them **interleaved**: ``rounds`` rounds, each timing every implementation once
   (starting with a different one each round), so that a change in machine load hits all
   of them. CPU: ``torch.utils.benchmark.Timer.blocked_autorange``; CUDA:
   ``triton.testing.do_bench`` (CUDA events, L2 flush, warm-up). All samples of the
   rounds are pooled; a row reports their median, 20th and 80th percentiles;
3. measures peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the memory
   already held (inputs); on CPU the growth of the peak resident set (``VmHWM`` after
   ``/proc/self/clear_refs``) during one call, in a separate worker process whose
   allocator returns every block >= 64 KiB to the system on free
   (``MALLOC_MMAP_THRESHOLD_``), so each call's peak is its own;
4. derives TFLOP/s (useful FLOPs: only computed blocks for block-sparse cases, the same
   count for every row of a case), the fraction of the GPU's datasheet peak where known,
   GB/s (ws_linear) and speed-ups: in an anchor row, ``anchor ms / mmattn[backend] ms``
   per backend (above 1: mmattn is faster); in an mmattn row, against the fastest anchor
   that computes the same result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import mmattn

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"

BACKENDS = ("reference", "cpu", "triton", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")

# Operation families: name -> module holding ``OPS``, ``cases(selection)`` and
# ``build(case, selection)``. ``convert`` (the conversion demo) is run by the CLI.
FAMILIES = {
    "cross_attention": "benchmarks.bench_attention",
    "block_sparse": "benchmarks.bench_block_sparse",
    "ws_linear": "benchmarks.bench_ws_linear",
    "modules": "benchmarks.bench_modules",
}


# ---- presets and selection ---------------------------------------------------------------

@dataclass(frozen=True)
class Preset:
    """How much a suite measures. Shapes live with each family (``cases``)."""

    name: str
    rounds: int  # interleaved rounds per case
    min_run_time: float  # CPU: seconds of blocked_autorange per implementation and round
    cuda_rep_ms: float  # CUDA: do_bench ``rep`` (ms) per implementation and round
    memory: bool  # measure peak memory
    flex: bool  # compile FlexAttention anchors (about 15 s per shape on CPU)
    writes: bool  # rewrite benchmarks/results/ unless --out says elsewhere
    slow_s: float  # an implementation whose first call is slower gets one round only
    description: str = ""


PRESETS = {
    "smoke": Preset("smoke", 1, 0.005, 5.0, True, False, False, 0.5,
                    "tiny shapes, seconds: checks that every path runs (tests)"),
    "quick": Preset("quick", 2, 0.05, 25.0, False, False, False, 1.0,
                    "the headline shapes, under 2 minutes on a 2-core CPU; prints only"),
    "default": Preset("default", 3, 0.1, 100.0, True, True, True, 2.0,
                      "every sweep at moderate sizes; rewrites benchmarks/results/"),
    "full": Preset("full", 5, 0.25, 250.0, True, True, True, 5.0,
                   "wider sweeps, more samples; rewrites benchmarks/results/"),
}


@dataclass(frozen=True)
class Selection:
    """What one run measures: preset, device and the CLI's filters."""

    preset: Preset
    device: str = "cpu"  # "cpu" | "cuda"
    ops: tuple[str, ...] | None = None  # families or exact ops; None = all
    sweeps: tuple[str, ...] | None = None
    backends: tuple[str, ...] = BACKENDS  # mmattn backends
    anchors: tuple[str, ...] | None = None  # case-insensitive substrings; None = all
    dtypes: tuple[str, ...] | None = None  # None = each sweep's own
    threads: int = 0  # torch CPU threads; 0 = leave torch's setting
    memory: bool = True  # and the preset's memory flag

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Selection:
        data = dict(data)
        data["preset"] = Preset(**data["preset"])
        for key in ("ops", "sweeps", "backends", "anchors", "dtypes"):
            if data[key] is not None:
                data[key] = tuple(data[key])
        return cls(**data)

    def wants_op(self, op: str) -> bool:
        if self.ops is None:
            return True
        return any(op == want or op.split(".")[0] == want for want in self.ops)

    def wants_anchor(self, name: str) -> bool:
        return self.anchors is None or any(a.lower() in name.lower() for a in self.anchors)

    def base_dtype(self, default: str) -> str:
        return self.dtypes[0] if self.dtypes else default

    def dtype_sweep(self, default: Sequence[str]) -> list[str]:
        return list(self.dtypes) if self.dtypes else list(default)


# ---- cases and implementations -----------------------------------------------------------

@dataclass
class Case:
    """One operation at one shape. ``params`` is JSON-able: the memory worker rebuilds the
    case from it."""

    family: str
    op: str
    params: dict[str, Any]
    label: str
    sweeps: list[str] = field(default_factory=list)
    headline: bool = False

    def key(self) -> tuple[str, str]:
        return self.op, json.dumps(self.params, sort_keys=True)


@dataclass
class Impl:
    """One way of computing a case.

    ``run`` is what is timed; ``check`` runs it once and returns the tensors compared with
    the reference (None: not comparable, e.g. dense attention without the mask). ``skip``
    is a reason not to run it at all.
    """

    name: str
    kind: str  # "mmattn" | "anchor"
    run: Callable[[], object] | None = None
    check: Callable[[], list[Tensor] | None] | None = None
    backend: str = ""
    skip: str | None = None
    compiled: bool = False  # the first call compiles: reported as compile_s
    comparable: bool = True  # computes the same result as the case (else no max_err,
    # and it is not the "best anchor" of the mmattn rows)
    memory: bool = True  # measure its memory
    note: str = ""


@dataclass
class Built:
    impls: list[Impl]
    reference: Callable[[], list[Tensor]]
    flops: float | None = None  # useful FLOPs of one call
    bytes: float | None = None  # bytes one call must move at least (ws_linear)
    params: dict[str, Any] = field(default_factory=dict)  # measured values to record
    note: str = ""


def backend_skip(backend: str, device: str) -> str | None:
    """A reason not to time mmattn ``backend`` on ``device`` before asking mmattn.

    Everything else is left to mmattn's dispatch: a backend that cannot run a call raises
    ``BackendUnavailableError`` with the reason, which becomes the row's reason.
    """
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if backend == "triton" and interpreted:
        return "not timed under TRITON_INTERPRET=1 (the Triton interpreter)"
    return None


def mmattn_impls(selection: Selection, forward_for: Callable[[str], Callable[[], Tensor]],
                 make: Callable[..., Impl]) -> list[Impl]:
    """One implementation per selected mmattn backend; ``forward_for(backend)`` returns the
    zero-argument forward, ``make(name, kind, forward, backend=...)`` wraps it."""
    impls = []
    for backend in selection.backends:
        impl = make(f"mmattn[{backend}]", "mmattn", forward_for(backend), backend=backend)
        impl.skip = backend_skip(backend, selection.device)
        impls.append(impl)
    return impls


def directional(name: str, kind: str, forward: Callable[[], Tensor], direction: str,
                leaves: Sequence[Tensor] = (), grad_out: Tensor | None = None, *,
                post: Callable[[list[Tensor]], list[Tensor]] | None = None,
                **fields: Any) -> Impl:
    """An implementation of ``forward`` (a zero-argument call returning a tensor) for a
    direction: ``fwd`` times the forward; ``fwd+bwd`` the forward and ``backward(grad_out)``
    into ``leaves`` (their grads are reset first, as a training step does); ``bwd`` only
    ``autograd.grad`` of one retained forward graph. ``check`` returns ``[out]``,
    ``[out, *grads]`` or ``grads``, mapped by ``post``."""
    if direction == "fwd":
        def run() -> Tensor:
            return forward()

        def check() -> list[Tensor]:
            return [run()]
    elif direction == "fwd+bwd":
        def run() -> None:
            for leaf in leaves:
                leaf.grad = None
            forward().backward(grad_out)

        def check() -> list[Tensor]:
            for leaf in leaves:
                leaf.grad = None
            out = forward()
            out.backward(grad_out)
            return [out.detach(), *(leaf.grad for leaf in leaves)]
    elif direction == "bwd":
        graph: dict[str, Tensor] = {}

        def run() -> tuple[Tensor, ...]:
            if "out" not in graph:  # the forward is set-up, not timed
                graph["out"] = forward()
            return torch.autograd.grad(graph["out"], list(leaves), grad_out, retain_graph=True)

        def check() -> list[Tensor]:
            return list(run())
    else:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    checked = check if post is None else (lambda: post(check()))
    return Impl(name, kind, run, checked, **fields)


def leaves_like(tensors: Iterable[Tensor], grad: bool) -> list[Tensor]:
    """Independent leaf copies (requiring grad when ``grad``)."""
    return [t.detach().clone().requires_grad_(grad) for t in tensors]


def oracle_dtype(device: str) -> torch.dtype:
    """The reference computes in float64 on CPU (an oracle), float32 on CUDA (speed)."""
    return torch.float64 if device == "cpu" else torch.float32


def randn(shape: Sequence[int], dtype: torch.dtype, device: str, seed: int,
          scale: float = 1.0) -> Tensor:
    """Deterministic inputs: drawn on the CPU in float32 from ``seed``, then moved."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)


def direction_of(op: str) -> str:
    return op.split(".", 1)[1]


def shape_label(params: dict[str, Any], keys: Sequence[str]) -> str:
    parts = []
    for key in keys:
        value = params[key]
        if key == "dtype":
            parts.append(SHORT_DTYPE.get(value, value))
        elif isinstance(value, str):
            parts.append(value)
        else:
            parts.append(f"{key}{value}")
    return " ".join(str(p) for p in parts)


# ---- machine description -----------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def environment(device: str) -> dict[str, str]:
    """What every CSV row carries: device, versions, git sha, date."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"{cpu_model()} ({os.cpu_count()} cores)"
    return {
        "device": device,
        "device_name": name,
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "mmattn": mmattn.__version__,
        "git_sha": git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
    }


# Datasheet dense peaks (no 2:4 sparsity), TFLOP/s: tensor-core fp16/bf16 with fp32
# accumulation, and non-tensor-core fp32. Matched against torch.cuda.get_device_name(),
# first match wins (so "H100 PCIe" precedes "H100").
GPU_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"float16": 989.0, "bfloat16": 989.0, "float32": 67.0}),
    ("H100 PCIe", {"float16": 756.0, "bfloat16": 756.0, "float32": 51.0}),
    ("H100", {"float16": 989.0, "bfloat16": 989.0, "float32": 67.0}),
    ("A100", {"float16": 312.0, "bfloat16": 312.0, "float32": 19.5}),
    ("L40S", {"float16": 362.0, "bfloat16": 362.0, "float32": 91.6}),
    ("RTX 4090", {"float16": 165.2, "bfloat16": 165.2, "float32": 82.6}),
)


def peak_tflops(device: str, dtype: str) -> float | None:
    """The device's peak for ``dtype`` where known (CUDA GPUs in the table), else None."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for key, peaks in GPU_PEAK_TFLOPS:
        if key in name:
            return peaks.get(dtype)
    return None


# ---- timing ------------------------------------------------------------------------------

def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_samples(fn: Callable[[], object], device: str, preset: Preset) -> list[float]:
    """Per-call times in ms of one timing round."""
    if device == "cuda":
        from triton.testing import do_bench

        rep = preset.cuda_rep_ms
        return [float(t) for t in do_bench(fn, warmup=max(1.0, rep / 4), rep=rep,
                                           return_mode="all")]
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=preset.min_run_time)
    return [t * 1e3 for t in measurement.times]


def summarize(samples: Sequence[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of the samples (linear interpolation between order statistics)."""
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), deciles[1], deciles[7]


def interleaved(impls: Sequence[Impl], device: str, preset: Preset,
                first_call_s: dict[str, float]) -> dict[str, list[float]]:
    """Pooled samples of every implementation over ``preset.rounds`` interleaved rounds.

    Round ``r`` starts with implementation ``r mod n``, so none is always first or last;
    an implementation whose first call took over ``preset.slow_s`` is timed in round 0
    only (a slow reference must not multiply the suite's run time)."""
    samples: dict[str, list[float]] = {impl.name: [] for impl in impls}
    n = len(impls)
    for r in range(preset.rounds):
        for impl in [*impls[r % n:], *impls[:r % n]] if n else []:
            if r > 0 and first_call_s[impl.name] > preset.slow_s:
                continue
            samples[impl.name].extend(time_samples(impl.run, device, preset))
    return samples


# ---- memory ------------------------------------------------------------------------------

def cuda_peak_mb(fn: Callable[[], object]) -> float:
    """Peak CUDA memory allocated during ``fn()`` above what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    del result
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def rss_peak_mb(fn: Callable[[], object]) -> float:
    """Growth of the peak resident set during one ``fn()`` (after one warm-up call)."""
    fn()  # lazy set-up (thread pools, caches, a retained graph) is not the call's memory
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    before = _status_kb("VmRSS")
    result = fn()
    peak = _status_kb("VmHWM")
    del result
    return max(0.0, (peak - before) / 1024)


_WORKER_TAG = "@@mmattn-bench-memory "


def memory_worker() -> None:
    """The CPU memory worker's loop: one JSON request per stdin line, one reply per line."""
    for line in sys.stdin:
        request = json.loads(line)
        selection = Selection.from_json(request["selection"])
        if selection.threads:
            torch.set_num_threads(selection.threads)
        case = Case(**request["case"])
        peaks: dict[str, float | None] = {}
        errors: dict[str, str] = {}
        try:
            built = family_module(case.family).build(case, selection)
            by_name = {impl.name: impl for impl in built.impls}
            for name in request["impls"]:
                try:
                    peaks[name] = rss_peak_mb(by_name[name].run)
                except Exception as exc:
                    peaks[name] = None
                    errors[name] = f"{type(exc).__name__}: {exc}"
            del built, by_name
        except Exception as exc:
            errors["*"] = f"{type(exc).__name__}: {exc}"
        gc.collect()
        print(_WORKER_TAG + json.dumps({"peaks": peaks, "errors": errors}), flush=True)


class MemoryWorker:
    """A subprocess measuring CPU peak memory, case by case (started on first use)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None

    def _start(self) -> subprocess.Popen[str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH"))
                                            if p)
        # A fixed mmap threshold (which also switches off glibc's dynamic one): blocks of
        # 64 KiB and more are mapped on allocation and unmapped on free, so memory freed by
        # one call is not reused invisibly by the next, and RSS follows live tensors.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        return subprocess.Popen(
            [sys.executable, "-c", "from benchmarks.core import memory_worker; memory_worker()"],
            cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, bufsize=1)

    def measure(self, case: Case, selection: Selection,
                names: Sequence[str]) -> tuple[dict[str, float | None], dict[str, str]]:
        if not names:
            return {}, {}
        if self._proc is None or self._proc.poll() is not None:
            self._proc = self._start()
        request = {"selection": selection.to_json(), "case": dataclasses.asdict(case),
                   "impls": list(names)}
        assert self._proc.stdin is not None and self._proc.stdout is not None
        try:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
            for line in self._proc.stdout:
                if line.startswith(_WORKER_TAG):
                    reply = json.loads(line[len(_WORKER_TAG):])
                    return reply["peaks"], reply["errors"]
        except (BrokenPipeError, OSError):
            pass
        self.close()
        return {}, {"*": "the memory worker died (out of memory?)"}

    def close(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()  # type: ignore[union-attr]
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None


# ---- rows --------------------------------------------------------------------------------

COLUMNS = (
    "suite", "family", "op", "sweeps", "case", "params", "headline", "impl", "kind",
    "backend", "status", "reason", "median_ms", "p20_ms", "p80_ms", "samples",
    "first_call_s", "compile_s", "tflops", "peak_fraction", "gbps", "peak_mem_mb",
    "max_err", "best_anchor", "speedup_vs_best_anchor",
    *(f"speedup_{b}" for b in BACKENDS), "note",
    "device", "device_name", "threads", "torch", "triton", "mmattn", "git_sha", "date",
)
NUMERIC = ("median_ms", "p20_ms", "p80_ms", "samples", "first_call_s", "compile_s", "tflops",
           "peak_fraction", "gbps", "peak_mem_mb", "max_err", "speedup_vs_best_anchor",
           *(f"speedup_{b}" for b in BACKENDS))


def max_error(outs: Sequence[Tensor], refs: Sequence[Tensor], nan_as_zero: bool) -> float:
    """Largest |out - ref| over all compared tensors (NaN if an output has a NaN where the
    reference has none). Anchors' NaN count as 0: SDPA and the seeds give NaN for a query
    with no visible key where mmattn's contract (and reference) gives 0."""
    err = 0.0
    for out, ref in zip(outs, refs, strict=True):
        if out is None or ref is None:
            continue
        out = out.detach().to(ref.dtype)
        if nan_as_zero:
            out = torch.nan_to_num(out, nan=0.0)
        if out.shape != ref.shape:
            raise ValueError(f"output shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
        if out.numel():
            diff = (out - ref.to(out.device)).abs().max().item()
            if diff != diff:  # NaN
                return float("nan")
            err = max(err, diff)
    return err


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def run_case(case: Case, selection: Selection, env: dict[str, str],
             worker: MemoryWorker | None) -> list[dict[str, Any]]:
    """Build, check, time and measure one case; one row per implementation."""
    device, preset = selection.device, selection.preset
    common = {"suite": preset.name, "family": case.family, "op": case.op,
              "sweeps": ",".join(case.sweeps), "case": case.label,
              "headline": int(case.headline), **env}
    try:
        built = family_module(case.family).build(case, selection)
    except Exception as exc:  # a case that cannot be set up is reported, not fatal
        return [{**common, "params": json.dumps(case.params), "impl": "(case)",
                 "kind": "", "status": "failed", "reason": _short(exc)}]
    common["params"] = json.dumps({**case.params, **built.params})
    impls = [impl for impl in built.impls
             if impl.kind == "mmattn" or selection.wants_anchor(impl.name)]
    rows: dict[str, dict[str, Any]] = {
        impl.name: {**common, "impl": impl.name, "kind": impl.kind, "backend": impl.backend,
                    "status": "ok", "reason": "", "note": impl.note} for impl in impls}
    try:
        refs = built.reference()
    except Exception as exc:
        refs = None
        for row in rows.values():
            row["note"] = (row["note"] + f"; no reference: {_short(exc)}").lstrip("; ")

    ok: list[Impl] = []
    first_call: dict[str, float] = {}
    for impl in impls:
        row = rows[impl.name]
        if impl.skip:
            row.update(status="skipped", reason=impl.skip)
            continue
        try:
            start = time.perf_counter()
            outs = impl.check() if impl.check is not None else [impl.run()]  # type: ignore[misc]
            synchronize(device)
            first_call[impl.name] = time.perf_counter() - start
            row["first_call_s"] = first_call[impl.name]
            if impl.compiled:
                impl.run()  # the first call compiled; this one warms the compiled code
                synchronize(device)
            if refs is not None and outs is not None and impl.comparable:
                row["max_err"] = max_error(outs, refs, nan_as_zero=impl.kind == "anchor")
            del outs
        except mmattn.BackendUnavailableError as exc:
            row.update(status="skipped", reason=str(exc))
            continue
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            row.update(status="skipped", reason="out of GPU memory")
            continue
        except Exception as exc:
            row.update(status="failed" if impl.kind == "mmattn" else "skipped",
                       reason=_short(exc))
            continue
        ok.append(impl)

    samples = interleaved(ok, device, preset, first_call)
    for impl in ok:
        row = rows[impl.name]
        median, p20, p80 = summarize(samples[impl.name])
        row.update(median_ms=median, p20_ms=p20, p80_ms=p80, samples=len(samples[impl.name]))
        if impl.compiled:
            row["compile_s"] = max(0.0, row["first_call_s"] - median / 1e3)
        seconds = median / 1e3
        if built.flops:
            row["tflops"] = built.flops / seconds / 1e12
            peak = peak_tflops(device, case.params.get("dtype", ""))
            if peak:
                row["peak_fraction"] = row["tflops"] / peak
        if built.bytes:
            row["gbps"] = built.bytes / seconds / 1e9

    if preset.memory and selection.memory:
        measured = [impl for impl in ok if impl.memory]
        if device == "cuda":
            for impl in measured:
                try:
                    rows[impl.name]["peak_mem_mb"] = cuda_peak_mb(impl.run)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
        elif worker is not None:
            peaks, errors = worker.measure(case, selection, [impl.name for impl in measured])
            for name, mb in peaks.items():
                rows[name]["peak_mem_mb"] = mb
            for name, message in errors.items():
                for row in rows.values() if name == "*" else [rows[name]]:
                    row["note"] = (row["note"] + f"; memory: {message}").lstrip("; ")

    _speedups(rows.values(), {impl.name: impl for impl in impls})
    del built, impls, ok
    return list(rows.values())


def _speedups(rows: Iterable[dict[str, Any]], impls: dict[str, Impl]) -> None:
    rows = [row for row in rows if row.get("median_ms")]
    ours = {row["backend"]: row["median_ms"] for row in rows if row["kind"] == "mmattn"}
    anchors = {row["impl"]: row["median_ms"] for row in rows
               if row["kind"] == "anchor" and impls[row["impl"]].comparable}
    best = min(anchors, key=anchors.get) if anchors else None  # type: ignore[arg-type]
    for row in rows:
        if row["kind"] == "anchor":
            for backend, ms in ours.items():
                row[f"speedup_{backend}"] = row["median_ms"] / ms
        elif best is not None:
            row["best_anchor"] = best
            row["speedup_vs_best_anchor"] = anchors[best] / row["median_ms"]


# ---- the run -----------------------------------------------------------------------------

def family_module(family: str) -> Any:
    return importlib.import_module(FAMILIES[family])


def collect_cases(selection: Selection) -> list[Case]:
    """The selected cases of every family, merged when two sweeps share a case."""
    merged: dict[tuple[str, str], Case] = {}
    for family in FAMILIES:
        module = family_module(family)
        if not any(selection.wants_op(op) for op in module.OPS):
            continue
        for case in module.cases(selection):
            if not selection.wants_op(case.op):
                continue
            if selection.sweeps is not None and not set(case.sweeps) & set(selection.sweeps):
                continue
            if case.key() in merged:
                existing = merged[case.key()]
                existing.sweeps += [s for s in case.sweeps if s not in existing.sweeps]
                existing.headline |= case.headline
            else:
                merged[case.key()] = case
    return list(merged.values())


def progress(items: Sequence[Case], desc: str) -> Iterable[tuple[Case, Callable[[str], None]]]:
    """Yields (case, note); a tqdm bar on stderr (a plain line per case without tqdm)."""
    try:
        from tqdm import tqdm
    except ImportError:
        for i, item in enumerate(items):
            print(f"[{desc} {i + 1}/{len(items)}] {item.op} {item.label}", file=sys.stderr,
                  flush=True)
            yield item, lambda _text: None
        return
    bar = tqdm(items, desc=desc, unit="case", file=sys.stderr, dynamic_ncols=True,
               mininterval=0.5)
    for item in bar:
        bar.set_postfix_str(f"{item.op} {item.label}"[:60], refresh=False)
        yield item, bar.write


def run(selection: Selection, cases: Sequence[Case] | None = None,
        env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run the selected cases; returns the rows (see ``COLUMNS``). ``env`` (default: now)
    is what the rows record of the machine and the code (take it before anything else
    runs, so the git sha is the one measured)."""
    if selection.threads:
        torch.set_num_threads(selection.threads)
    cases = collect_cases(selection) if cases is None else cases
    env = environment(selection.device) if env is None else env
    worker = (MemoryWorker() if selection.device == "cpu" and selection.preset.memory
              and selection.memory else None)
    rows: list[dict[str, Any]] = []
    try:
        for case, _write in progress(cases, selection.preset.name):
            rows.extend(run_case(case, selection, env, worker))
            gc.collect()
            if selection.device == "cuda":
                torch.cuda.empty_cache()
    finally:
        if worker is not None:
            worker.close()
    return rows
