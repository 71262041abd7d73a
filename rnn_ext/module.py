"""``rnn_ext.RNN`` and ``rnn_ext.RNNCell``: drop-ins for ``torch.nn.RNN`` and ``torch.nn.RNNCell``
running on rnn_ext's kernels."""
import math
import numbers
import warnings

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import onnx_export, ops
from .functional import rnn, uses_relu


def _check_type(value, kind, name):
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{name} should be of type {kind.__name__}, got: {type(value).__name__}")


# Not a subclass of nn.RNN: dynamo refuses to trace nn.RNN instances (and their subclasses), so
# torch.compile(fullgraph=True) would break; the nn.RNN contract is reproduced here instead.
class RNN(nn.Module):
    """Multi-layer Elman RNN, ``h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)``.

    Same constructor, attributes, parameters, ``state_dict``, inputs and outputs as
    :class:`torch.nn.RNN` (including PackedSequence), computed by rnn_ext's compiled kernels.
    """

    def __init__(
        self,
        input_size,
        hidden_size,
        num_layers=1,
        nonlinearity="tanh",
        bias=True,
        batch_first=False,
        dropout=0.0,
        bidirectional=False,
        proj_size=0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if proj_size != 0:  # accepted (as 0) for code that builds LSTMs, GRUs and RNNs alike
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        uses_relu(nonlinearity)  # raises ValueError for an unknown name, as nn.RNN does
        if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the probability of an element being zeroed"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero dropout expects "
                f"num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
                stacklevel=2,
            )
        _check_type(bias, bool, "bias")
        _check_type(batch_first, bool, "batch_first")
        _check_type(input_size, int, "input_size")
        if input_size <= 0:
            raise ValueError("input_size must be greater than zero")
        _check_type(hidden_size, int, "hidden_size")
        if hidden_size <= 0:
            raise ValueError("hidden_size must be greater than zero")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")

        self.nonlinearity = nonlinearity
        self.mode = "RNN_RELU" if nonlinearity == "relu" else "RNN_TANH"
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = 0

        factory = {"device": device, "dtype": dtype}
        directions = 2 if bidirectional else 1
        self._flat_weights_names = []
        self._all_weights = []
        for layer in range(num_layers):
            layer_input_size = input_size if layer == 0 else hidden_size * directions
            for direction in range(directions):
                suffix = "_reverse" if direction == 1 else ""
                shapes = [("weight_ih", (hidden_size, layer_input_size)), ("weight_hh", (hidden_size, hidden_size))]
                if bias:
                    shapes += [("bias_ih", (hidden_size,)), ("bias_hh", (hidden_size,))]
                names = []
                for kind, shape in shapes:
                    name = f"{kind}_l{layer}{suffix}"
                    setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
                    names.append(name)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        self.reset_parameters()

    def reset_parameters(self):
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    @property
    def _flat_weights(self):
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self):
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def flatten_parameters(self):
        """Kept for nn.RNN compatibility; the kernels read the parameters as they are."""

    def extra_repr(self):
        s = "{input_size}, {hidden_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        return s.format(**self.__dict__)

    # -- input checks, with nn.RNN's exception types and messages -------------------------------

    def check_input(self, input, batch_sizes):
        weight_dtype = self.weight_ih_l0.dtype
        if input.dtype != weight_dtype and not torch.is_autocast_enabled(input.device.type):
            raise ValueError(
                f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight_dtype}). "
                f"Convert input: input.to({weight_dtype}), or convert model: model.to({input.dtype})"
            )
        expected_dim = 2 if batch_sizes is not None else 3
        if input.dim() != expected_dim:
            raise RuntimeError(f"input must have {expected_dim} dimensions, got {input.dim()}")
        if self.input_size != input.size(-1):
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {input.size(-1)}"
            )

    def get_expected_hidden_size(self, input, batch_sizes):
        if batch_sizes is not None:
            batch = int(batch_sizes[0])
        else:
            batch = input.size(0) if self.batch_first else input.size(1)
        directions = 2 if self.bidirectional else 1
        return (self.num_layers * directions, batch, self.hidden_size)

    def check_hidden_size(self, hx, expected, msg="Expected hidden size {}, got {}"):
        if hx.size() != expected:
            raise RuntimeError(msg.format(expected, list(hx.size())))

    def check_forward_args(self, input, hidden, batch_sizes):
        self.check_input(input, batch_sizes)
        self.check_hidden_size(hidden, self.get_expected_hidden_size(input, batch_sizes))

    # -- forward -------------------------------------------------------------------------------

    def _run(self, input, hx, batch_sizes, lengths=None):
        return rnn(
            input,
            hx,
            self._flat_weights,
            num_layers=self.num_layers,
            nonlinearity=self.nonlinearity,
            bias=self.bias,
            dropout=self.dropout,
            training=self.training,
            bidirectional=self.bidirectional,
            batch_first=self.batch_first,
            batch_sizes=batch_sizes,
            lengths=lengths,
        )

    def _zero_state(self, input, batch):
        directions = 2 if self.bidirectional else 1
        return torch.zeros(
            self.num_layers * directions, batch, self.hidden_size, dtype=input.dtype, device=input.device
        )

    def forward(self, input, hx=None, lengths=None):
        """As nn.RNN's forward; ``lengths`` (optional) gives each row's length in a padded batch.

        With ``lengths`` (a 1-D integer tensor on the CPU or the input's device, or a list of ints,
        one per batch row, in any order, each in [0, L]), the result is nn.RNN's on the batch packed
        with ``pack_padded_sequence(input, lengths, batch_first, enforce_sorted=False)`` and
        unpacked with ``pad_packed_sequence(..., total_length=L)``: the output is zero past each
        row's length, and h_n holds each row's state after its last step. A row of length 0 (which
        nn.RNN cannot take) gives zero output and h_n = hx.
        """
        if isinstance(input, PackedSequence):
            if onnx_export.exporting_to_onnx():  # before torch.export fails on batch_sizes' values
                onnx_export.refuse_packed_sequence()
            if lengths is not None:
                raise ValueError("RNN: lengths= is for padded input; a PackedSequence already holds its lengths")
            return self._forward_packed(input, hx)

        if input.dim() not in (2, 3):
            raise ValueError(f"RNN: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
        if lengths is not None and input.dim() != 3:
            raise ValueError("RNN: lengths= needs batched 3-D input; unbatched input is one sequence of its full length")
        is_batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not is_batched:
            input = input.unsqueeze(batch_dim)
            if hx is not None:
                if hx.dim() != 2:
                    raise RuntimeError(
                        f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor"
                    )
                hx = hx.unsqueeze(1)
        elif hx is not None and hx.dim() != 3:
            raise RuntimeError(f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
        if hx is None:
            hx = self._zero_state(input, input.size(batch_dim))
        self.check_forward_args(input, hx, None)

        output, h_n = self._run(input, hx, None, lengths)
        if not is_batched:
            output = output.squeeze(batch_dim)
            h_n = h_n.squeeze(1)
        return output, h_n

    def _forward_packed(self, packed, hx):
        data, batch_sizes, sorted_indices, unsorted_indices = packed
        if hx is None:
            hx = self._zero_state(data, int(batch_sizes[0]))
        elif sorted_indices is not None:
            hx = hx.index_select(1, sorted_indices)
        self.check_forward_args(data, hx, batch_sizes)

        output, h_n = self._run(data, hx, batch_sizes)
        if unsorted_indices is not None:
            h_n = h_n.index_select(1, unsorted_indices)
        return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), h_n


_CELL_ACTIVATIONS = {"tanh": False, "relu": True}


# A subclass of nn.RNNCellBase, as nn.RNNCell is (dynamo traces cells, unlike nn.RNN): the same
# constructor, parameters, init, extra_repr and state_dict come with it.
class RNNCell(nn.RNNCellBase):
    """An Elman RNN cell, ``h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh)``: one step, for loops of your own.

    Same constructor, attributes, parameters, ``state_dict``, inputs and outputs as
    :class:`torch.nn.RNNCell`; the step (both products, the biases and the activation) is one call
    of rnn_ext's fused op, and its backward one autograd node.
    """

    __constants__ = ["input_size", "hidden_size", "bias", "nonlinearity"]

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, num_chunks=1, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity

    def forward(self, input, hx=None):
        """input ``[B, I]`` or ``[I]``; hx ``[B, H]`` or ``[H]`` (None: zeros). Returns h' ``[B, H]`` or ``[H]``."""
        if input.dim() not in (1, 2):
            raise ValueError(f"RNNCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"RNNCell: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        relu = _CELL_ACTIVATIONS.get(self.nonlinearity)
        if relu is None:  # nn.RNNCell checks this in forward, with this type
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            hx = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
        elif not is_batched:
            hx = hx.unsqueeze(0)
        h = ops.cell_step(input, hx, *self._weights(), relu)
        return h if is_batched else h.squeeze(0)

    def _weights(self):
        """(weight_ih, weight_hh, bias_ih, bias_hh), read from ``_parameters``: ``Module.__getattr__``
        costs about 0.4 µs a name, as much as a small step. A name not there (moved out by a
        parametrization, weight_norm or a DataParallel replica) is looked up as an attribute."""
        params = self._parameters
        try:
            return params["weight_ih"], params["weight_hh"], params["bias_ih"], params["bias_hh"]
        except KeyError:
            return self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh
