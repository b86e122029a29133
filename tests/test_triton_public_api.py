"""``MMATTN_BACKEND=triton`` with ``TRITON_INTERPRET=1``: the whole public API (functional
ops, nn modules, convert) runs on CPU tensors through the Triton kernels.

Runs in a subprocess, because both variables are read once, at import. A converted seed
model (examples/seed_models.py) must give the outputs and parameter gradients of the
unconverted one (PyTorch ops), and every attention / ws_linear call must have gone to
the triton backend.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mmattn.backends import triton as triton_backend

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import copy
    import sys

    import torch

    sys.path.insert(0, {examples!r})
    import seed_models

    import mmattn
    from mmattn.backends import triton as triton_backend

    assert mmattn.dispatch.forced_backend() == "triton" and triton_backend.INTERPRET
    calls = {{"attention_forward": 0, "attention_backward": 0, "ws_linear_forward": 0,
              "ws_linear_backward": 0}}
    for name in calls:
        original = getattr(triton_backend, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        setattr(triton_backend, name, counted)

    def compare(model, reference, run):
        out, ref = run(model), run(reference)
        torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
        out.pow(2).sum().backward()
        ref.pow(2).sum().backward()
        grads = {{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}
        ref_grads = {{n: p.grad for n, p in reference.named_parameters()
                      if p.grad is not None}}
        assert grads and grads.keys() == ref_grads.keys(), (grads.keys(), ref_grads.keys())
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, n=n: f"{{n}}: {{m}}")

    torch.manual_seed(0)
    # seed 000: CrossModalAttention x3 with a float mask, attention weights returned
    reference = seed_models.MultimodalFusionModel(12, 10, 8, 16, 4, 5).eval()
    model = copy.deepcopy(reference)
    assert len(mmattn.convert(model)) == 3
    visual, audio, text = torch.randn(2, 9, 12), torch.randn(2, 9, 10), torch.randn(2, 4, 8)
    mask = torch.ones(1, 1, 1, 9)
    mask[..., 3] = 0
    compare(model, reference, lambda m: m(visual, audio, text, mask)[0])
    weights = model(visual, audio, text, mask)[1]
    ref_weights = reference(visual, audio, text, mask)[1]
    for w, rw in zip(weights, ref_weights, strict=True):
        torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)

    # seed 001: nn.MultiheadAttention blocks (self and cross attention)
    reference = seed_models.MultimodalTransformer(16, 4, 2).eval()
    model = copy.deepcopy(reference)
    assert len(mmattn.convert(model)) == 4
    a, b = torch.randn(6, 2, 16), torch.randn(9, 2, 16)
    compare(model, reference, lambda m: m(a, b))

    # seed 002: Watts-Strogatz fusion -> mmattn.nn.WSMultiModalFusion (ws_linear)
    reference = seed_models.WSMultiModalFusion(3, 8, k=4, beta=0.3).eval()
    model = torch.nn.Sequential(copy.deepcopy(reference))
    assert len(mmattn.convert(model)) == 1
    features = [torch.randn(5, 8) for _ in range(3)]
    out = model(features)
    torch.testing.assert_close(out, reference(features), rtol=1e-5, atol=1e-5)
    out.pow(2).sum().backward()
    assert any(p.grad is not None for p in model.parameters())

    assert all(calls.values()), calls
    print("calls", calls)
""")


@pytest.mark.skipif(not triton_backend.INSTALLED, reason="triton is not installed")
def test_converted_seed_models_run_through_the_triton_interpreter():
    env = dict(os.environ, MMATTN_BACKEND="triton", TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c",
                             SCRIPT.format(examples=str(ROOT / "examples"))],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "calls" in result.stdout


def test_info_lists_the_triton_kernels():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "mmattn.info"], capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    if not triton_backend.INSTALLED:
        assert "triton is not installed" in result.stdout
        return
    for op, text in triton_backend.KERNELS:
        assert f"{op:<10} {text}" in result.stdout
    assert "kernels/attention.py" in result.stdout and "kernels/ws_linear.py" in result.stdout
