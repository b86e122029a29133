"""Backend choice, input validation, custom-op registration, opcheck and torch.compile."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import mmattn
from mmattn import dispatch
from mmattn._extension import extension_loaded, has_kernel
from mmattn.layout import SparseLayout


def _qkv(dtype=torch.float32, requires_grad=False):
    q = torch.randn(2, 4, 5, 8, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(2, 2, 6, 8, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(2, 2, 6, 3, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


# ---- backend choice ------------------------------------------------------------------------

def test_forced_backend_that_cannot_run_names_the_reason():
    q, k, v = _qkv(torch.float64)
    with pytest.raises(mmattn.BackendUnavailableError, match="cuda"):
        mmattn.cross_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        mmattn.cross_attention(q, k, v, backend="tpu")


def test_context_manager_forces_and_argument_wins():
    q, k, v = _qkv(torch.float64)
    with mmattn.use_backend("cuda"):
        assert dispatch.forced_backend() == "cuda"
        with pytest.raises(mmattn.BackendUnavailableError):
            mmattn.cross_attention(q, k, v)
        out = mmattn.cross_attention(q, k, v, backend="reference")
        with mmattn.use_backend(None):
            assert dispatch.forced_backend() is None
            mmattn.cross_attention(q, k, v)
    assert dispatch.forced_backend() is None
    assert out.shape == (2, 4, 5, 3)
    with pytest.raises(ValueError, match="use_backend"):
        with mmattn.use_backend("gpu"):
            pass


def test_auto_choice_never_raises_and_resolves_for_cpu():
    chosen = dispatch.resolve_backend("x", torch.device("cpu"), None, lambda b: None)
    assert chosen == "cpu"
    only_ref = dispatch.resolve_backend(
        "x", torch.device("cpu"), None, lambda b: None if b == "reference" else "no")
    assert only_ref == "reference"
    cuda_order = []
    dispatch.resolve_backend("x", torch.device("cuda"), None,
                             lambda b: cuda_order.append(b) or "no")
    # the CUDA C++ kernels come first only once they have passed the GPU tests
    from mmattn.backends import cuda as cuda_backend

    expected = (["cuda", "triton", "reference"] if cuda_backend.VERIFIED_ON_HARDWARE
                else ["triton", "cuda", "reference"])
    assert cuda_order == expected


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_environment_variable_forces_a_backend():
    code = ("import torch, mmattn\n"
            "from mmattn import dispatch\n"
            "print(dispatch.forced_backend())\n"
            "q = torch.randn(1, 1, 2, 4)\n"
            "try:\n"
            "    mmattn.cross_attention(q, q, q)\n"
            "except mmattn.BackendUnavailableError as e:\n"
            "    print('raised', e)\n")
    result = _run(code, MMATTN_BACKEND="cuda")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("cuda") and "raised" in result.stdout
    bad = _run("import mmattn", MMATTN_BACKEND="nope")
    assert bad.returncode != 0 and "MMATTN_BACKEND must be one of" in bad.stderr


def test_missing_extension_warns_once_and_falls_back(tmp_path):
    # Shadow the compiled module with one that fails to import.
    pkg = tmp_path / "shadow"
    pkg.mkdir()
    code = ("import sys, warnings, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'mmattn._C':\n"
            "            raise ImportError('simulated missing extension')\n"
            "sys.meta_path.insert(0, Block())\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    import torch, mmattn\n"
            "    q = torch.randn(1, 1, 3, 4)\n"
            "    mmattn.cross_attention(q, q, q); mmattn.cross_attention(q, q, q)\n"
            "msgs = [str(w.message) for w in caught if 'mmattn._C' in str(w.message)]\n"
            "print(len(msgs)); print(msgs[0])\n")
    result = _run(code)
    assert result.returncode == 0, result.stderr
    count, message = result.stdout.splitlines()[:2]
    assert count == "1" and "simulated missing extension" in message


# ---- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    ({"attn_mask": torch.ones(3, 3, dtype=torch.bool)}, ValueError, "does not broadcast"),
    ({"attn_mask": torch.ones(5, 6, dtype=torch.int32)}, TypeError, "bool"),
    ({"key_padding_mask": torch.zeros(2, 5, dtype=torch.bool)}, ValueError, "key_padding_mask"),
    ({"key_padding_mask": torch.zeros(2, 6)}, TypeError, "key_padding_mask"),
    ({"dropout_p": 1.5}, ValueError, "dropout_p"),
    ({"dropout_p": 0.1, "dropout_seed": -3}, ValueError, "dropout_seed"),
    ({"scale": float("nan")}, ValueError, "scale"),
    ({"block_mask": object()}, TypeError, "block_mask"),
])
def test_bad_arguments_raise_clear_errors(kwargs, exc, match):
    q, k, v = _qkv()
    with pytest.raises(exc, match=match):
        mmattn.cross_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"dropout_p": True}, TypeError, "^dropout_p"),
    ({"scale": True}, TypeError, "^scale"),
    ({"scale": "1"}, TypeError, "^scale"),
    ({"is_causal": "yes"}, TypeError, "^is_causal"),
    ({"is_causal": 1}, TypeError, "^is_causal"),
    ({"return_weights": "no"}, TypeError, "^return_weights"),
    ({"return_lse": None}, TypeError, "^return_lse"),
    ({"dropout_p": 0.1, "dropout_seed": True}, TypeError, "^dropout_seed"),
    ({"dropout_p": 0.1, "dropout_seed": 3.0}, TypeError, "^dropout_seed"),
    ({"dropout_p": 0.1, "dropout_seed": torch.tensor(3.7)}, TypeError, "^dropout_seed"),
    ({"dropout_p": 0.1, "dropout_seed": torch.tensor(True)}, TypeError, "^dropout_seed"),
    ({"dropout_p": 0.1, "dropout_seed": torch.tensor(-5)}, ValueError, "^dropout_seed"),
    ({"dropout_p": 0.1, "dropout_seed": torch.tensor([1, 2])}, ValueError, "^dropout_seed"),
    ({"dropout_p": 0.1, "dropout_seed": 2**63}, ValueError, "^dropout_seed"),
    ({"dropout_seed": "x"}, TypeError, "^dropout_seed"),  # checked without dropout too
    ({"attn_mask": torch.zeros(5, 6).to_sparse()}, TypeError, "^attn_mask must be a dense"),
    ({"attn_mask": torch.zeros(2, 4, 5, 6).to_mkldnn()}, TypeError, "^attn_mask must be a dense"),
    ({"key_padding_mask": torch.zeros(2, 6, dtype=torch.bool).to_sparse()}, TypeError,
     "^key_padding_mask must be a dense"),
])
def test_loose_arguments_raise_errors_naming_them(kwargs, exc, match):
    """Issue 11 item 7: each raises a TypeError/ValueError naming the argument."""
    q, k, v = _qkv()
    with pytest.raises(exc, match=match):
        mmattn.cross_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("kind", ["sparse", "mkldnn", "nested", "jagged"])
def test_non_dense_tensors_raise_errors_naming_them(name, kind):
    tensors = dict(zip("qkv", _qkv(), strict=True))
    t = tensors[name]
    if kind == "sparse":
        t = t.to_sparse()
    elif kind == "mkldnn":
        t = t.to_mkldnn()
    else:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nested tensors are a prototype API
            layout = torch.jagged if kind == "jagged" else torch.strided
            t = torch.nested.nested_tensor(list(t), layout=layout)
    tensors[name] = t
    with pytest.raises(TypeError, match=f"^{name} must be a dense"):
        mmattn.cross_attention(**tensors)


def test_numpy_scalars_are_accepted():
    np = pytest.importorskip("numpy")
    q, k, v = _qkv(torch.float64)
    expected = mmattn.cross_attention(q, k, v, scale=0.25, dropout_p=0.5, dropout_seed=3,
                                      is_causal=True)
    ours = mmattn.cross_attention(q, k, v, scale=np.float32(0.25), dropout_p=np.float32(0.5),
                                  dropout_seed=np.int64(3), is_causal=np.bool_(True))
    torch.testing.assert_close(ours, expected)
    seeded = mmattn.cross_attention(q, k, v, dropout_p=np.float64(0.5),
                                    dropout_seed=torch.tensor(3, dtype=torch.int32))
    torch.testing.assert_close(seeded, mmattn.cross_attention(q, k, v, dropout_p=0.5,
                                                              dropout_seed=3))


def test_block_mask_on_the_meta_device_raises_naming_it():
    block_mask = mmattn.BlockMask.causal((5, 6), 4)
    with pytest.raises(ValueError, match=r"^device is on the meta device"):
        block_mask.to("meta")
    with pytest.raises(ValueError, match=r"^mask is on the meta device"):
        mmattn.BlockMask.from_dense_mask(torch.ones(5, 6, dtype=torch.bool, device="meta"), 4)
    with pytest.raises(ValueError, match=r"^layout is on the meta device"):
        mmattn.BlockMask.from_layout(torch.ones(2, 2, dtype=torch.bool, device="meta"), (5, 6),
                                     4)
    q, k, v = (t.to("meta") for t in _qkv())
    with pytest.raises(ValueError, match=r"^block_mask"):
        mmattn.cross_attention(q, k, v, block_mask=block_mask)


def test_watts_strogatz_block_mask_names_k():
    with pytest.raises(ValueError, match=r"^k must be <= the number of key blocks .* = 4"):
        mmattn.BlockMask.watts_strogatz(16, 4, 6, 0.1)
    with pytest.raises(ValueError, match=r"^k must be <= the number of key blocks .* = 2"):
        mmattn.BlockMask.watts_strogatz((16, 8), 4, 4, 0.1)


def test_ws_linear_arguments_raise_errors_naming_them():
    layout = SparseLayout.from_mask(torch.rand(4, 6) < 0.5)
    x, weight = torch.randn(3, 6), torch.randn(layout.nnz)
    for args, exc, match in [
        (([1.0], weight, layout), TypeError, "^x must be a torch.Tensor"),
        ((x.to_sparse(), weight, layout), TypeError, "^x must be a dense"),
        ((x, [1.0], layout), TypeError, "^weight must be a torch.Tensor"),
        ((x, weight.to_sparse(), layout), TypeError, "^weight must be a dense"),
        ((x, weight, layout, [0.0] * 4), TypeError, "^bias must be a torch.Tensor"),
        ((x, weight, layout, torch.zeros(4).to_sparse()), TypeError, "^bias must be a dense"),
        ((x, weight, "layout"), TypeError, "^layout must be"),
    ]:
        with pytest.raises(exc, match=match):
            mmattn.ws_linear(*args)


def test_bad_tensors_raise_clear_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="4-D"):
        mmattn.cross_attention(q[0], k, v)
    with pytest.raises(TypeError, match="one dtype"):
        mmattn.cross_attention(q, k.double(), v)
    with pytest.raises(TypeError, match="float32"):
        mmattn.cross_attention(q.int(), k.int(), v.int())
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        mmattn.cross_attention(torch.randn(2, 3, 5, 8), k, v)
    with pytest.raises(ValueError, match="same length"):
        mmattn.cross_attention(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match="head_dim"):
        mmattn.cross_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="batch"):
        mmattn.cross_attention(q[:1], k, v)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        mmattn.cross_attention([1.0], k, v)


def test_block_mask_accepts_objects_with_to_dense():
    q, k, v = _qkv(torch.float64)

    class Dense:
        def __init__(self, mask):
            self.mask = mask

        def to_dense(self):
            return self.mask

    mask = torch.rand(5, 6) > 0.4
    ours = mmattn.cross_attention(q, k, v, block_mask=Dense(mask))
    torch.testing.assert_close(ours, mmattn.cross_attention(q, k, v, attn_mask=mask))
    float_mask = torch.randn(5, 6, dtype=torch.float64)
    combined = mmattn.cross_attention(q, k, v, attn_mask=float_mask, block_mask=Dense(mask))
    expected = mmattn.cross_attention(
        q, k, v, attn_mask=float_mask.masked_fill(~mask, float("-inf")))
    torch.testing.assert_close(combined, expected)


# ---- registration, opcheck, compile ------------------------------------------------------

def test_extension_registers_cpu_and_cuda_kernels():
    assert extension_loaded()
    assert has_kernel("philox_uniform", "CPU")
    from mmattn import _build_info

    if _build_info.CUDA_COMPILED:
        assert has_kernel("philox_uniform", "CUDA")
        assert {"sm_80", "sm_90"} <= set(_build_info.CUDA_ARCHS)


def test_kernels_package_is_importable_as_mmattn_kernels():
    import mmattn.kernels

    assert mmattn.kernels.__name__ == "mmattn.kernels"
    assert os.path.basename(os.path.dirname(mmattn.kernels.__file__)) == "kernels"


def test_info_reports_backends():
    result = subprocess.run([sys.executable, "-m", "mmattn.info"], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "cpu        built, usable" in text
    assert "triton     interpreter available" in text
    from mmattn import _build_info

    if _build_info.CUDA_COMPILED and not torch.cuda.is_available():
        assert "not runnable here: no CUDA GPU visible" in text
        assert "sm_80" in text and "sm_90" in text
    if _build_info.CUDA_COMPILED:
        from mmattn.backends import cuda

        state = "verified on GPU hardware" if cuda.VERIFIED_ON_HARDWARE else "not yet verified"
        assert state in text


def test_opcheck_attention_ops():
    q, k, v = _qkv(requires_grad=True)
    mask = torch.rand(2, 4, 5, 6) > 0.3
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    seed = torch.tensor(3, dtype=torch.int64)
    args = (q, k, v, mask, kpm, False, 0.2, 0.35, seed, True, False, "reference")
    torch.library.opcheck(torch.ops.mmattn.attention_forward.default, args)
    out, lse, _, _ = torch.ops.mmattn.attention_forward(*args)
    grad = torch.randn_like(out)
    bwd_args = (grad, None, None, q.detach(), k.detach(), v.detach(), out.detach(),
                lse.detach(), mask, kpm, False, 0.2, 0.35, seed, False, "reference")
    torch.library.opcheck(torch.ops.mmattn.attention_backward.default, bwd_args)
    bwd_args = (grad, None, torch.randn_like(lse), *bwd_args[3:])
    torch.library.opcheck(torch.ops.mmattn.attention_backward.default, bwd_args)


def test_opcheck_ws_linear_and_philox():
    mask = torch.rand(6, 9) > 0.6
    layout = SparseLayout.from_mask(mask)
    x = torch.randn(4, 9, requires_grad=True)
    values = torch.randn(layout.nnz, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    torch.library.opcheck(torch.ops.mmattn.ws_linear.default,
                          (x, values, *layout.index_tensors(), 6, 1, bias, "reference"))
    c0 = torch.arange(10, dtype=torch.int32)
    torch.library.opcheck(torch.ops.mmattn.philox_uniform.default, (c0, c0, 5))
    torch.library.opcheck(torch.ops.mmattn.philox_uniform.default, (c0, c0, 5, c0))


def test_torch_compile_fullgraph_matches_eager():
    q, k, v = _qkv()
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[0, -2:] = True

    def layer(q, k, v):
        out = mmattn.cross_attention(q * 2, k, v, key_padding_mask=kpm, is_causal=True)
        return out.relu().sum(-1)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), layer(q, k, v))
    q2, k2, v2 = (t.clone().requires_grad_() for t in (q, k, v))
    compiled(q2, k2, v2).sum().backward()
    q3, k3, v3 = (t.clone().requires_grad_() for t in (q, k, v))
    layer(q3, k3, v3).sum().backward()
    for a, b in ((q2, q3), (k2, k3), (v2, v3)):
        torch.testing.assert_close(a.grad, b.grad)


def test_torch_compile_inductor_with_dropout():
    q, k, v = _qkv()

    def layer(q, k, v):
        return mmattn.cross_attention(q, k, v, dropout_p=0.25, dropout_seed=9).sum()

    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), layer(q, k, v))


def test_unused_weights_do_not_reach_the_backward_as_zeros(monkeypatch):
    from mmattn import ops

    seen = []
    original = ops._attention_backward_impl

    def spy(grad_out, grad_weights, *rest):
        seen.append(grad_weights)
        return original(grad_out, grad_weights, *rest)

    monkeypatch.setattr(ops, "_attention_backward_impl", spy)
    q, k, v = _qkv(requires_grad=True)
    out, weights = mmattn.cross_attention(q, k, v, return_weights=True)
    out.sum().backward()
    assert seen == [None]
    q.grad = None
    out, weights = mmattn.cross_attention(q, k, v, return_weights=True)
    weights.sum().backward()  # only the weights are used: out's gradient is None
    assert seen[-1] is not None and torch.isfinite(q.grad).all()


def test_compiled_backward_with_strided_inputs():
    # Heads as a transposed view of a (B, L, E) projection, as in nn.MultiheadAttention:
    # the gradient flows back through view(), which needs the layout the fake promised.
    base = torch.randn(2, 5, 32, requires_grad=True)

    def layer(x):
        q = x.view(2, 5, 4, 8).transpose(1, 2)
        return mmattn.cross_attention(q, q, q).sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled(base).backward()
    expected = base.grad.clone()
    base.grad = None
    layer(base).backward()
    torch.testing.assert_close(expected, base.grad)


def test_module_small_plain_calls_run_sdpa_and_others_a_backend(monkeypatch):
    """dispatch.module_call_to_sdpa: a small plain call from an nn module runs
    F.scaled_dot_product_attention; masks, dropout, weights, a backend context or work
    at the limit send it to mmattn's op. Results match torch's module either way."""
    from mmattn import dispatch, ops
    from mmattn.nn import MultiheadAttention

    calls = []
    real = ops.attention
    monkeypatch.setattr(ops, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    ours = MultiheadAttention(16, 2, batch_first=True)
    theirs = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, 16, requires_grad=True)

    def run(**kwargs):
        calls.clear()
        out, _ = ours(x, x, x, **kwargs)
        ref, _ = theirs(x, x, x, **kwargs)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        return len(calls)

    assert run(need_weights=False) == 0
    causal = torch.nn.Transformer.generate_square_subsequent_mask(8)
    assert run(need_weights=False, attn_mask=causal, is_causal=True) == 0
    assert run(need_weights=True) == 1
    assert run(need_weights=False, attn_mask=causal) == 1
    assert run(need_weights=False, key_padding_mask=torch.zeros(2, 8, dtype=torch.bool)) == 1
    with mmattn.use_backend("cpu"):
        assert run(need_weights=False) == 1
    monkeypatch.setattr(dispatch, "MODULE_SDPA_MAX_WORK_GRAD", 2 * 2 * 8 * 8 * 8)
    assert run(need_weights=False) == 1  # work == limit
    ours.dropout = 0.5
    calls.clear()
    ours(x, x, x, need_weights=False)
    assert len(calls) == 1  # mmattn's Philox dropout
