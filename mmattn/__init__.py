"""mmattn: fast cross-modal attention, block-sparse attention and Watts-Strogatz
sparse fusion for PyTorch.

Public API:
    cross_attention(q, k, v, ...)      fused multi-head attention (mmattn.attention)
    merge_attention(outs, lses)        combine attention over key shards via their lse
    ws_linear(x, weight, layout, bias) sparse linear over a compressed layout (mmattn.ws)
    SparseLayout                       compressed weight sparsity pattern (mmattn.layout)
    BlockMask                          block-sparse attention mask (mmattn.block_mask)
    watts_strogatz(n, k, beta, seed)   small-world graph edges, as networkx (mmattn.watts_strogatz)
    watts_strogatz_mask(out, in, ...)  bool Watts-Strogatz weight mask (mmattn.watts_strogatz)
    use_backend(name)                  context manager forcing a backend (mmattn.dispatch)
    nn                                 drop-in modules (MultiheadAttention, WSLinear, ...)
    convert(model), revert(model)      swap a model's attention modules for mmattn's and back
    mmattn.distributed                 context-parallel attention over torch.distributed
                                       (import it explicitly)
"""

from __future__ import annotations

import importlib.util as _importlib_util
import os as _os


def _map_kernels_package() -> None:
    """Make ``mmattn.kernels`` importable from a source checkout.

    Wheels and editable installs map ``kernels/`` to ``mmattn.kernels``; a plain
    checkout on sys.path (running from the repo root) needs the same mapping.
    """
    if _importlib_util.find_spec("mmattn.kernels") is not None:
        return
    kernels_dir = _os.path.join(_os.path.dirname(_os.path.dirname(__file__)), "kernels")
    init = _os.path.join(kernels_dir, "__init__.py")
    if _os.path.exists(init):
        import sys

        spec = _importlib_util.spec_from_file_location(
            "mmattn.kernels", init, submodule_search_locations=[kernels_dir])
        module = _importlib_util.module_from_spec(spec)
        sys.modules["mmattn.kernels"] = module
        spec.loader.exec_module(module)


_map_kernels_package()

from mmattn import _extension, nn  # noqa: E402, F401  (_extension loads mmattn._C, warns once)
from mmattn.attention import cross_attention, merge_attention  # noqa: E402
from mmattn.block_mask import BlockMask  # noqa: E402
from mmattn.convert import convert, revert  # noqa: E402
from mmattn.dispatch import BackendUnavailableError, use_backend  # noqa: E402
from mmattn.layout import SparseLayout  # noqa: E402
from mmattn.watts_strogatz import watts_strogatz, watts_strogatz_mask  # noqa: E402
from mmattn.ws import ws_linear  # noqa: E402

try:
    from importlib.metadata import version as _dist_version

    __version__ = _dist_version("mmattn")
except Exception:  # a source checkout that was never installed
    __version__ = "0.0.0+source"

__all__ = [
    "BackendUnavailableError",
    "BlockMask",
    "SparseLayout",
    "__version__",
    "convert",
    "cross_attention",
    "merge_attention",
    "nn",
    "revert",
    "use_backend",
    "watts_strogatz",
    "watts_strogatz_mask",
    "ws_linear",
]
