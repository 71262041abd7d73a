"""Python side of the compiled ops: fake kernels for tracing and FLOP formulas for FlopCounterMode
(autograd is in csrc/autograd.cpp, vmap rules in rnn_ext/batching.py).

``torch.ops.rnn_ext.rnn_layer`` runs one layer (every direction) of the recurrence; shapes are
documented in ``csrc/rnn.h``:

    input        [N, I]      time-major rows (N = T*B dense or padded, or sum(batch_sizes) packed)
    hx           [D, B, H]
    w_ih [H, I], w_hh [H, H], b_ih [H]?, b_hh [H]?, then the same four ``*_reverse`` when D == 2
    batch_sizes  [T] int64 CPU tensor (a packed batch), or None
    relu         bool (else tanh)
    lengths      [B] int64 CPU tensor, in any order (a padded batch), or None
    -> output    [N, D*H] (zero on padding),   h_n [D, B, H]

``torch.ops.rnn_ext.rnn_cell`` runs one step on its own, nn.RNNCell's (``rnn_cell_backward`` is its
gradient):

    input [B, I], hx [B, H], w_ih [H, I], w_hh [H, H], b_ih [H]?, b_hh [H]?, relu -> h [B, H]

The layer op takes its weights in WEIGHT_SLOTS optional slots, not as a list: its C++ autograd Function
(csrc/autograd.cpp) then gives each present weight its own autograd edge without list handling.
``run_layer`` calls it with a layer's weights as nn.RNN's flat list.

``rnn_layer_backward`` is its gradient, itself a registered op so that compiled graphs can hold it;
it takes the weights as nn.RNN's flat list.
"""
import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.flop_counter import register_flop_formula

from . import _C  # noqa: F401  (importing the extension registers the ops)
from . import onnx_export

rnn_layer = torch.ops.rnn_ext.rnn_layer.default
rnn_layer_backward = torch.ops.rnn_ext.rnn_layer_backward.default
rnn_cell = torch.ops.rnn_ext.rnn_cell.default
rnn_cell_backward = torch.ops.rnn_ext.rnn_cell_backward.default

WEIGHT_SLOT_NAMES = ("w_ih", "w_hh", "b_ih", "b_hh", "w_ih_reverse", "w_hh_reverse", "b_ih_reverse", "b_hh_reverse")
WEIGHT_SLOTS = len(WEIGHT_SLOT_NAMES)  # rnn_layer's weight arguments, between hx and batch_sizes
_SLOTS_PER_DIRECTION = WEIGHT_SLOTS // 2


def cell_step(input, hx, w_ih, w_hh, b_ih, b_hh, relu):
    """rnn_cell by its quickest entry: ``rnn_ext._C.rnn_cell`` in eager mode (the same dispatcher call,
    without the OpOverload's generic argument parsing; see csrc/python.cpp), the OpOverload while
    compiling or where the quick entry declines (tensor subclasses, TorchFunctionModes)."""
    if not torch.compiler.is_compiling():
        h = _C.rnn_cell(input, hx, w_ih, w_hh, b_ih, b_hh, relu)
        if h is not NotImplemented:
            return h
    if onnx_export.emits_onnx_nodes():  # only here: the quick entry declines the exporter's fake tensors
        return onnx_export.cell_nodes(input, hx, w_ih, w_hh, b_ih, b_hh, relu)
    return rnn_cell(input, hx, w_ih, w_hh, b_ih, b_hh, relu)


def layer_args(input, hx, weights, batch_sizes, relu, lengths=None):
    """rnn_layer's arguments for a layer's weights given as nn.RNN's flat list (2 or 4 per direction)."""
    weights = list(weights)
    directions = hx.shape[0] if hx.dim() == 3 else 1
    if directions not in (1, 2) or len(weights) not in (2 * directions, 4 * directions):
        raise RuntimeError(
            f"rnn_ext: weights must hold 2 (no bias) or 4 tensors per direction, got {len(weights)} "
            f"for hx.size(0) = {directions} direction(s)"
        )
    per_direction = len(weights) // directions
    slots = []
    for d in range(2):
        w = weights[d * per_direction : (d + 1) * per_direction]
        slots += w + [None] * (_SLOTS_PER_DIRECTION - len(w))
    return (input, hx, *slots, batch_sizes, relu, lengths)


