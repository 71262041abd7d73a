"""Functional entry point, for code that holds its own weights (as torch's ``_VF.rnn_tanh`` does)."""
import numbers

import torch
import torch.nn.functional as F

from . import onnx_export, ops

_ACTIVATIONS = {"tanh": False, "relu": True}


def uses_relu(nonlinearity):
    """The op's ``relu`` flag for an nn.RNN nonlinearity name."""
    if nonlinearity not in _ACTIVATIONS:
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
    return _ACTIVATIONS[nonlinearity]


def checked_lengths(lengths, batch, device):
    """``lengths`` of a padded batch as the op takes them: a 1-D int64 CPU tensor.

    lengths: a 1-D integer tensor (on the CPU or on ``device``) or a list of ints, one per batch
    row, in any order. Anything else raises ValueError; a length outside [0, L] is left to the
    op, which raises RuntimeError naming it (the check needs the values, so it runs there, in
    eager mode and in compiled graphs alike).
    """
    if isinstance(lengths, torch.Tensor):
        if lengths.dtype == torch.bool or lengths.is_floating_point() or lengths.is_complex():
            raise ValueError(f"rnn_ext: lengths must hold integers, got a tensor of {lengths.dtype}")
        if lengths.device.type != "cpu" and lengths.device != device:
            raise ValueError(
                f"rnn_ext: lengths must be on the CPU or on the input's device ({device}), got {lengths.device}"
            )
        if lengths.dim() != 1:
            raise ValueError(f"rnn_ext: lengths must be 1-D (one length per batch row), got {lengths.dim()}-D")
        lengths = lengths.to("cpu", torch.int64)
    else:
        values = list(lengths) if isinstance(lengths, (list, tuple)) else None
        if values is None or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
            raise ValueError(f"rnn_ext: lengths must be a 1-D integer tensor or a list of ints, got {lengths!r}")
        lengths = torch.tensor(values, dtype=torch.int64)
    if lengths.numel() != batch:
        raise ValueError(f"rnn_ext: lengths must hold one length per batch row ({batch}), got {lengths.numel()}")
    return lengths


def rnn(
    input,
    hx,
    weights,
    *,
    num_layers=1,
    nonlinearity="tanh",
    bias=True,
    dropout=0.0,
    training=False,
    bidirectional=False,
    batch_first=False,
    batch_sizes=None,
    lengths=None,
):
    """Multi-layer Elman RNN over ``weights`` given in nn.RNN's ``_flat_weights`` order.

    input: ``[L, B, I]`` (``[B, L, I]`` if batch_first), or packed data ``[N, I]`` with
    ``batch_sizes`` (``[L]`` int64 on the CPU, as in a PackedSequence).
    hx: ``[num_layers * D, B, H]`` or None for zeros.
    lengths: for padded input, each row's length (a 1-D integer tensor or a list of ints, in any
    order, each in [0, L]): row b is real at steps t < lengths[b] and padding after.
    Returns ``(output, h_n)``: output ``[L, B, D*H]`` (``[B, L, D*H]`` if batch_first) or ``[N, D*H]``
    when packed; h_n ``[num_layers * D, B, H]``. With lengths, the output is zero past each row's
    length and h_n holds each row's state after its last step (hx for a row of length 0), as
    nn.RNN gives on the same batch packed with ``enforce_sorted=False``.
    """
    relu = uses_relu(nonlinearity)
    directions = 2 if bidirectional else 1
    per_layer = directions * (4 if bias else 2)
    weights = list(weights)
    if len(weights) != num_layers * per_layer:
        raise ValueError(
            f"rnn_ext: expected {num_layers * per_layer} weight tensors for num_layers={num_layers}, "
            f"bidirectional={bidirectional}, bias={bias}; got {len(weights)}"
        )
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout should be a number in range [0, 1], got {dropout}")
    run_layer = ops.run_layer
    if onnx_export.exporting_to_onnx():
        onnx_export.check_exportable(dropout, training, num_layers, batch_sizes, input.dtype)
        if onnx_export.emits_onnx_nodes():
            run_layer = onnx_export.rnn_node

    if batch_sizes is None:
        if input.dim() != 3:
            raise ValueError(f"rnn_ext: dense input must be 3-D, got {input.dim()}-D")
        if batch_first:
            input = input.transpose(0, 1)
        seq_len, batch = input.shape[0], input.shape[1]
        if seq_len == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if lengths is not None:
            lengths = checked_lengths(lengths, batch, input.device)
        x = input.reshape(seq_len * batch, input.shape[2])
    else:
        if lengths is not None:
            raise ValueError("rnn_ext: lengths= is for padded input; a packed batch has its batch_sizes")
        x = input
        batch = int(batch_sizes[0])
    hidden = weights[1].shape[-1]
    if hx is None:
        hx = x.new_zeros((num_layers * directions, batch, hidden))

    h_n = []
    for layer in range(num_layers):
        if layer > 0 and dropout > 0 and training:
            x = F.dropout(x, dropout, training=True)
        x, h_layer = run_layer(
            x,
            hx[layer * directions : (layer + 1) * directions],
            weights[layer * per_layer : (layer + 1) * per_layer],
            batch_sizes,
            relu,
            lengths,
        )
        h_n.append(h_layer)
    h_n = h_n[0] if num_layers == 1 else torch.cat(h_n, 0)

    if batch_sizes is not None:
        return _handed_out(x), h_n
    return _handed_out(x, (seq_len, batch, directions * hidden), batch_first), h_n


def _handed_out(x, size=None, batch_first=False):
    """The last layer's output x ``[N, D*H]`` as the caller gets it: viewed as ``size`` ``(L, B,
    D*H)`` and, if batch_first, transposed (None: packed, as it is). Where autograd records the
    layer, a copy, a tensor of its own as nn.RNN's output is: in-place changes to it (even through
    ``.data``) cannot alter the states the backward reads, and it is not a view (``detach_()``
    works). Outside autograd nothing reads the states again, and the view costs no copy; so does
    torch.jit.trace's graph, which must be one whichever grad mode checks the trace."""
    output = x
    if size is not None:
        output = x.view(size)
        if batch_first:
            output = output.transpose(0, 1)
    if x.requires_grad and not torch.jit.is_tracing():
        return output.clone()
    return output


def rnn_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh"):
    """One step of the recurrence over given weights, as ``nn.RNNCell`` computes it (``_VF.rnn_tanh_cell``).

    input ``[B, I]`` or ``[I]``; hx ``[B, H]`` or ``[H]`` (None: zeros); w_ih ``[H, I]``, w_hh
    ``[H, H]``, b_ih and b_hh ``[H]`` or both None. Returns h' ``[B, H]`` (``[H]`` for 1-D input).
    A layer's weights (``weight_ih_l0``, ...) serve as they are, e.g. to sample step by step.
    """
    relu = uses_relu(nonlinearity)
    if input.dim() not in (1, 2):
        raise ValueError(f"rnn_cell: Expected input to be 1D or 2D, got {input.dim()}D instead")
    is_batched = input.dim() == 2
    if not is_batched:
        input = input.unsqueeze(0)
    if hx is None:
        hx = input.new_zeros((input.size(0), w_hh.size(-1)))
    elif not is_batched:
        hx = hx.unsqueeze(0)
    h = ops.cell_step(input, hx, w_ih, w_hh, b_ih, b_hh, relu)
    return h if is_batched else h.squeeze(0)
