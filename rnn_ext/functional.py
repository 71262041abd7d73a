"""Functional entry point, for code that holds its own weights (as torch's ``_VF.rnn_tanh`` does)."""
import torch
import torch.nn.functional as F

from . import ops

_ACTIVATIONS = {"tanh": False, "relu": True}


def uses_relu(nonlinearity):
    """The op's ``relu`` flag for an nn.RNN nonlinearity name."""
    if nonlinearity not in _ACTIVATIONS:
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
    return _ACTIVATIONS[nonlinearity]


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
):
    """Multi-layer Elman RNN over ``weights`` given in nn.RNN's ``_flat_weights`` order.

    input: ``[L, B, I]`` (``[B, L, I]`` if batch_first), or packed data ``[N, I]`` with
    ``batch_sizes`` (``[L]`` int64 on the CPU, as in a PackedSequence).
    hx: ``[num_layers * D, B, H]`` or None for zeros.
    Returns ``(output, h_n)``: output ``[L, B, D*H]`` (``[B, L, D*H]`` if batch_first) or ``[N, D*H]``
    when packed; h_n ``[num_layers * D, B, H]``.
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

    if batch_sizes is None:
        if input.dim() != 3:
            raise ValueError(f"rnn_ext: dense input must be 3-D, got {input.dim()}-D")
        if batch_first:
            input = input.transpose(0, 1)
        seq_len, batch = input.shape[0], input.shape[1]
        if seq_len == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        x = input.reshape(seq_len * batch, input.shape[2])
    else:
        x = input
        batch = int(batch_sizes[0])
    hidden = weights[1].shape[-1]
    if hx is None:
        hx = x.new_zeros((num_layers * directions, batch, hidden))

    h_n = []
    for layer in range(num_layers):
        if layer > 0 and dropout > 0 and training:
            x = F.dropout(x, dropout, training=True)
        x, h_layer = ops.run_layer(
            x,
            hx[layer * directions : (layer + 1) * directions],
            weights[layer * per_layer : (layer + 1) * per_layer],
            batch_sizes,
            relu,
        )
        h_n.append(h_layer)
    h_n = h_n[0] if num_layers == 1 else torch.cat(h_n, 0)

    if batch_sizes is not None:
        return x, h_n
    output = x.view(seq_len, batch, directions * hidden)
    return (output.transpose(0, 1) if batch_first else output), h_n
