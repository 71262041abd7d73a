"""``rnn_ext.RNN`` and ``rnn_ext.RNNCell``: drop-ins for ``torch.nn.RNN`` and ``torch.nn.RNNCell``
running on rnn_ext's kernels."""
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import onnx_export, ops
from .functional import rnn


_Proxy = torch.fx.Proxy


def _fx_proxies(input, hx):
    """Whether torch.fx.symbolic_trace is tracing this call (its arguments are Proxies). Two plain
    isinstance checks: a generator here would cost as much as a small cell step's arithmetic."""
    return isinstance(input, _Proxy) or isinstance(hx, _Proxy)


def _fx_leaf_call(module, *args, **kwargs):
    """The call as symbolic_trace records torch.nn's modules: one ``call_module`` node (a leaf), run by
    the module itself in the GraphModule. symbolic_trace traces into the forward of modules from
    outside torch.nn, where the checks on sizes and types cannot run on Proxies."""
    tracer = next(a.tracer for a in args if isinstance(a, _Proxy))
    path = tracer.path_of_module(module)
    if not path:
        raise torch.fx.proxy.TraceError(
            f"symbolic_trace of rnn_ext.{type(module).__name__} itself: trace a module that holds it (it is "
            f"recorded there as one call, as torch.nn's modules are)"
        )
    kwargs = {name: value for name, value in kwargs.items() if value is not None}
    return tracer.create_proxy("call_module", path, args, kwargs)


def _refuse_torchscript(module):
    raise RuntimeError(
        f"rnn_ext.{type(module).__name__} does not support TorchScript (torch.jit.script): its forward calls "
        f"rnn_ext's compiled ops through Python. torch.export.export and torch.jit.trace record those ops; use "
        f"either to get a graph of the model"
    )


class RNN(nn.RNN):
    """Multi-layer Elman RNN, ``h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)``.

    An :class:`torch.nn.RNN` (``isinstance`` holds, and its constructor, attributes, parameters,
    ``_flat_weights``, ``state_dict``, pickling and checks are nn.RNN's own) whose forward runs on
    rnn_ext's compiled kernels, with the same inputs and outputs (PackedSequence included) and an
    optional ``lengths=``.

    Like nn.RNN, torch.compile breaks the graph at this module (dynamo refuses every nn.RNN);
    ``torch._dynamo.config.allow_rnn = True`` lets it trace the forward, which then compiles whole
    (``fullgraph=True``).
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
        # proj_size sits where nn.RNNBase has it; nn.RNN refuses it even as 0, rnn_ext accepts 0 for
        # code that builds LSTMs, GRUs and RNNs alike.
        if proj_size != 0:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__(
            input_size, hidden_size, num_layers, nonlinearity, bias, batch_first, dropout, bidirectional,
            device=device, dtype=dtype,
        )

    def flatten_parameters(self):
        """Kept for nn.RNN compatibility; the kernels read the parameters as they are (nn.RNN's
        copies them into one cuDNN buffer)."""

    def __prepare_scriptable__(self):
        _refuse_torchscript(self)

    def _weights_now(self):
        """``_flat_weights`` as nn.RNN's forward refreshes it (``_update_flat_weights``: a weight replaced
        without ``__setattr__``, by a parametrization or ``functional_call``, is picked up; a list assigned
        to ``_flat_weights`` is used as it is), reading ``_parameters`` first, the quick way. A weight
        that is gone (``del rnn.bias_ih_l0``) raises AttributeError naming it, where nn.RNN would run on
        the stale tensor."""
        params = self._parameters
        changed = False
        for name, ref in zip(self._flat_weights_names, self._flat_weight_refs):
            weight = params.get(name)
            if weight is None:
                weight = getattr(self, name, None)
                if weight is None:
                    raise AttributeError(
                        f"'{type(self).__name__}' object has no attribute '{name}': forward needs every weight "
                        f"in _flat_weights_names; set it again (a Parameter or a tensor) after deleting it"
                    )
            changed = changed or (ref is not None and ref() is not weight)
        if changed:
            self._init_flat_weights()
        return self._flat_weights

    # -- forward -------------------------------------------------------------------------------

    def _run(self, input, hx, batch_sizes, lengths=None):
        return rnn(
            input,
            hx,
            self._weights_now(),
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
        if _fx_proxies(input, hx):
            return _fx_leaf_call(self, input, hx, lengths=lengths)
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


class RNNCell(nn.RNNCell):
    """An Elman RNN cell, ``h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh)``: one step, for loops of your own.

    An :class:`torch.nn.RNNCell` (its constructor, attributes, parameters, init and ``state_dict``)
    whose step (both products, the biases and the activation) is one call of rnn_ext's fused op, and
    its backward one autograd node.
    """

    def __prepare_scriptable__(self):
        _refuse_torchscript(self)

    def forward(self, input, hx=None):
        """input ``[B, I]`` or ``[I]``; hx ``[B, H]`` or ``[H]`` (None: zeros). Returns h' ``[B, H]`` or ``[H]``."""
        if _fx_proxies(input, hx):
            return _fx_leaf_call(self, input, hx)
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
