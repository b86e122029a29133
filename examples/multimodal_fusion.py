"""Seed 000's MultimodalFusionModel, written on mmattn.nn.CrossModalAttention.

    python examples/multimodal_fusion.py

The model is the tutorial's, line for line, except that its three cross-modal
attentions are ``mmattn.nn.CrossModalAttention`` (same arguments, parameter names and
outputs). The script loads the same weights into the seed's own model and prints the
largest difference of logits and attention weights, then trains a few steps.
"""

from __future__ import annotations

import sys

import seed_models
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mmattn


class MultimodalFusionModel(nn.Module):
    """Seed 000's model: encode three modalities, cross-attend, pool, classify."""

    def __init__(self, visual_dim: int, audio_dim: int, text_dim: int, hidden_dim: int,
                 num_heads: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.visual_encoder = nn.Linear(visual_dim, hidden_dim)
        self.audio_encoder = nn.Linear(audio_dim, hidden_dim)
        self.text_encoder = nn.Linear(text_dim, hidden_dim)
        attention = mmattn.nn.CrossModalAttention
        self.visual_audio_attention = attention(hidden_dim, hidden_dim, hidden_dim, num_heads)
        self.audio_visual_attention = attention(hidden_dim, hidden_dim, hidden_dim, num_heads)
        self.text_visual_attention = attention(hidden_dim, hidden_dim, hidden_dim, num_heads)
        self.norm = nn.LayerNorm(hidden_dim)
        self.classifier = nn.Sequential(
            nn.Linear(hidden_dim * 3, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_classes))

    def forward(self, visual: Tensor, audio: Tensor, text: Tensor,
                mask: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        visual_features = self.visual_encoder(visual)
        audio_features = self.audio_encoder(audio)
        text_features = self.text_encoder(text)
        visual_audio, va_weights = self.visual_audio_attention(
            visual_features, audio_features, audio_features, mask)
        audio_visual, av_weights = self.audio_visual_attention(
            audio_features, visual_features, visual_features, mask)
        text_visual, tv_weights = self.text_visual_attention(
            text_features, visual_features, visual_features, mask)
        pooled = [self.norm(x).mean(dim=1) for x in (visual_audio, audio_visual, text_visual)]
        logits = self.classifier(torch.cat(pooled, dim=1))
        return logits, [va_weights, av_weights, tv_weights]


def main(quick: bool = False) -> dict[str, float]:
    steps = 3 if quick else 5
    torch.manual_seed(0)
    sizes = {"visual_dim": 512, "audio_dim": 128, "text_dim": 300, "hidden_dim": 256,
             "num_heads": 8, "num_classes": 10}
    model = MultimodalFusionModel(**sizes)
    seed = seed_models.MultimodalFusionModel(**sizes)
    seed.load_state_dict(model.state_dict())  # the same parameter names
    visual, audio = torch.randn(4, 49, 512), torch.randn(4, 60, 128)
    text = torch.randn(4, 16, 300)
    labels = torch.randint(0, 10, (4,))

    model.eval()
    seed.eval()
    with torch.no_grad():
        logits, weights = model(visual, audio, text)
        seed_logits, seed_weights = seed(visual, audio, text)
    logit_diff = (logits - seed_logits).abs().max().item()
    weight_diff = max((ours - theirs).abs().max().item()
                      for ours, theirs in zip(weights, seed_weights, strict=True))
    print(f"logits {tuple(logits.shape)}; attention weights "
          f"{[tuple(w.shape) for w in weights]}")
    print(f"largest difference to the seed's model: logits {logit_diff:.2e}, "
          f"weights {weight_diff:.2e}")

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(visual, audio, text)[0], labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print("training loss: " + " -> ".join(f"{x:.3f}" for x in losses))
    return {"logit_diff": logit_diff, "weight_diff": weight_diff, "first_loss": losses[0],
            "last_loss": losses[-1]}


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