def run_layer(input, hx, weights, batch_sizes, relu, lengths=None):
    """rnn_layer with the layer's weights as nn.RNN's flat list; returns (output, h_n)."""
    return rnn_layer(*layer_args(input, hx, weights, batch_sizes, relu, lengths))


def _check_same_kind(input, named_tensors):
    for name, t in named_tensors:
        if t is not None:
            torch._check(
                t.device == input.device and t.dtype == input.dtype,
                lambda: f"rnn_ext: {name} must have the input's dtype and device, got {t.dtype} on {t.device}",
            )


@torch.library.register_fake("rnn_ext::rnn_layer")
def _rnn_layer_fake(input, hx, *args):
    torch._check(input.dim() == 2, lambda: f"rnn_ext: input must be 2-D, got {input.dim()}-D")
    torch._check(hx.dim() == 3, lambda: f"rnn_ext: hx must be 3-D, got {hx.dim()}-D")
    _check_same_kind(input, (("hx", hx), *zip(WEIGHT_SLOT_NAMES, args[:WEIGHT_SLOTS])))
    directions, batch, hidden = hx.shape
    output = input.new_empty((input.shape[0], directions * hidden))
    h_n = input.new_empty((directions, batch, hidden))
    return output, h_n


@torch.library.register_fake("rnn_ext::rnn_layer_backward")
def _rnn_layer_backward_fake(
    grad_output, grad_h_n, input, hx, weights, batch_sizes, relu, output, output_mask, lengths=None
):
    grad_input = input.new_empty(input.shape if output_mask[0] else (0,))
    grad_hx = hx.new_empty(hx.shape if output_mask[1] else (0,))
    grad_weights = [w.new_empty(w.shape) for w in weights] if output_mask[2] else []
    return grad_input, grad_hx, grad_weights


@torch.library.register_fake("rnn_ext::rnn_cell")
def _rnn_cell_fake(input, hx, w_ih, w_hh, b_ih, b_hh, relu):
    # The checks of check_cell_args (csrc/cell.cpp), so that a traced graph fails where the op would.
    torch._check(input.dim() == 2, lambda: f"rnn_ext: input must be 2-D [batch, input_size], got {input.dim()}-D")
    torch._check(input.dtype.is_floating_point, lambda: f"rnn_ext: input must be a floating point tensor, got {input.dtype}")
    torch._check(hx.dim() == 2, lambda: f"rnn_ext: hx must be 2-D [batch, hidden_size], got {hx.dim()}-D")
    torch._check(w_ih.dim() == 2 and w_hh.dim() == 2, lambda: "rnn_ext: w_ih and w_hh must be 2-D")
    torch._check((b_ih is None) == (b_hh is None), lambda: "rnn_ext: b_ih and b_hh must be given together")
    _check_same_kind(input, (("hx", hx), ("w_ih", w_ih), ("w_hh", w_hh), ("b_ih", b_ih), ("b_hh", b_hh)))
    hidden, input_size = w_hh.shape[0], w_ih.shape[1]
    torch._check(w_ih.shape == (hidden, input_size) and w_hh.shape == (hidden, hidden),
                 lambda: f"rnn_ext: w_ih must be [H, I] and w_hh [H, H], got {tuple(w_ih.shape)} and {tuple(w_hh.shape)}")
    for name, bias in (("b_ih", b_ih), ("b_hh", b_hh)):
        if bias is not None:
            torch._check(bias.shape == (hidden,), lambda: f"rnn_ext: {name} must have shape [{hidden}]")
    torch._check(input.shape[1] == input_size, lambda: "rnn_ext: input has inconsistent input_size")
    torch._check(hx.shape == (input.shape[0], hidden), lambda: "rnn_ext: hx must be [batch, hidden_size]")
    return input.new_empty((input.shape[0], hidden))


