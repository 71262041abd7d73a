"""rnn_ext: an Elman RNN (tanh or relu) with hand-written CPU and CUDA kernels.

``rnn_ext.RNN`` drops in for ``torch.nn.RNN`` and ``rnn_ext.RNNCell`` for ``torch.nn.RNNCell``;
``rnn_ext.rnn`` and ``rnn_ext.rnn_cell`` are the functional forms; ``torch.ops.rnn_ext.rnn_layer``
and ``torch.ops.rnn_ext.rnn_cell`` are the compiled ops underneath (see ``rnn_ext.ops``).
"""
import torch

try:
    from . import _C  # noqa: F401  (registers the ops with the dispatcher)
except ImportError as error:  # e.g. `python -c 'import rnn_ext'` in an unbuilt source checkout
    raise ImportError(
        f"rnn_ext's compiled extension rnn_ext._C is missing next to {__file__}: install the package "
        "(pip install --no-build-isolation .) and import it from outside the source tree, or build "
        "it in place (python setup.py build_ext --inplace)") from error
from . import ops
from .functional import rnn, rnn_cell
from .module import RNN, RNNCell

__all__ = ["RNN", "RNNCell", "rnn", "rnn_cell", "ops", "cuda_kernels_built", "cpu_isa"]
__version__ = "0.1.0"


def cuda_kernels_built():
    """Whether this build of the extension holds the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("rnn_ext::rnn_layer", "CUDA")


def cpu_isa():
    """The instruction set the CPU kernels use: "avx512", "avx2" or "baseline" (the best this
    CPU has; the environment variable RNN_EXT_CPU_ISA, read once, can pick a lower one)."""
    return torch.ops.rnn_ext.cpu_isa()
