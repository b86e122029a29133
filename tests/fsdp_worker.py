"""One rank of the FSDP2 check in test_distributed.py (run as a script).

A model assembled from seed 002's modules (cross-modal nn.MultiheadAttention blocks and
the dense-masked WSMultiModalFusion) plus a WSLinear head, converted by mmattn.convert,
sharded with torch.distributed.fsdp.fully_shard (FSDP2) over gloo. Each rank trains on
its half of the global batch; rank 0 writes the loss, the full gradients, and the full
parameters of a fresh model loaded from the torch.distributed.checkpoint the ranks saved
after one SGD step.

Environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT. Argument: an output directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import mmattn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import seed_models  # examples/: the seed documents' classes

GLOBAL_BATCH, WIDTH = 4, 16


class SeedFusion(nn.Module):
    """Seed 002's cross-modal attention and Watts-Strogatz fusion, with a WSLinear head."""

    def __init__(self) -> None:
        super().__init__()
        self.v_to_t = seed_models.CrossModalAttention002(WIDTH, 4)
        self.t_to_v = seed_models.CrossModalAttention002(WIDTH, 4)
        self.fusion = seed_models.WSMultiModalFusion(3, WIDTH, k=4, beta=0.3)
        self.head = mmattn.nn.WSLinear(3 * WIDTH, 5, k=4, beta=0.3, seed=0)

    def forward(self, visual: torch.Tensor, text: torch.Tensor,
                audio: torch.Tensor) -> torch.Tensor:
        v = (visual + self.v_to_t(visual, text)[0]).mean(dim=1)
        t = (text + self.t_to_v(text, visual)[0]).mean(dim=1)
        return self.head(torch.relu(self.fusion([v, t, audio])))


def build(init_seed: int = 0) -> nn.Module:
    """The converted model (the same on every rank for one ``init_seed``)."""
    torch.manual_seed(init_seed)
    model = SeedFusion()
    mmattn.convert(model)
    assert type(model.fusion) is mmattn.nn.WSMultiModalFusion
    assert type(model.v_to_t.attention) is mmattn.nn.MultiheadAttention
    with torch.no_grad():  # the seed's 0.01-scale fusion weights: make them matter
        model.fusion.weight.mul_(30.0)
    return model


def batch() -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(123)
    return (torch.randn(GLOBAL_BATCH, 6, WIDTH, generator=gen),
            torch.randn(GLOBAL_BATCH, 5, WIDTH, generator=gen),
            torch.randn(GLOBAL_BATCH, WIDTH, generator=gen),
            torch.randint(0, 5, (GLOBAL_BATCH,), generator=gen))


def loss_of(model: nn.Module, visual, text, audio, labels) -> torch.Tensor:
    return nn.functional.cross_entropy(model(visual, text, audio), labels)


def _shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for child in (model.v_to_t, model.t_to_v, model.fusion, model.head):
        fully_shard(child)
    return fully_shard(model)


def main(out_dir: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
    )

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(out_dir)
    model = _shard(build())
    assert isinstance(model.fusion.weight, torch.distributed.tensor.DTensor)
    local = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    visual, text, audio, labels = (t[local] for t in batch())
    loss = loss_of(model, visual, text, audio, labels)
    loss.backward()  # FSDP2 reduce-scatters the mean of the ranks' gradients
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    expected = model(visual, text, audio).detach()

    dcp.save(get_model_state_dict(model), checkpoint_id=out / "checkpoint")
    fresh = _shard(build(init_seed=1))  # other weights, until the checkpoint loads
    state = get_model_state_dict(fresh)
    dcp.load(state, checkpoint_id=out / "checkpoint")
    set_model_state_dict(fresh, state)
    torch.testing.assert_close(fresh(visual, text, audio), expected, rtol=0, atol=0)
    params = {name: p.full_tensor() for name, p in fresh.named_parameters()}
    if rank == 0:
        torch.save({"loss": mean_loss, "grads": grads, "params_after_step": params},
                   out / "fsdp.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