@torch.library.register_fake("rnn_ext::rnn_cell_backward")
def _rnn_cell_backward_fake(grad_h, input, hx, weights, relu, output, output_mask):
    grad_input = input.new_empty(input.shape if output_mask[0] else (0,))
    grad_hx = hx.new_empty(hx.shape if output_mask[1] else (0,))
    grad_weights = [w.new_empty(w.shape) for w in weights] if output_mask[2] else []
    return grad_input, grad_hx, grad_weights


# -- FLOP formulas, for torch.utils.flop_counter.FlopCounterMode: the multiply-adds nn.RNN's (and
# nn.RNNCell's) matrix products count for the same work, 2 FLOPs each; biases and activations, which
# FlopCounterMode does not count for nn.RNN, are left out here too.


def _has_values(t):
    return not isinstance(t, FakeTensor) and t.device.type != "meta"


def _layer_rows(input, hx, batch_sizes, lengths):
    """(rows the layer's steps own, rows of the forward walk's first step, rows of the reverse
    walk's first step: the last step's). Under fake tensors a padded batch counts every row, its
    lengths being unknown."""
    batch = hx.shape[1]
    if lengths is not None and _has_values(lengths):
        values = lengths.tolist()
        longest = max(values, default=0)
        return sum(values), sum(1 for n in values if n > 0), sum(1 for n in values if n == longest > 0)
    if batch_sizes is not None and _has_values(batch_sizes):
        sizes = batch_sizes.tolist()
        return sum(sizes), sizes[0] if sizes else 0, sizes[-1] if sizes else 0
    started = batch if input.shape[0] > 0 else 0
    return input.shape[0], started, started


@register_flop_formula(torch.ops.rnn_ext.rnn_layer, get_raw=True)
def _rnn_layer_flop(input, hx, *args, out_val=None, **kwargs):
    # Python dispatch drops trailing arguments left at their defaults (lengths=None).
    rest = args[WEIGHT_SLOTS:]
    batch_sizes = rest[0] if rest else kwargs.get("batch_sizes")
    lengths = rest[2] if len(rest) > 2 else kwargs.get("lengths")
    directions, hidden, input_size = hx.shape[0], hx.shape[2], input.shape[1]
    rows, _, _ = _layer_rows(input, hx, batch_sizes, lengths)
    return directions * 2 * rows * hidden * (input_size + hidden)


@register_flop_formula(torch.ops.rnn_ext.rnn_layer_backward, get_raw=True)
def _rnn_layer_backward_flop(grad_output, grad_h_n, input, hx, weights, batch_sizes, relu, output, output_mask,
                             lengths=None, out_val=None, **kwargs):
    directions, hidden, input_size = hx.shape[0], hx.shape[2], input.shape[1]
    rows, *first_step_rows = _layer_rows(input, hx, batch_sizes, lengths)
    grad_input, grad_hx, grad_weights = output_mask
    # grad_h through w_hh at every row, but for a walk's first step when hx needs no gradient: there
    # nn.RNN multiplies by hx alone (rows starting later share a product with rows carried on).
    walk = sum(rows - (0 if grad_hx else first_step_rows[d]) for d in range(directions)) * hidden * hidden
    products = rows * hidden * (input_size * (int(grad_input) + int(grad_weights)) + hidden * int(grad_weights))
    return 2 * (walk + directions * products)


@register_flop_formula(torch.ops.rnn_ext.rnn_cell, get_raw=True)
def _rnn_cell_flop(input, hx, w_ih, w_hh, *args, out_val=None, **kwargs):
    return 2 * input.shape[0] * w_hh.shape[0] * (w_ih.shape[1] + w_hh.shape[1])


@register_flop_formula(torch.ops.rnn_ext.rnn_cell_backward, get_raw=True)
def _rnn_cell_backward_flop(grad_h, input, hx, weights, relu, output, output_mask, out_val=None, **kwargs):
    batch, input_size, hidden = input.shape[0], input.shape[1], hx.shape[1]
    grad_input, grad_hx, grad_weights = output_mask
    products = input_size * (int(grad_input) + int(grad_weights)) + hidden * (int(grad_hx) + int(grad_weights))
    return 2 * batch * hidden * products
