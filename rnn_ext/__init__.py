"""rnn_ext: an Elman RNN (tanh or relu) with hand-written CPU and CUDA kernels.

``rnn_ext.RNN`` drops in for ``torch.nn.RNN`` and ``rnn_ext.RNNCell`` for ``torch.nn.RNNCell``;
``rnn_ext.rnn`` and ``rnn_ext.rnn_cell`` are the functional forms; ``torch.ops.rnn_ext.rnn_layer``
and ``torch.ops.rnn_ext.rnn_cell`` are the compiled ops underneath (see ``rnn_ext.ops``).
"""
import importlib.machinery
import importlib.util
import os
import sys

import torch


def _installed_copy():
    """The spec of another copy of this package on sys.path whose compiled extension is built (an
    installed one), or None. Searched when this copy has none: a source checkout that shadows the
    installed package, as at the repository root, where `python -m ...` puts the current
    directory first on sys.path."""
    source_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    others = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != source_root]
    spec = importlib.machinery.PathFinder.find_spec(__name__, others)
    if spec is None or not spec.submodule_search_locations:
        return None
    package_dir = spec.submodule_search_locations[0]
    built = any(os.path.exists(os.path.join(package_dir, "_C" + suffix)) for suffix in importlib.machinery.EXTENSION_SUFFIXES)
    return spec if built else None


def _built_here():
    """The compiled extension's file next to this one, or None."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if os.path.exists(os.path.join(package_dir, "_C" + suffix)):
            return os.path.join(package_dir, "_C" + suffix)
    return None


try:
    from . import _C  # noqa: F401  (registers the ops with the dispatcher)
except ImportError as error:
    if _built_here() is not None:  # there, but it does not load: not a missing build
        raise ImportError(
            f"rnn_ext's compiled extension {_built_here()} does not load with torch {torch.__version__} "
            f"({error}). It is usually built against another torch: rebuild it against this one "
            "(pip install --no-build-isolation . , or python setup.py build_ext --inplace)"
        ) from error
    _installed = _installed_copy()
    if _installed is None:
        raise ImportError(
            f"rnn_ext's compiled extension rnn_ext._C is missing next to {__file__}: install the package "
            "(pip install --no-build-isolation .), or build it in place (python setup.py build_ext --inplace)"
        ) from error
    # An unbuilt source tree shadows the installed package: load the installed one whole in its
    # place (import returns what sys.modules holds), rather than this tree's Python on its binary.
    _C = None
    sys.modules[__name__] = importlib.util.module_from_spec(_installed)
    _installed.loader.exec_module(sys.modules[__name__])

if _C is not None:
    from . import batching, ops, threads  # noqa: F401  (batching registers the ops' vmap rules)
    from .functional import rnn, rnn_cell
    from .module import RNN, RNNCell

__all__ = ["RNN", "RNNCell", "rnn", "rnn_cell", "ops", "threads", "cuda_kernels_built", "cpu_isa"]
__version__ = "0.1.0"


def cuda_kernels_built():
    """Whether this build of the extension holds the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("rnn_ext::rnn_layer", "CUDA")


def cpu_isa():
    """The instruction set the CPU kernels use: "avx512_bf16" (AVX-512 with the bfloat16 kernels),
    "avx512", "avx2" or "baseline" (the best this CPU has; the environment variable
    RNN_EXT_CPU_ISA, read once, can pick a lower one)."""
    return torch.ops.rnn_ext.cpu_isa()
