"""rnn_ext: an Elman RNN (tanh or relu) with hand-written CPU and CUDA kernels.

``rnn_ext.RNN`` drops in for ``torch.nn.RNN``; ``rnn_ext.rnn`` is the functional form;
``torch.ops.rnn_ext.rnn_layer`` is the compiled op underneath (see ``rnn_ext.ops``).
"""
import torch

from . import _C  # noqa: F401  (registers the ops with the dispatcher)
from . import ops
from .functional import rnn
from .module import RNN

__all__ = ["RNN", "rnn", "ops", "cuda_kernels_built"]
__version__ = "0.1.0"


def cuda_kernels_built():
    """Whether this build of the extension holds the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("rnn_ext::rnn_layer", "CUDA")
