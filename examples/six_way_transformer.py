"""Seed 002's six-way MultiModalTransformer, written on mmattn.nn.MultiheadAttention.

    python examples/six_way_transformer.py

Each modality's pooled vector attends to each other modality's (Lq = Lk = 1): six
cross-attentions, then a linear fusion. At these sizes a layer takes microseconds, so
what matters is that the module path adds little on top of the arithmetic. The script
checks the output against the seed's model with the same weights and times both.
"""

from __future__ import annotations

import sys
from pathlib import Path

import seed_models
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mmattn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import time_ms


class CrossModalAttention(nn.Module):
    """Seed 002's wrapper: query from modality A, key/value from modality B."""

    def __init__(self, dim: int, num_heads: int = 4) -> None:
        super().__init__()
        self.attention = mmattn.nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def forward(self, query_modality: Tensor, key_value_modality: Tensor
                ) -> tuple[Tensor, Tensor | None]:
        if query_modality.dim() == 2:
            query_modality = query_modality.unsqueeze(1)
        if key_value_modality.dim() == 2:
            key_value_modality = key_value_modality.unsqueeze(1)
        attn_out, attn_weights = self.attention(query_modality, key_value_modality,
                                                key_value_modality)
        return attn_out.squeeze(1), attn_weights


class MultiModalTransformer(nn.Module):
    """Seed 002's model: every modality attends to the two others, then fuse."""

    def __init__(self, dim: int = 256, num_heads: int = 4, output_dim: int = 10) -> None:
        super().__init__()
        self.v_to_t = CrossModalAttention(dim, num_heads)
        self.v_to_a = CrossModalAttention(dim, num_heads)
        self.t_to_v = CrossModalAttention(dim, num_heads)
        self.t_to_a = CrossModalAttention(dim, num_heads)
        self.a_to_v = CrossModalAttention(dim, num_heads)
        self.a_to_t = CrossModalAttention(dim, num_heads)
        self.fusion = nn.Linear(dim * 3, output_dim)

    def forward(self, visual: Tensor, text: Tensor, audio: Tensor) -> Tensor:
        v_enhanced = visual + self.v_to_t(visual, text)[0] + self.v_to_a(visual, audio)[0]
        t_enhanced = text + self.t_to_v(text, visual)[0] + self.t_to_a(text, audio)[0]
        a_enhanced = audio + self.a_to_v(audio, visual)[0] + self.a_to_t(audio, text)[0]
        return self.fusion(torch.cat([v_enhanced, t_enhanced, a_enhanced], dim=-1))


def main(quick: bool = False) -> dict[str, float]:
    repeats = 3 if quick else 10
    torch.manual_seed(0)
    model = MultiModalTransformer(256, 4, 10)
    seed = seed_models.MultiModalTransformer(256, 4, 10)
    seed.load_state_dict(model.state_dict())
    visual, text, audio = (torch.randn(8, 256) for _ in range(3))
    labels = torch.randint(0, 10, (8,))

    output = model(visual, text, audio)
    diff = (output - seed(visual, text, audio)).abs().max().item()
    params = sum(p.numel() for p in model.parameters())
    print(f"output {tuple(output.shape)}, {params:,} parameters, largest difference to the "
          f"seed's model {diff:.2e}")

    def step(net: nn.Module) -> None:
        F.cross_entropy(net(visual, text, audio), labels).backward()

    ours_ms = time_ms(lambda: step(model), repeats=repeats)
    seed_ms = time_ms(lambda: step(seed), repeats=repeats)
    print(f"fwd+bwd at the seed's size (batch 8, dim 256): mmattn {ours_ms:.2f} ms, "
          f"seed {seed_ms:.2f} ms (speed ratio {seed_ms / ours_ms:.2f}x)")
    return {"diff": diff, "ours_ms": ours_ms, "seed_ms": seed_ms}


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
