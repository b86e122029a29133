"""One rank of the context-parallel checks in test_distributed.py (run as a script).

Environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (torch.distributed's env://).
Argument: the directory each rank writes ``rank<r>.pt`` to: per case, this rank's
output, lse and the gradients of its q, k, v chunks.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

B, HQ, HKV, D, DV = 2, 4, 2, 8, 6


def _chunks(length: int, world: int, skew: bool) -> list[int]:
    """Chunk lengths in rank order; ``skew`` makes them unequal, rank 1's empty."""
    base = [len(c) for c in torch.arange(length).tensor_split(world)]
    if skew and world > 1:
        base[0] += base[1]
        base[1] = 0
    return base


def cases(world: int) -> dict[str, dict]:
    """Whole-sequence inputs of every case and how they are chunked over ``world`` ranks."""
    gen = torch.Generator().manual_seed(world)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    out = {}
    # cross-modal: 10 queries over 13 keys, unequal chunks, padding, float mask, GQA
    lq, lk = 10, 13
    padding = torch.zeros(B, lk, dtype=torch.bool)
    padding[1, 4:] = True  # batch 1 sees only its first 4 keys: later chunks are empty
    float_mask = randn(B, 1, lq, lk)
    float_mask[0, 0, 3] = -math.inf  # a query row that sees no key at all
    out["cross"] = {"q": randn(B, HQ, lq, D), "k": randn(B, HKV, lk, D),
                    "v": randn(B, HKV, lk, DV), "q_chunks": _chunks(lq, world, True),
                    "k_chunks": _chunks(lk, world, False),
                    "kwargs": {"key_padding_mask": padding, "attn_mask": float_mask}}
    # causal self-attention over one 12-token sequence, equal chunks (the usual layout)
    length = 12
    x = [randn(B, HQ, length, D), randn(B, HKV, length, D), randn(B, HKV, length, DV)]
    chunks = _chunks(length, world, False)
    out["causal"] = {"q": x[0], "k": x[1], "v": x[2], "q_chunks": chunks, "k_chunks": chunks,
                     "kwargs": {"is_causal": True}}
    # causal with query and key chunks that do not line up, and a bool mask
    visible = torch.rand(1, HQ, length, length, generator=gen) > 0.2
    out["causal-misaligned"] = {"q": x[0], "k": x[1], "v": x[2],
                                "q_chunks": _chunks(length, world, True), "k_chunks": chunks,
                                "kwargs": {"is_causal": True, "attn_mask": visible}}
    return out


def upstream(lq: int, dv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the whole output ``(B, HQ, lq, dv)`` and lse ``(B, HQ, lq)`` that
    every check back-propagates (each rank takes its rows)."""
    gen = torch.Generator().manual_seed(11)
    return torch.randn(B, HQ, lq, dv, generator=gen), torch.randn(B, HQ, lq, generator=gen)


def loss_of(out: torch.Tensor, lse: torch.Tensor, g_out: torch.Tensor,
            g_lse: torch.Tensor) -> torch.Tensor:
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return (out * g_out).sum() + (finite * g_lse).sum()


def _rows(t: torch.Tensor, chunks: list[int], rank: int, dim: int) -> torch.Tensor:
    start = sum(chunks[:rank])
    return t.narrow(dim, start, chunks[rank])


def main(out_dir: str) -> None:
    from mmattn.distributed import context_parallel_attention

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name, case in cases(world).items():
        qc, kc = case["q_chunks"], case["k_chunks"]
        q = _rows(case["q"], qc, rank, 2).clone().requires_grad_()
        k = _rows(case["k"], kc, rank, 2).clone().requires_grad_()
        v = _rows(case["v"], kc, rank, 2).clone().requires_grad_()
        kwargs = dict(case["kwargs"])
        if "key_padding_mask" in kwargs:
            kwargs["key_padding_mask"] = _rows(kwargs["key_padding_mask"], kc, rank, 1)
        if "attn_mask" in kwargs:  # this rank's query rows, every key
            kwargs["attn_mask"] = _rows(kwargs["attn_mask"], qc, rank, 2)
        out, lse = context_parallel_attention(q, k, v, return_lse=True, **kwargs)
        g_out, g_lse = upstream(sum(qc), case["v"].shape[-1])
        loss_of(out, lse, _rows(g_out, qc, rank, 2), _rows(g_lse, qc, rank, 2)).backward()
        results[name] = {"out": out.detach(), "lse": lse.detach(), "dq": q.grad,
                         "dk": k.grad, "dv": v.grad}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
