"""Seed 004's global self-attention over concatenated modalities, with a modality mask.

    python examples/global_modality_attention.py

Text, image and audio tokens are concatenated into one sequence; a
``BlockMask.modality`` says which modality may attend which (here audio does not see
image, image does not see audio). mmattn's kernels skip the blocks the mask empties.
The script prints the mask, checks the result against ``torch.nn.MultiheadAttention``
with the same mask as a dense ``attn_mask``, and times both.

Note: the seed builds ``nn.MultiheadAttention(hidden_dim, num_heads)`` (sequence-first)
but concatenates along dim 1, which is the batch dimension in that layout; this
version uses ``batch_first=True`` so that dim 1 is the sequence.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor, nn

import mmattn
from mmattn import BlockMask

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import time_ms

SEGMENTS = {"text": 77, "image": 197, "audio": 100}
ALLOW = {"text": ["text", "image", "audio"], "image": ["text", "image"],
         "audio": ["text", "audio"]}


class GlobalSelfAttention(nn.Module):
    """Seed 004's fusion layer: self-attention over all modalities' tokens + LayerNorm."""

    def __init__(self, hidden_dim: int = 512, num_heads: int = 8) -> None:
        super().__init__()
        self.multihead_attn = mmattn.nn.MultiheadAttention(hidden_dim, num_heads,
                                                           batch_first=True)
        self.layer_norm = nn.LayerNorm(hidden_dim)

    def forward(self, modality_features: dict[str, Tensor],
                block_mask: BlockMask | None = None) -> Tensor:
        combined = torch.cat(list(modality_features.values()), dim=1)
        attended, _ = self.multihead_attn(combined, combined, combined, need_weights=False,
                                          block_mask=block_mask)
        return self.layer_norm(attended + combined)


def main(quick: bool = False) -> dict[str, float]:
    repeats = 2 if quick else 10
    torch.manual_seed(0)
    hidden, heads, batch = 256, 8, 2
    layer = GlobalSelfAttention(hidden, heads)
    features = {name: torch.randn(batch, length, hidden) for name, length in SEGMENTS.items()}
    mask = BlockMask.modality(SEGMENTS, None, ALLOW, block_size=64)
    print(mask)
    print(f"block density {mask.density:.2f}, element density {mask.element_density:.2f}")

    with torch.no_grad():
        out = layer(features, block_mask=mask)
        reference = nn.MultiheadAttention(hidden, heads, batch_first=True)
        reference.load_state_dict(layer.multihead_attn.state_dict())
        combined = torch.cat(list(features.values()), dim=1)
        hidden_pairs = ~mask.to_dense()[0, 0]  # PyTorch's convention: True = not allowed
        attended, _ = reference(combined, combined, combined, attn_mask=hidden_pairs,
                                need_weights=False)
        expected = layer.layer_norm(attended + combined)
        diff = (out - expected).abs().max().item()
        ours_ms = time_ms(lambda: layer(features, block_mask=mask), repeats=repeats)
        torch_ms = time_ms(lambda: reference(combined, combined, combined,
                                             attn_mask=hidden_pairs, need_weights=False),
                           repeats=repeats)
    print(f"output {tuple(out.shape)}; largest difference to nn.MultiheadAttention with the "
          f"dense mask: {diff:.2e}")
    print(f"forward: mmattn {ours_ms:.2f} ms, nn.MultiheadAttention + dense mask "
          f"{torch_ms:.2f} ms")
    return {"diff": diff, "density": mask.density, "ours_ms": ours_ms, "torch_ms": torch_ms}


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
