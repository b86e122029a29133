"""mmattn on torch.distributed (gloo, CPU processes), against one process.

* Context-parallel attention (mmattn.distributed) on 2 and 4 processes equals the
  single-process call, forward and backward; see cp_worker.py for the cases
  (cross-modal with unequal and empty chunks, padding, float mask, GQA; causal
  self-attention, aligned and misaligned chunks).
* FSDP2 (fully_shard) on a converted seed model with WSMultiModalFusion and WSLinear,
  2 processes: loss and gradients equal one process; a torch.distributed.checkpoint
  saved after an optimizer step loads into a fresh sharded model (fsdp_worker.py).

Runtime: about 10 s per spawned job on 2 idle cores (process start and imports).
"""

from __future__ import annotations

from pathlib import Path

import cp_worker
import pytest
import torch
from spawn import run_ranks

import mmattn

WORKER = Path(__file__).resolve().parent / "cp_worker.py"
FSDP_WORKER = Path(__file__).resolve().parent / "fsdp_worker.py"


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_equals_single_process(tmp_path: Path, world: int) -> None:
    run_ranks(WORKER, world, [str(tmp_path)])
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name, case in cp_worker.cases(world).items():
        q, k, v = (case[t].clone().requires_grad_() for t in "qkv")
        out, lse = mmattn.cross_attention(q, k, v, return_lse=True, **case["kwargs"])
        g_out, g_lse = cp_worker.upstream(q.shape[2], v.shape[-1])
        cp_worker.loss_of(out, lse, g_out, g_lse).backward()

        def joined(key: str, name=name) -> torch.Tensor:
            return torch.cat([r[name][key] for r in ranks], dim=2)

        torch.testing.assert_close(joined("out"), out, rtol=1e-5, atol=1e-5, msg=name)
        assert torch.equal(torch.isinf(joined("lse")), torch.isinf(lse)), name
        assert torch.isinf(lse).any() or name != "cross"  # an empty row is covered
        finite = torch.isfinite(lse)
        torch.testing.assert_close(joined("lse")[finite], lse[finite], rtol=1e-5, atol=1e-5)
        for key, ref in (("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
            torch.testing.assert_close(joined(key), ref, rtol=1e-4, atol=1e-5,
                                       msg=f"{name} {key}")


def test_needs_a_process_group() -> None:
    from mmattn.distributed import context_parallel_attention

    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        context_parallel_attention(q, q, q)


def test_fsdp2_on_a_converted_seed_model_equals_one_process(tmp_path: Path) -> None:
    import fsdp_worker

    run_ranks(FSDP_WORKER, 2, [str(tmp_path)])
    result = torch.load(tmp_path / "fsdp.pt")
    model = fsdp_worker.build()
    loss = fsdp_worker.loss_of(model, *fsdp_worker.batch())
    loss.backward()
    torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    names = {name for name, _ in model.named_parameters()}
    assert set(result["grads"]) == names and "fusion.weight" in names
    for name, p in model.named_parameters():
        torch.testing.assert_close(result["grads"][name], p.grad, rtol=1e-5, atol=1e-6,
                                   msg=name)
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    # the fresh model loaded from the distributed checkpoint holds the trained weights
    for name, p in model.named_parameters():
        torch.testing.assert_close(result["params_after_step"][name], p.detach(), rtol=1e-5,
                                   atol=1e-6, msg=name)
