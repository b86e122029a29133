"""Drop-in ``nn.Module``s: they hold parameters and call mmattn's functional ops."""

from mmattn.nn.attention import BlockSparseAttention, CrossModalAttention, MultiheadAttention
from mmattn.nn.ws_linear import WSLinear, WSMultiModalFusion

__all__ = [
    "BlockSparseAttention",
    "CrossModalAttention",
    "MultiheadAttention",
    "WSLinear",
    "WSMultiModalFusion",
]
