"""ONNX export: each layer of rnn_ext.RNN becomes one node of ONNX's ``RNN`` operator, as nn.RNN's does.

Both of ``torch.onnx.export``'s exporters are served, and importing rnn_ext is all it takes:

- the default exporter (``dynamo=True``) runs the model under ``torch.export``; while it does,
  ``rnn_ext.rnn`` runs each layer as :func:`rnn_node`, which emits the node with ``torch.onnx.ops``
  (that exporter has no global registry for custom ops, but it converts these);
- the TorchScript-based exporter (``dynamo=False``) traces ``rnn_ext::rnn_layer`` itself; the
  symbolic registered at import (:func:`_torchscript_rnn_layer`) turns each call into the node.

ONNX's RNN takes ``X [T, B, I]``, ``W [D, H, I]``, ``R [D, H, H]``, ``B [D, 2H]`` (``b_ih`` then
``b_hh``; omitted without bias), ``sequence_lens [B]`` int32 (omitted without ``lengths``) and
``initial_h [D, B, H]``; it returns ``Y [T, D, B, H]`` (zero past each row's length) and
``Y_h [D, B, H]``. The layer's ``[T*B, I] -> [T*B, D*H]`` rows are reshaped around it, with T and B
read from the tensors, so the time and batch axes stay dynamic in both exporters.
"""
import torch

try:  # the flags behind torch.onnx.is_in_onnx_export(), one per exporter; see exporting_to_onnx
    from torch.onnx._internal.exporter import _flags as _dynamo_exporter_flags
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS as _torchscript_exporter_globals
except ImportError:  # a torch that moved them: then torch.export(strict=True) captures miss the export
    _dynamo_exporter_flags = _torchscript_exporter_globals = None

# Every opset either exporter writes has RNN (since opset 7) with these inputs and attributes.
_RNN_OPSET = 7
_ONNX_INT32 = 6  # TensorProto.INT32, the type of sequence_lens


def exporting_to_onnx():
    """``torch.onnx.is_in_onnx_export()``, read from its flags. Dynamo folds that function to False.
    When the default exporter's first capture (non-strict) fails, say on our refusal of dropout in
    training, it tries ``torch.export(strict=True)``, under dynamo; there the public function would
    let the op be traced as it is, that capture would succeed, and the export would end in a
    ConversionError on rnn_ext::rnn_layer. Seen through the flags, the export is refused there too
    (or, for an exportable model, ``torch.onnx.ops`` stops dynamo), and the exporter reports the
    first failure: ours. Also cheaper (0.1 µs against 0.9): this runs once a forward."""
    if _dynamo_exporter_flags is None:
        return torch.onnx.is_in_onnx_export()
    if _dynamo_exporter_flags._is_onnx_exporting:
        return True
    # Dynamo refuses to trace this property; the TorchScript exporter never runs under dynamo.
    return not torch.compiler.is_dynamo_compiling() and _torchscript_exporter_globals.in_onnx_export


def emits_onnx_nodes():
    """True while the default (dynamo) exporter captures the model: the layer is then written as
    the ONNX node. The TorchScript exporter traces with torch.jit; there the op is traced as it is
    and its registered symbolic converts it."""
    return exporting_to_onnx() and not torch.jit.is_tracing()


# What ONNX's RNN cannot express is refused, as nn.RNN's export refuses it, with its exception type.
def check_exportable(dropout, training, num_layers, batch_sizes, dtype):
    if dtype not in (torch.float16, torch.float32, torch.float64):
        raise torch.onnx.OnnxExporterError(
            f"rnn_ext: ONNX export of RNN in {dtype} is not supported (ONNX's RNN operator takes float16, "
            "float32 or float64 before opset 22); convert the model first, e.g. model.float()"
        )
    if dropout > 0 and training and num_layers > 1:
        raise torch.onnx.OnnxExporterError(
            "rnn_ext: ONNX export of RNN with dropout in training mode is not supported "
            "(ONNX's RNN operator has no dropout); export the model in eval mode (model.eval())"
        )
    if batch_sizes is not None:
        refuse_packed_sequence()


def refuse_packed_sequence():
    raise torch.onnx.OnnxExporterError(
        "rnn_ext: ONNX export of a PackedSequence is not supported; pass the padded batch and its "
        "lengths (RNN(...)(padded, lengths=lengths)), which export as ONNX's sequence_lens"
    )


def _attributes(directions, hidden, relu):
    return {
        "activations": ["Relu" if relu else "Tanh"] * directions,
        "direction": "bidirectional" if directions == 2 else "forward",
        "hidden_size": hidden,
    }


