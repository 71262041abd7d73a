"""ONNX export of rnn_ext.RNN with both of torch.onnx.export's exporters, run in onnxruntime and
compared with nn.RNN on the same weights, at two batch and time sizes other than the exported ones."""
import contextlib
import logging
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnn_ext
from reference import allow_rnn, eval_pair

onnx = pytest.importorskip("onnx", reason="ONNX export tests need onnx (pip install onnx onnxscript onnxruntime)")
pytest.importorskip("onnxscript", reason="the default ONNX exporter needs onnxscript (pip install onnxscript)")
ort = pytest.importorskip("onnxruntime", reason="running the exported files needs onnxruntime (pip install onnxruntime)")

EXPORTERS = {"dynamo": True, "torchscript": False}
INPUT, HIDDEN = 4, 5
EXPORT_SIZE = (6, 3)  # (T, B) traced; the files then run at RUN_SIZES
RUN_SIZES = [(9, 2), (4, 5)]

CONFIGS = {
    "2-layer-bidir-tanh": dict(num_layers=2, bidirectional=True),
    "relu": dict(nonlinearity="relu"),
    "no-bias-batch-first": dict(num_layers=2, bias=False, batch_first=True),
    "3-layer-bidir-relu-batch-first": dict(num_layers=3, bidirectional=True, nonlinearity="relu", batch_first=True),
}


class Model(torch.nn.Module):
    """An RNN taking the named inputs ("x", and "hx" and/or "lengths" if listed) positionally."""

    def __init__(self, rnn, inputs):
        super().__init__()
        self.rnn, self.inputs = rnn, inputs

    def forward(self, *tensors):
        given = dict(zip(self.inputs, tensors))
        return self.rnn(given["x"], given.get("hx"), lengths=given.get("lengths"))


