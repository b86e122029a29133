"""One rank of the 2-process DDP check in test_nn_ddp.py (run as a script).

Environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (torch.distributed's env://).
Argument: the file rank 0 writes its gradients to.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import mmattn

GLOBAL_BATCH = 4


class TinyFusion(nn.Module):
    """Seed-000-style fusion: cross-modal attention, self-attention, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.cross = mmattn.nn.CrossModalAttention(16, 12, 12, 4, dropout=0.0)
        self.self_attn = mmattn.nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        fused, _ = self.cross(text, image, image)
        fused, _ = self.self_attn(fused, fused, fused, need_weights=False)
        return self.head(fused.mean(dim=1))


def build() -> tuple[TinyFusion, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The model (same weights on every rank) and the global batch (text, image, labels)."""
    torch.manual_seed(0)
    model = TinyFusion()
    text, image = torch.randn(GLOBAL_BATCH, 5, 16), torch.randn(GLOBAL_BATCH, 9, 12)
    labels = torch.randint(0, 3, (GLOBAL_BATCH,))
    return model, (text, image, labels)


def loss_of(model: nn.Module, text: torch.Tensor, image: torch.Tensor,
            labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(text, image), labels)


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, (text, image, labels) = build()
    ddp = nn.parallel.DistributedDataParallel(model)
    shard = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    loss_of(ddp, text[shard], image[shard], labels[shard]).backward()
    if rank == 0:
        torch.save({name: p.grad for name, p in model.named_parameters()}, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.devnull)
