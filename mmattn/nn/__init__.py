"""Drop-in ``nn.Module``s: they hold parameters and call mmattn's functional ops."""

from mmattn.nn.attention import BlockSparseAttention, CrossModalAttention, MultiheadAttention

__all__ = [
    "BlockSparseAttention",
    "CrossModalAttention",
    "MultiheadAttention",
]