def draw_inputs(rnn, inputs, steps, batch):
    """The named inputs for `steps` x `batch`: x (in the RNN's layout), hx, lengths (1..steps, the
    longest = steps)."""
    layout = (batch, steps, INPUT) if rnn.batch_first else (steps, batch, INPUT)
    drawn = {"x": torch.randn(*layout), "hx": torch.randn(rnn.num_layers * (1 + rnn.bidirectional), batch, HIDDEN)}
    lengths = torch.randint(1, steps + 1, (batch,))
    lengths[batch // 2] = steps
    drawn["lengths"] = lengths
    return [drawn[name] for name in inputs]


def nn_rnn_outputs(reference, inputs, tensors):
    """nn.RNN's (output, h_n) on the inputs; with lengths, through pack -> RNN -> pad."""
    given = dict(zip(inputs, tensors))
    x, hx = given["x"], given.get("hx")
    if "lengths" not in given:
        return reference(x, hx)
    time_dim = 1 if reference.batch_first else 0
    packed = pack_padded_sequence(x, given["lengths"], batch_first=reference.batch_first, enforce_sorted=False)
    output, h_n = reference(packed, hx)
    output, _ = pad_packed_sequence(output, batch_first=reference.batch_first, total_length=x.shape[time_dim])
    return output, h_n


def dynamic(rnn, inputs, exporter):
    """The time and batch axes of the inputs, dynamic, in the exporter's own terms."""
    time, batch = (1, 0) if rnn.batch_first else (0, 1)
    axes = {"x": {time: "T", batch: "B"}, "hx": {1: "B"}, "lengths": {0: "B"}}
    if exporter == "torchscript":
        return {"dynamic_axes": {name: axes[name] for name in inputs}}
    dim = torch.export.Dim.DYNAMIC
    return {"dynamic_shapes": (tuple({axis: dim for axis in axes[name]} for name in inputs),)}  # for *tensors


@contextlib.contextmanager
def quiet():
    """The exporters' progress lines, warnings and logging, which say nothing about the result."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(None):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def export(model, example, path, exporter, **options):
    with quiet():
        torch.onnx.export(model, tuple(example), path, dynamo=EXPORTERS[exporter], **options)


def export_and_check(tmp_path, exporter, config, inputs):
    ours, reference = eval_pair(INPUT, HIDDEN, **config)
    path = tmp_path / "rnn.onnx"
    example = draw_inputs(ours, inputs, *EXPORT_SIZE)
    export(Model(ours, inputs), example, path, exporter, input_names=list(inputs),
           output_names=["output", "h_n"], **dynamic(ours, inputs, exporter))

    graph = onnx.load(path).graph
    assert [node.op_type for node in graph.node].count("RNN") == ours.num_layers
    assert all(node.domain in ("", "ai.onnx") for node in graph.node), "only standard ONNX operators"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for steps, batch in RUN_SIZES:
        tensors = draw_inputs(ours, inputs, steps, batch)
        output, h_n = session.run(None, {name: t.numpy() for name, t in zip(inputs, tensors)})
        with torch.no_grad():
            expected = nn_rnn_outputs(reference, inputs, tensors)
        torch.testing.assert_close((torch.from_numpy(output), torch.from_numpy(h_n)), expected)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_matches_nn_rnn(tmp_path, exporter, config):
    export_and_check(tmp_path, exporter, CONFIGS[config], ("x", "hx"))


@pytest.mark.parametrize("inputs", [("x",), ("x", "lengths"), ("x", "hx", "lengths")], ids="+".join)
@pytest.mark.parametrize("config", ["2-layer-bidir-tanh", "3-layer-bidir-relu-batch-first"])
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_without_hx_and_with_lengths(tmp_path, exporter, config, inputs):
    """hx left out (zeros), and lengths= exported as the RNN nodes' sequence_lens."""
    export_and_check(tmp_path, exporter, CONFIGS[config], inputs)


def test_nn_rnn_default_export_cannot_keep_time_dynamic(tmp_path):
    """Why the README says rnn_ext keeps the time axis dynamic where nn.RNN does not: nn.RNN's
    decomposition unrolls time, and a dynamic time axis is refused (checked, so this stays true)."""
    with pytest.raises(Exception, match="static shape"):
        export(torch.nn.RNN(INPUT, HIDDEN).eval(), (torch.randn(*EXPORT_SIZE, INPUT),), tmp_path / "nn.onnx", "dynamo",
               dynamic_shapes=({0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC},))


@pytest.mark.parametrize("lengths_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_row_of_length_zero_matches_eager(tmp_path, exporter, lengths_dtype):
    """A row of length 0 (which nn.RNN cannot take): onnxruntime gives what rnn_ext gives in eager
    mode, zero output and h_n = hx. Also lengths given as int32."""
    ours, _ = eval_pair(INPUT, HIDDEN, **CONFIGS["2-layer-bidir-tanh"])
    inputs = ("x", "hx", "lengths")
    path = tmp_path / "rnn.onnx"
    x, hx, lengths = draw_inputs(ours, inputs, *EXPORT_SIZE)
    export(Model(ours, inputs), (x, hx, lengths.to(lengths_dtype)), path, exporter,
           input_names=list(inputs), **dynamic(ours, inputs, exporter))
    x, hx, _ = draw_inputs(ours, inputs, 5, 3)
    lengths = torch.tensor([5, 0, 2], dtype=lengths_dtype)
    output, h_n = ort.InferenceSession(str(path)).run(None, {"x": x.numpy(), "hx": hx.numpy(), "lengths": lengths.numpy()})
    with torch.no_grad():
        expected = ours(x, hx, lengths=lengths)
    torch.testing.assert_close((torch.from_numpy(output), torch.from_numpy(h_n)), expected)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_exports_a_model_on_device(tmp_path, exporter, device):
    """A model on the GPU exports (lengths= stays on the CPU as given); the file runs on the CPU."""
    ours, reference = eval_pair(INPUT, HIDDEN, **CONFIGS["2-layer-bidir-tanh"])
    inputs = ("x", "hx", "lengths")
    example = draw_inputs(ours, inputs, *EXPORT_SIZE)
    path = tmp_path / "rnn.onnx"
    export(Model(ours.to(device), inputs), [example[0].to(device), example[1].to(device), example[2]], path,
           exporter, input_names=list(inputs), **dynamic(ours, inputs, exporter))
    tensors = draw_inputs(ours, inputs, 9, 2)
    output, h_n = ort.InferenceSession(str(path)).run(None, {n: t.numpy() for n, t in zip(inputs, tensors)})
    with torch.no_grad():
        expected = nn_rnn_outputs(reference, inputs, tensors)
    torch.testing.assert_close((torch.from_numpy(output), torch.from_numpy(h_n)), expected)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_refuses_bfloat16(tmp_path, exporter):
    """ONNX's RNN before opset 22 has no bfloat16: refused, rather than a file no runtime opens."""
    ours = rnn_ext.RNN(INPUT, HIDDEN, dtype=torch.bfloat16).eval()
    with pytest.raises(torch.onnx.OnnxExporterError, match="bfloat16"):
        export(ours, (torch.randn(*EXPORT_SIZE, INPUT, dtype=torch.bfloat16),), tmp_path / "rnn.onnx", exporter)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_refuses_dropout_in_training(tmp_path, exporter):
    """As nn.RNN's export refuses it: ONNX's RNN has no dropout."""
    ours = rnn_ext.RNN(INPUT, HIDDEN, num_layers=2, dropout=0.5).train()
    x = torch.randn(*EXPORT_SIZE, INPUT)
    with pytest.raises(torch.onnx.OnnxExporterError, match="dropout in training mode"):
        export(ours, (x,), tmp_path / "rnn.onnx", exporter, training=torch.onnx.TrainingMode.TRAINING)
    export(ours.eval(), (x,), tmp_path / "rnn.onnx", exporter)  # in eval mode, dropout is off and it exports


class PackingModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = rnn_ext.RNN(INPUT, HIDDEN)

    def forward(self, x, lengths):
        output, h_n = self.rnn(pack_padded_sequence(x, lengths, enforce_sorted=False))
        return pad_packed_sequence(output)[0], h_n


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_refuses_packed_sequence_and_names_lengths(tmp_path, exporter):
    x = torch.randn(*EXPORT_SIZE, INPUT)
    lengths = torch.tensor([6, 2, 4])
    with pytest.raises(torch.onnx.OnnxExporterError, match="lengths"):
        export(PackingModel().eval(), (x, lengths), tmp_path / "rnn.onnx", exporter)


def test_onnx_export_leaves_eager_and_compiled_runs_alone():
    """The export switch is off outside torch.onnx.export, and a fullgraph compile, which reads it
    (through _flags, not the property dynamo refuses), still compiles and matches eager."""
    ours, _ = eval_pair(INPUT, HIDDEN, **CONFIGS["2-layer-bidir-tanh"])
    x = torch.randn(*EXPORT_SIZE, INPUT)
    assert not rnn_ext.onnx_export.exporting_to_onnx()
    expected = ours(x)
    torch._dynamo.reset()
    with allow_rnn():
        torch.testing.assert_close(torch.compile(ours, fullgraph=True, backend="aot_eager")(x), expected)


class CellLoop(torch.nn.Module):
    """An RNNCell run over the time axis of x [T, B, I] by a Python loop, as cell users write it."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, x, h):
        outputs = []
        for step in x.unbind(0):
            h = self.cell(step, h)
            outputs.append(h)
        return torch.stack(outputs), h


@pytest.mark.parametrize("cell_config", [dict(), dict(nonlinearity="relu", bias=False)], ids=["tanh", "relu-no-bias"])
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_rnn_cell_matches_nn_rnn_cell(tmp_path, exporter, cell_config):
    """RNNCell exports as standard operators (Gemm/MatMul, Add, the activation), as nn.RNNCell
    does; the loop is unrolled at export, so the time length is the exported one."""
    torch.manual_seed(0)
    reference = torch.nn.RNNCell(INPUT, HIDDEN, **cell_config)
    ours = rnn_ext.RNNCell(INPUT, HIDDEN, **cell_config)
    ours.load_state_dict(reference.state_dict())
    steps = EXPORT_SIZE[0]
    path = tmp_path / "cell.onnx"
    batch_axis = {"dynamic_axes": {"x": {1: "B"}, "h": {0: "B"}}} if exporter == "torchscript" else {
        "dynamic_shapes": ({1: torch.export.Dim.DYNAMIC}, {0: torch.export.Dim.DYNAMIC})}
    export(CellLoop(ours), (torch.randn(steps, 3, INPUT), torch.randn(3, HIDDEN)), path, exporter,
           input_names=["x", "h"], **batch_axis)
    assert all(node.domain in ("", "ai.onnx") for node in onnx.load(path).graph.node)
    session = ort.InferenceSession(str(path))
    for batch in (2, 5):
        x, h = torch.randn(steps, batch, INPUT), torch.randn(batch, HIDDEN)
        outputs = session.run(None, {"x": x.numpy(), "h": h.numpy()})
        with torch.no_grad():
            expected = CellLoop(reference)(x, h)
        torch.testing.assert_close(tuple(map(torch.from_numpy, outputs)), expected)
