"""The README's main demo: convert a seed-style multimodal model with one call.

    python examples/convert_demo.py [--quick]

The model is what the tutorials build: seed 001's ``nn.MultiheadAttention`` block (text
tokens attend to image patches, residual + LayerNorm) feeding seed 000's
``MultimodalFusionModel`` with the seed's own ``CrossModalAttention`` (here text 64
tokens, image 197 patches, width 768, 12 heads, batch 8). ``mmattn.convert`` swaps
the attention modules in place; the script prints what was swapped, the largest
output difference to the unconverted model, and the speed ratio (unconverted time /
converted time, so above 1 means mmattn is faster) of the forward pass and of
forward+backward, timed in the same run with ``benchmarks/common.time_ms`` (eval mode:
dropout off in both models; best of interleaved rounds).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import seed_models
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mmattn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import time_ms


class SeedStyleModel(nn.Module):
    """Seed 001's cross-attention block, then seed 000's fusion model."""

    def __init__(self, width: int, heads: int, audio_dim: int, num_classes: int) -> None:
        super().__init__()
        self.text_image_block = seed_models.CrossModalAttentionBlock(width, heads)
        self.fusion = seed_models.MultimodalFusionModel(
            visual_dim=width, audio_dim=audio_dim, text_dim=width, hidden_dim=width,
            num_heads=heads, num_classes=num_classes)

    def forward(self, text: Tensor, image: Tensor, audio: Tensor) -> Tensor:
        # seed 001's block is sequence-first, like the nn.MultiheadAttention inside it
        text_seq, image_seq = text.transpose(0, 1), image.transpose(0, 1)
        text_seq, _ = self.text_image_block(text_seq, image_seq, image_seq)
        logits, _weights = self.fusion(image, audio, text_seq.transpose(0, 1))
        return logits


def main(quick: bool = False) -> dict[str, float]:
    """Build, convert, compare and time; returns the printed numbers."""
    torch.manual_seed(0)
    batch, text_len, image_len, audio_len, width, heads = 8, 64, 197, 100, 768, 12
    if quick:
        batch, width = 2, 384
    original = SeedStyleModel(width, heads, audio_dim=128, num_classes=10)
    model = copy.deepcopy(original)
    report = mmattn.convert(model)
    print(report)

    text = torch.randn(batch, text_len, width)
    image = torch.randn(batch, image_len, width)
    audio = torch.randn(batch, audio_len, 128)
    labels = torch.randint(0, 10, (batch,))
    original.eval()
    model.eval()
    with torch.no_grad():
        max_diff = (model(text, image, audio) - original(text, image, audio)).abs().max().item()
    print(f"largest |logit difference| to the unconverted model (eval): {max_diff:.2e}")

    # Timed in eval mode, i.e. with dropout off, for both models: until a compiled
    # kernel draws the dropout mask, the reference backend computes Philox numbers with
    # PyTorch integer ops (about 1.5 s per million attention weights).
    rounds = 3 if quick else 5

    def forward(net: nn.Module) -> None:
        with torch.no_grad():
            net(text, image, audio)

    def forward_backward(net: nn.Module) -> None:
        F.cross_entropy(net(text, image, audio), labels).backward()

    results: dict[str, float] = {"swapped": float(len(report)), "max_diff": max_diff}
    for name, step in (("fwd", forward), ("fwd+bwd", forward_backward)):
        step(original), step(model)  # warm-up
        before, after = [], []
        for _ in range(rounds):  # interleaved, best of rounds: robust on a shared machine
            before.append(time_ms(lambda step=step: step(original), repeats=1, warmup=0))
            after.append(time_ms(lambda step=step: step(model), repeats=1, warmup=0))
        results[f"{name}_ms_torch"], results[f"{name}_ms_mmattn"] = min(before), min(after)
        results[f"{name}_speedup"] = min(before) / min(after)
        print(f"{name:8s} unconverted {min(before):8.1f} ms   converted {min(after):8.1f} ms   "
              f"speed ratio {min(before) / min(after):.2f}x  (best of {rounds}, dropout off)")
    return results


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
