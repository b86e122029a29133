"""``mmattn.nn``: drop-in ``nn.Module`` layers backed by mmattn's ops."""

from mmattn.nn.ws_linear import WSLinear, WSMultiModalFusion

__all__ = ["WSLinear", "WSMultiModalFusion"]
