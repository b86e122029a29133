"""Draw the main BlockMask layouts side by side into one PNG.

    python examples/masks_gallery.py [output.png]

Writes ``examples/masks_gallery.png`` by default. Every panel is a 256 x 256 mask in
16 x 16 blocks, drawn per element: dark blue = full block (no element mask needed),
orange / light grey = visible / hidden elements of a partial block, white = empty block
(skipped by the kernels).
"""

from __future__ import annotations

import sys
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from mmattn import BlockMask

LENGTH, BLOCK = 256, 16
SEGMENTS = {"text": 77, "image": 120, "audio": 59}  # boundaries off the block grid


def gallery() -> list[tuple[str, BlockMask]]:
    """(title, mask) for each panel."""
    return [
        ("random (seed 004 rule, keep 20%)", BlockMask.random(LENGTH, BLOCK, 0.8, seed=0)),
        ("local_window(window=24)", BlockMask.local_window(LENGTH, BLOCK, 24)),
        ("global_tokens(8) | local_window(8)",
         BlockMask.global_tokens(LENGTH, BLOCK, 8) | BlockMask.local_window(LENGTH, BLOCK, 8)),
        ("strided(stride=32, summary=4)", BlockMask.strided(LENGTH, BLOCK, 32, 4)),
        ("bigbird(window 1, global 1, random 2)", BlockMask.bigbird(LENGTH, BLOCK, 1, 1, 2,
                                                                    seed=0)),
        ("causal", BlockMask.causal(LENGTH, BLOCK)),
        ("modality: text<->image, audio->text",
         BlockMask.modality(SEGMENTS, None, {"text": ["text", "image"],
                                             "image": ["text", "image"],
                                             "audio": ["text"]}, BLOCK)),
        ("watts_strogatz(k=4, beta=0.2)", BlockMask.watts_strogatz(LENGTH, BLOCK, 4, 0.2,
                                                                   seed=0)),
    ]


def main(path: Path) -> None:
    panels = gallery()
    figure = Figure(figsize=(16, 8.8))
    axes = figure.subplots(2, 4)
    for ax, (title, mask) in zip(axes.flat, panels, strict=True):
        mask.plot(ax=ax, title=f"{title}\nblock density {mask.density:.2f}")
        ax.set_xticks(range(0, LENGTH + 1, 64))
        ax.set_yticks(range(0, LENGTH + 1, 64))
        if title.startswith("modality"):
            edge = -0.5
            for length in list(SEGMENTS.values())[:-1]:
                edge += length
                ax.axhline(edge, color="black", linewidth=0.8)
                ax.axvline(edge, color="black", linewidth=0.8)
    figure.legend(handles=[Patch(color="#1f4e79", label="full block"),
                           Patch(color="#f28e2b", label="visible element of a partial block"),
                           Patch(color="#e4e4e4", label="hidden element of a partial block"),
                           Patch(facecolor="#ffffff", edgecolor="black",
                                 label="empty block (skipped)")],
                  loc="lower center", ncol=4, frameon=False)
    figure.suptitle(f"mmattn.BlockMask layouts: {LENGTH} x {LENGTH}, blocks of {BLOCK} x {BLOCK}")
    figure.tight_layout(rect=(0, 0.04, 1, 0.97))
    figure.savefig(path, dpi=80)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("masks_gallery.png"))
