"""Standing guards of issue 11: the CPU kernels are bitwise deterministic run to run; what
changes across thread counts is documented and bounded; modules run from several Python
threads at once (one of them inside ``use_backend``) give the serial results."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

import mmattn
from mmattn import BlockMask, SparseLayout
from mmattn._extension import has_kernel

pytestmark = pytest.mark.skipif(not has_kernel("fused_attention_fwd", "CPU"),
                                reason="mmattn._C with the CPU kernels is not built")


def _attention(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0,
               **kwargs) -> list[torch.Tensor]:
    """out, lse and (dq, dk, dv[, d_mask]) of one cpu call, inputs drawn from ``seed``."""
    b, hq, hkv, lq, lk, d, dv = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(b, hkv, lk, d, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(b, hkv, lk, dv, generator=gen).to(dtype).requires_grad_()
    leaves = [q, k, v]
    mask = kwargs.pop("float_mask", None)
    if mask is not None:
        mask = mask.detach().requires_grad_()
        leaves.append(mask)
    out, lse = mmattn.cross_attention(q, k, v, attn_mask=mask, return_lse=True, backend="cpu",
                                      **kwargs)
    grad = torch.randn(out.shape, generator=gen).to(dtype)
    return [out, lse, *torch.autograd.grad(out, leaves, grad)]


CASES = {
    "causal-dropout-gqa": (torch.float32, (2, 4, 2, 97, 130, 32, 24),
                           dict(is_causal=True, dropout_p=0.2, dropout_seed=3)),
    "bf16-float-mask": (torch.bfloat16, (2, 2, 1, 65, 77, 64, 64),
                        dict(float_mask=torch.randn(1, 2, 65, 1))),
    "block-mask": (torch.float32, (1, 2, 2, 150, 250, 16, 24),
                   dict(block_mask=BlockMask.local_window((150, 250), (16, 32), 40))),
    # one (batch, kv head) pair: the backward splits the keys into chunks
    "key-split": (torch.float32, (1, 3, 1, 90, 3000, 16, 16), {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cpu_attention_is_bitwise_deterministic_run_to_run(name):
    dtype, shape, kwargs = CASES[name]
    first = _attention(dtype, shape, **dict(kwargs))
    for _ in range(2):
        again = _attention(dtype, shape, **dict(kwargs))
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(CASES))
def test_cpu_attention_across_thread_counts(name):
    """Documented (mmattn.backends.cpu): the forward and dk/dv do not depend on the thread
    count; dq does only when the backward splits keys (fewer (batch, kv head) pairs than
    2 x threads, not a multiple of them): then the per-chunk dq partials are summed in
    another grouping -- a difference of rounding, not of result."""
    dtype, shape, kwargs = CASES[name]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _attention(dtype, shape, **dict(kwargs))
        torch.set_num_threads(4)
        four = _attention(dtype, shape, **dict(kwargs))
    finally:
        torch.set_num_threads(threads)
    pairs = shape[0] * shape[2]  # (batch, kv head) pairs
    splits = pairs < 2 * 4 and pairs % 4 != 0  # with 4 threads (1 thread never splits)
    assert splits or name != "key-split"
    for index, (a, b) in enumerate(zip(one, four, strict=True)):
        if splits and index == 2:  # dq
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b), index


def _ws(dtype: torch.dtype, threads: int | None = None) -> list[torch.Tensor]:
    layout = SparseLayout.from_watts_strogatz(300, 257, 6, 0.3, seed=1, block_size=1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(33, 257, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(layout.nnz, generator=gen).to(dtype).requires_grad_()
    bias = torch.randn(300, generator=gen).to(dtype).requires_grad_()
    before = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        y = mmattn.ws_linear(x, w, layout, bias, backend="cpu")
        grads = torch.autograd.grad(y, (x, w, bias), torch.randn(y.shape, generator=gen)
                                    .to(dtype))
    finally:
        torch.set_num_threads(before)
    return [y, *grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_ws_linear_is_bitwise_deterministic_for_any_thread_count(dtype):
    first = _ws(dtype)
    for threads in (None, 1, 4):
        for a, b in zip(first, _ws(dtype, threads), strict=True):
            assert torch.equal(a, b)


# ---- thread safety -------------------------------------------------------------------------

class _Model(torch.nn.Module):
    """Cross-modal attention, then a WS sparse projection: both op families."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = mmattn.nn.CrossModalAttention(32, 24, 20, 4, dropout=0.0)
        self.project = mmattn.nn.WSLinear(32, 48, k=4, beta=0.3, seed=0)

    def forward(self, query, key, value, block_mask):
        out, _ = self.attention(query, key, value, need_weights=False, block_mask=block_mask)
        return self.project(out)