def rnn_node(input, hx, weights, batch_sizes, relu, lengths=None):
    """``ops.run_layer`` (input ``[T*B, I]``, hx ``[D, B, H]``, one layer's weights as nn.RNN's flat
    list) as an ONNX RNN node, for the default exporter. Returns (output ``[T*B, D*H]``, h_n ``[D, B, H]``).
    ``batch_sizes`` is None: check_exportable has refused a packed batch."""
    directions, batch, hidden = hx.shape
    per_direction = len(weights) // directions
    by_direction = [weights[d * per_direction : (d + 1) * per_direction] for d in range(directions)]
    w = torch.stack([ws[0] for ws in by_direction])
    r = torch.stack([ws[1] for ws in by_direction])
    b = torch.stack([torch.cat(ws[2:4]) for ws in by_direction]) if per_direction == 4 else None
    if lengths is not None:
        lengths = lengths.to(hx.device)  # on the CPU (checked_lengths)
    sequence_lens = None if lengths is None else lengths.to(torch.int32)
    x = input.reshape(-1, batch, input.shape[1])
    steps = x.shape[0]
    y, y_h = torch.onnx.ops.symbolic_multi_out(
        "RNN",
        [x, w, r, b, sequence_lens, hx],
        _attributes(directions, hidden, relu),
        dtypes=[input.dtype, input.dtype],
        shapes=[[steps, directions, batch, hidden], [directions, batch, hidden]],
        version=_RNN_OPSET,
    )
    output = y.permute(0, 2, 1, 3).reshape(steps * batch, directions * hidden)
    if lengths is not None:
        # A row of length 0 keeps h_n = hx in rnn_ext (nn.RNN takes none); ONNX leaves that row's
        # Y_h unspecified, and onnxruntime gives zeros.
        y_h = torch.where((lengths == 0).view(1, batch, 1), hx, y_h)
    return output, y_h


def cell_nodes(input, hx, w_ih, w_hh, b_ih, b_hh, relu):
    """``ops.cell_step`` as standard operators (ONNX has no cell operator), for the default exporter."""
    pre_activation = torch.nn.functional.linear(input, w_ih, b_ih) + torch.nn.functional.linear(hx, w_hh, b_hh)
    return torch.relu(pre_activation) if relu else torch.tanh(pre_activation)


def _torchscript_rnn_layer(g, input, hx, w_ih, w_hh, b_ih, b_hh, w_ih_r, w_hh_r, b_ih_r, b_hh_r, batch_sizes, relu, lengths):
    """The symbolic of rnn_ext::rnn_layer for the TorchScript-based exporter (arguments as the op's schema)."""
    from torch.onnx import symbolic_helper as sh

    if not sh._is_none(batch_sizes):
        refuse_packed_sequence()
    directions = 1 if sh._is_none(w_ih_r) else 2
    hidden, input_size = sh._get_tensor_sizes(w_ih)
    weights = [[w_ih, w_hh, b_ih, b_hh], [w_ih_r, w_hh_r, b_ih_r, b_hh_r]][:directions]

    def stacked(tensors):
        return g.op("Concat", *[sh._unsqueeze_helper(g, t, [0]) for t in tensors], axis_i=0)

    w = stacked([ws[0] for ws in weights])
    r = stacked([ws[1] for ws in weights])
    if sh._is_none(b_ih):
        b = sh._optional_input_placeholder_tensor(g)  # an omitted optional input
    else:
        b = stacked([g.op("Concat", ws[2], ws[3], axis_i=0) for ws in weights])
    if sh._is_none(lengths):
        sequence_lens = sh._optional_input_placeholder_tensor(g)
    else:
        sequence_lens = g.op("Cast", lengths, to_i=_ONNX_INT32)

    batch = sh._slice_helper(g, g.op("Shape", hx), axes=[0], starts=[1], ends=[2])
    x_shape = g.op("Concat", g.op("Constant", value_t=torch.tensor([-1])), batch,
                   g.op("Constant", value_t=torch.tensor([input_size])), axis_i=0)
    x = g.op("Reshape", input, x_shape)
    attributes = _attributes(directions, hidden, sh._maybe_get_const(relu, "b"))
    y, y_h = g.op(
        "RNN", x, w, r, b, sequence_lens, hx,
        activations_s=attributes["activations"], direction_s=attributes["direction"],
        hidden_size_i=attributes["hidden_size"], outputs=2,
    )
    y = g.op("Transpose", y, perm_i=[0, 2, 1, 3])
    output = g.op("Reshape", y, g.op("Constant", value_t=torch.tensor([-1, directions * hidden])))
    if not sh._is_none(lengths):  # h_n = hx on rows of length 0, as in rnn_node
        empty = g.op("Equal", lengths, g.op("Constant", value_t=torch.tensor(0, dtype=torch.int64)))
        y_h = g.op("Where", sh._unsqueeze_helper(g, empty, [0, 2]), hx, y_h)
    return output, y_h


def _torchscript_rnn_cell(g, input, hx, w_ih, w_hh, b_ih, b_hh, relu):
    """The symbolic of rnn_ext::rnn_cell for the TorchScript-based exporter: two Gemms and the activation."""
    from torch.onnx import symbolic_helper as sh

    def gemm(x, w, b):  # x @ w^T (+ b)
        return g.op("Gemm", x, w, transB_i=1) if sh._is_none(b) else g.op("Gemm", x, w, b, transB_i=1)

    pre_activation = g.op("Add", gemm(input, w_ih, b_ih), gemm(hx, w_hh, b_hh))
    return g.op("Relu" if sh._maybe_get_const(relu, "b") else "Tanh", pre_activation)


torch.onnx.register_custom_op_symbolic("rnn_ext::rnn_layer", _torchscript_rnn_layer, _RNN_OPSET)
torch.onnx.register_custom_op_symbolic("rnn_ext::rnn_cell", _torchscript_rnn_cell, _RNN_OPSET)