def _inputs(index: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(100 + index)
    lq, lk = 37 + 8 * index, 53 + 16 * index
    return (torch.randn(2, lq, 32, generator=gen).requires_grad_(),
            torch.randn(2, lk, 24, generator=gen).requires_grad_(),
            torch.randn(2, lk, 20, generator=gen), lq, lk)


def _step(model: _Model, index: int) -> list[torch.Tensor]:
    query, key, value, lq, lk = _inputs(index)
    block_mask = BlockMask.causal((lq, lk), 16) if index % 2 else None
    out = model(query, key, value, block_mask)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(out.pow(2).sum(), [query, key, *params])
    return [out.detach(), *grads]


def _run_threads(work: Callable[[int], None], count: int) -> None:
    errors: list[BaseException] = []

    def guarded(index: int) -> None:
        try:
            work(index)
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]


def test_module_forward_backward_from_four_threads_equals_serial():
    """Four threads run forward+backward of one module at once, thread 0 inside
    ``use_backend("reference")``; each gets what it gets alone. The mmattn kernels are
    deterministic; the module's nn.Linear matmuls may block differently when the
    threads share the intra-op pool, hence a float32 tolerance on the module results."""
    torch.manual_seed(0)
    model = _Model().eval()

    def backend(index: int):
        return mmattn.use_backend("reference" if index == 0 else None)

    serial = []
    for index in range(4):
        with backend(index):
            serial.append(_step(model, index))
    results: dict[tuple[int, int], list[torch.Tensor]] = {}
    barrier = threading.Barrier(4)

    def work(index: int) -> None:
        barrier.wait(60)
        with backend(index):
            for repeat in range(3):
                results[(index, repeat)] = _step(model, index)

    _run_threads(work, 4)
    assert len(results) == 12
    for (index, _), got in results.items():
        for a, b in zip(got, serial[index], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_functional_ops_from_four_threads_are_bitwise_serial():
    """The ops alone (no BLAS around them) from four threads: bitwise the serial results,
    thread 0 forcing the reference backend while the others run the C++ kernels."""
    layout = SparseLayout.from_mask(torch.rand(64, 48, generator=torch.Generator()
                                               .manual_seed(0)) < 0.3)

    def step(index: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(index)
        q = torch.randn(2, 4, 61, 16, generator=gen).requires_grad_()
        k = torch.randn(2, 2, 77, 16, generator=gen).requires_grad_()
        v = torch.randn(2, 2, 77, 48, generator=gen).requires_grad_()
        w = torch.randn(layout.nnz, generator=gen).requires_grad_()
        with mmattn.use_backend("reference" if index == 0 else None):
            out = mmattn.cross_attention(q, k, v, is_causal=True, dropout_p=0.1,
                                         dropout_seed=index)
            y = mmattn.ws_linear(out, w, layout)
            grads = torch.autograd.grad(y.pow(2).sum(), (q, k, v, w))
        return [y.detach(), *grads]

    serial = [step(i) for i in range(4)]
    results: dict[tuple[int, int], list[torch.Tensor]] = {}
    barrier = threading.Barrier(4)

    def work(index: int) -> None:
        barrier.wait(60)
        for repeat in range(5):
            results[(index, repeat)] = step(index)

    _run_threads(work, 4)
    assert len(results) == 20
    for (index, _), got in results.items():
        for a, b in zip(got, serial[index], strict=True):
            assert torch.equal(a, b)
