"""rnn_ext.RNNCell and the rnn_cell op against torch.nn.RNNCell, a plain PyTorch step, gradcheck
and opcheck; BPTT loops, compile/export, autocast and nn.RNNCell's exception types.

Batches straddle the CPU kernel's split (up to 8 rows: the dot-product kernels, more: ATen GEMMs)
and sizes straddle its vector widths (16 floats, 8 doubles with AVX-512)."""
import copy

import pytest
import torch

import rnn_ext
from reference import assert_as_accurate_as, randn
from rnn_ext import ops

BATCHES = (1, 3, 8, 9, 16)


def make_cells(input_size, hidden_size, dtype=torch.float64, device="cpu", **kwargs):
    """(rnn_ext.RNNCell, torch.nn.RNNCell) with identical weights, built on the CPU and moved."""
    ours = rnn_ext.RNNCell(input_size, hidden_size, dtype=dtype, **kwargs)
    theirs = torch.nn.RNNCell(input_size, hidden_size, dtype=dtype, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    return ours.to(device), theirs.to(device)


def reference_cell(x, h, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh"):
    """The step written out in plain PyTorch."""
    z = x @ w_ih.t() + h @ w_hh.t()
    if b_ih is not None:
        z = z + b_ih + b_hh
    return torch.relu(z) if nonlinearity == "relu" else torch.tanh(z)


def step_and_grads(cell, x, hx, grad):
    """h' and the gradients of x, hx (where they require grad) and every parameter."""
    h = cell(x, hx) if hx is not None else cell(x)
    wrt = [t for t in (x, hx) if t is not None and t.requires_grad] + list(cell.parameters())
    return [h, *torch.autograd.grad((h * grad).sum(), wrt)]


def float64_copy(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def assert_cell_parity(ours, theirs, x, hx, grad):
    ours_result = step_and_grads(ours, x, hx, grad)
    theirs_result = step_and_grads(theirs, x, hx, grad)
    if x.dtype == torch.float64:
        torch.testing.assert_close(ours_result, theirs_result)
    else:
        exact = step_and_grads(copy.deepcopy(theirs).double(), float64_copy(x), float64_copy(hx), grad.double())
        # assert_as_accurate_as takes nn.RNN's (output, h_n, grads): a cell's output is its state.
        layer_like = lambda result: (result[0], result[0], result[1:])  # noqa: E731
        assert_as_accurate_as(layer_like(ours_result), layer_like(theirs_result), layer_like(exact))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("batch", BATCHES)
def test_step_matches_nn_rnncell(batch, nonlinearity, bias, dtype, device):
    torch.manual_seed(batch)
    ours, theirs = make_cells(17, 33, dtype=dtype, device=device, bias=bias, nonlinearity=nonlinearity)
    x = randn(batch, 17, dtype=dtype, device=device, requires_grad=True)
    hx = randn(batch, 33, dtype=dtype, device=device, requires_grad=True)
    assert_cell_parity(ours, theirs, x, hx, randn(batch, 33, dtype=dtype, device=device))


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_hx", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_unbatched_and_default_hx(batched, with_hx, dtype, device):
    torch.manual_seed(1)
    ours, theirs = make_cells(5, 24, dtype=dtype, device=device)
    lead = (4,) if batched else ()
    x = randn(*lead, 5, dtype=dtype, device=device, requires_grad=True)
    hx = randn(*lead, 24, dtype=dtype, device=device, requires_grad=True) if with_hx else None
    grad = randn(*lead, 24, dtype=dtype, device=device)
    assert ours(x, hx).shape == theirs(x, hx).shape == (*lead, 24)
    assert_cell_parity(ours, theirs, x, hx, grad)


@pytest.mark.parametrize("size", [(1, 1), (16, 16), (32, 256), (40, 7), (128, 9)])
@pytest.mark.parametrize("batch", [1, 2, 8, 12])
def test_matches_plain_pytorch_step(size, batch, device):
    input_size, hidden = size
    torch.manual_seed(hidden)
    w_ih, w_hh = randn(hidden, input_size, device=device), randn(hidden, hidden, device=device)
    b_ih, b_hh = randn(hidden, device=device), randn(hidden, device=device)
    x, h = randn(batch, input_size, device=device), randn(batch, hidden, device=device)
    for nonlinearity in ("tanh", "relu"):
        expected = reference_cell(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity)
        torch.testing.assert_close(rnn_ext.rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity), expected)


@pytest.mark.parametrize("batch", [2, 10])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("seq_len", [1, 6])
def test_bptt_loop_matches_nn_rnncell(batch, nonlinearity, seq_len, device):
    torch.manual_seed(seq_len)
    ours, theirs = make_cells(6, 20, device=device, nonlinearity=nonlinearity)
    xs = randn(seq_len, batch, 6, device=device, requires_grad=True)
    h0 = randn(batch, 20, device=device, requires_grad=True)
    grads = randn(seq_len, batch, 20, device=device)
    results = []
    for cell in (ours, theirs):
        h, outputs = h0, []
        for t in range(seq_len):
            h = cell(xs[t], h)
            outputs.append(h)
        outputs = torch.stack(outputs)
        results.append([outputs, *torch.autograd.grad((outputs * grads).sum(), [xs, h0, *cell.parameters()])])
    torch.testing.assert_close(results[0], results[1])


def test_noncontiguous_and_batch_first_slices(device):
    torch.manual_seed(2)
    ours, theirs = make_cells(8, 16, device=device)
    batch_first = randn(3, 5, 8, device=device)  # x[:, t] is a strided view
    h = randn(16, 3, device=device).t()           # a transposed hx
    for t in range(5):
        torch.testing.assert_close(ours(batch_first[:, t], h), theirs(batch_first[:, t], h))


def test_empty_batch(device):
    ours, theirs = make_cells(3, 4, device=device)
    x = torch.zeros(0, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert ours(x).shape == theirs(x).shape == (0, 4)
    for cell in (ours, theirs):
        cell.zero_grad(set_to_none=True)
        cell(x).sum().backward()
    for mine, reference in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(mine.grad, reference.grad)  # zeros, not uninitialized memory


@pytest.mark.parametrize("batch", [2, 10])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_gradcheck_and_gradgradcheck(batch, bias, relu, device):
    torch.manual_seed(3)
    args = [randn(batch, 3, device=device, requires_grad=True), randn(batch, 4, device=device, requires_grad=True),
            randn(4, 3, device=device, requires_grad=True), randn(4, 4, device=device, requires_grad=True)]
    args += [randn(4, device=device, requires_grad=True), randn(4, device=device, requires_grad=True)] if bias else [None, None]

    def step(x, h, w_ih, w_hh, *biases):
        return ops.rnn_cell(x, h, w_ih, w_hh, *(biases or (None, None)), relu)

    tensors = [a for a in args if a is not None]
    call = (lambda *t: step(*t)) if bias else (lambda x, h, w_ih, w_hh: step(x, h, w_ih, w_hh))
    assert torch.autograd.gradcheck(call, tensors)
    assert torch.autograd.gradgradcheck(call, tensors)


def cell_sample(batch, bias=True, relu=False, requires_grad=False, device="cpu", dtype=torch.float64):
    torch.manual_seed(batch)
    make = lambda *shape: randn(*shape, dtype=dtype, device=device, requires_grad=requires_grad)  # noqa: E731
    biases = (make(5), make(5)) if bias else (None, None)
    return (make(batch, 3), make(batch, 5), make(5, 3), make(5, 5), *biases, relu)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("bias,relu", [(True, False), (False, True)])
@pytest.mark.parametrize("batch", [1, 11])
def test_opcheck_forward(batch, bias, relu, requires_grad, device):
    args = cell_sample(batch, bias, relu, requires_grad, device)
    torch.library.opcheck(torch.ops.rnn_ext.rnn_cell.default, args)


@pytest.mark.parametrize(
    "mask", [(True, True, True), (False, True, True), (True, False, False), (False, False, True)]
)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 11])
def test_opcheck_backward(batch, bias, mask, device):
    x, h, w_ih, w_hh, b_ih, b_hh, relu = cell_sample(batch, bias, device=device)
    weights = [w for w in (w_ih, w_hh, b_ih, b_hh) if w is not None]
    output = ops.rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, relu)
    args = (randn(batch, 5, device=device), x, h, weights, relu, output, list(mask))
    torch.library.opcheck(torch.ops.rnn_ext.rnn_cell_backward.default, args)
    full = ops.rnn_cell_backward(*args[:-1], [True, True, True])
    masked = ops.rnn_cell_backward(*args)
    for wanted, got, expected in zip(mask, masked, full):
        if wanted:
            torch.testing.assert_close(got, expected)
        else:
            assert len(got) == 0 if isinstance(got, list) else got.numel() == 0


class Decoder(torch.nn.Module):
    """A Python loop over cells, as decoders write it."""

    def __init__(self, cell_type):
        super().__init__()
        self.cell = cell_type(4, 8)

    def forward(self, xs, h):
        outputs = []
        for t in range(xs.shape[0]):
            h = self.cell(xs[t], h)
            outputs.append(h)
        return torch.stack(outputs), h


def test_compile_fullgraph_loop_matches_eager():
    torch.manual_seed(4)
    model = Decoder(rnn_ext.RNNCell).double()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    xs, h = randn(5, 3, 4, requires_grad=True), randn(3, 8, requires_grad=True)
    eager_out = model(xs, h)
    compiled_out = compiled(xs, h)
    torch.testing.assert_close(compiled_out, eager_out)
    grad = randn(5, 3, 8)
    eager_grads = torch.autograd.grad((eager_out[0] * grad).sum(), [xs, h, *model.parameters()])
    compiled_grads = torch.autograd.grad((compiled_out[0] * grad).sum(), [xs, h, *model.parameters()])
    torch.testing.assert_close(compiled_grads, eager_grads)


def test_compile_inductor_no_grad_loop():
    torch.manual_seed(5)
    model = Decoder(rnn_ext.RNNCell)
    compiled = torch.compile(model, fullgraph=True)
    xs, h = torch.randn(4, 2, 4), torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(xs, h), model(xs, h))


def test_export_loop_runs_and_matches():
    torch.manual_seed(6)
    model = Decoder(rnn_ext.RNNCell).double()
    xs, h = randn(5, 3, 4), randn(3, 8)
    batch = torch.export.Dim("batch", min=1)
    exported = torch.export.export(model, (xs, h), dynamic_shapes=({1: batch}, {0: batch}))
    assert any("rnn_ext.rnn_cell" in str(node.target) for node in exported.graph.nodes)
    xs2, h2 = randn(5, 7, 4), randn(7, 8)
    torch.testing.assert_close(exported.module()(xs2, h2), model(xs2, h2))


def test_jit_trace_matches():
    model = Decoder(rnn_ext.RNNCell).double()
    xs, h = randn(3, 2, 4), randn(2, 8)
    traced = torch.jit.trace(model, (xs, h))
    torch.testing.assert_close(traced(xs, h), model(xs, h))


def test_autocast_bfloat16_as_nn_rnncell():
    torch.manual_seed(7)
    ours, theirs = make_cells(16, 32, dtype=torch.float32)
    x, h = torch.randn(4, 16), torch.randn(4, 32)
    exact = theirs.double()(x.double(), h.double())
    theirs.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours_out, theirs_out = ours(x, h), theirs(x, h)
    assert ours_out.dtype == theirs_out.dtype == torch.bfloat16
    ours_error = (ours_out.double() - exact).abs().max()
    theirs_error = (theirs_out.double() - exact).abs().max()
    assert ours_error <= 2 * theirs_error + 1e-3, (ours_error, theirs_error)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours(x.requires_grad_(), h).float().sum().backward()
    assert ours.weight_ih.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_modules(dtype):
    torch.manual_seed(8)
    ours, theirs = make_cells(16, 24, dtype=torch.float32)
    x, h = torch.randn(3, 16), torch.randn(3, 24)
    exact = copy.deepcopy(theirs).double()(x.double(), h.double())
    ours.to(dtype), theirs.to(dtype)
    ours_out, theirs_out = ours(x.to(dtype), h.to(dtype)), theirs(x.to(dtype), h.to(dtype))
    assert ours_out.dtype == dtype
    assert (ours_out.double() - exact).abs().max() <= 2 * (theirs_out.double() - exact).abs().max() + 1e-3


def test_module_contract_matches_nn_rnncell():
    for kwargs in ({}, dict(bias=False), dict(nonlinearity="relu")):
        torch.manual_seed(9)
        ours = rnn_ext.RNNCell(3, 5, **kwargs)
        torch.manual_seed(9)
        theirs = torch.nn.RNNCell(3, 5, **kwargs)
        assert repr(ours) == repr(theirs)
        assert [name for name, _ in ours.named_parameters()] == [name for name, _ in theirs.named_parameters()]
        for mine, reference in zip(ours.parameters(), theirs.parameters()):  # the same init, draw for draw
            torch.testing.assert_close(mine, reference)
        ours.load_state_dict(theirs.state_dict())
        theirs.load_state_dict(ours.state_dict())
    assert isinstance(ours, torch.nn.RNNCellBase)
    assert ours.input_size == 3 and ours.hidden_size == 5 and ours.nonlinearity == "relu"
    cell = rnn_ext.RNNCell(3, 5, device="cpu", dtype=torch.float64)
    assert cell.weight_hh.dtype == torch.float64


def bad_inputs():
    return {
        "wrong feature size": (torch.randn(2, 5), None),
        "wrong hx size": (torch.randn(2, 4), torch.randn(2, 4)),
        "3-D input": (torch.randn(1, 2, 4), None),
        "3-D hx": (torch.randn(2, 4), torch.randn(1, 2, 3)),
        "batch mismatch": (torch.randn(2, 4), torch.randn(3, 3)),
        "unbatched with 2-D hx": (torch.randn(4), torch.randn(1, 3)),
        "wrong dtype": (torch.randn(2, 4, dtype=torch.float64), None),
        "integer input": (torch.ones(2, 4, dtype=torch.long), None),
    }


@pytest.mark.parametrize("case", list(bad_inputs()))
def test_bad_input_raises_nn_rnncells_exception_type(case):
    x, hx = bad_inputs()[case]
    with pytest.raises(Exception) as theirs:
        torch.nn.RNNCell(4, 3)(x, hx)
    with pytest.raises(theirs.type):
        rnn_ext.RNNCell(4, 3)(x, hx)


def test_unknown_nonlinearity_raises_in_forward_as_nn_rnncell():
    ours, theirs = rnn_ext.RNNCell(4, 3, nonlinearity="gelu"), torch.nn.RNNCell(4, 3, nonlinearity="gelu")
    for cell in (ours, theirs):
        with pytest.raises(RuntimeError, match="Unknown nonlinearity: gelu"):
            cell(torch.randn(2, 4))


class LoggingTensor(torch.Tensor):
    """A tensor subclass with a __torch_function__ override: the quick entry must step aside."""

    seen = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_subclasses_and_modes_take_the_op_overload():
    torch.manual_seed(10)
    cell = rnn_ext.RNNCell(4, 6, dtype=torch.float64)
    x, h = randn(2, 4), randn(2, 6)
    expected = cell(x, h)
    weights = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    torch.testing.assert_close(ops._C.rnn_cell(x, h, *weights, False), expected)  # plain tensors: the quick entry
    assert ops._C.rnn_cell(x.as_subclass(LoggingTensor), h, *weights, False) is NotImplemented
    LoggingTensor.seen.clear()
    out = cell(x.as_subclass(LoggingTensor), h)
    assert any("rnn_cell" in str(f) for f in LoggingTensor.seen)
    torch.testing.assert_close(out.as_subclass(torch.Tensor), expected)

    class Mode(torch.overrides.TorchFunctionMode):
        calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls.append(func)
            return func(*args, **(kwargs or {}))

    with Mode():
        torch.testing.assert_close(cell(x, h), expected)
    assert any("rnn_cell" in str(f) for f in Mode.calls)


def test_parametrized_and_functional_call_weights_are_used():
    torch.manual_seed(11)
    cell = rnn_ext.RNNCell(4, 6, dtype=torch.float64)
    x, h = randn(2, 4), randn(2, 6)
    doubled = {name: 2 * p.detach() for name, p in cell.named_parameters()}
    expected = reference_cell(x, h, *doubled.values())
    torch.testing.assert_close(torch.func.functional_call(cell, doubled, (x, h)), expected)

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        torch.nn.utils.parametrize.register_parametrization(cell, name, Double())
    torch.testing.assert_close(cell(x, h), expected)


def test_functional_rnn_cell_with_layer_weights():
    torch.manual_seed(12)
    layer = rnn_ext.RNN(4, 6, dtype=torch.float64)
    xs = randn(5, 1, 4)
    output, h_n = layer(xs)
    h = None
    weights = (layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0)
    for t in range(5):
        h = rnn_ext.rnn_cell(xs[t, 0], h, *weights)  # unbatched steps
        torch.testing.assert_close(h, output[t, 0])
    with pytest.raises(ValueError, match="Unknown nonlinearity"):
        rnn_ext.rnn_cell(xs[0], None, *weights, nonlinearity="gelu")


def test_large_weight_gradients_across_steps_and_calls():
    # Weight-gradient buffers of 2^15 elements and more are reused once nothing holds them
    # (csrc/cpu/cell_cpu.cpp): a BPTT loop's per-step gradients, and results the caller keeps.
    torch.manual_seed(13)
    ours, theirs = make_cells(192, 192)
    xs, h0 = randn(4, 1, 192, requires_grad=True), randn(1, 192, requires_grad=True)
    grads = randn(4, 1, 192)
    results = []
    for cell in (ours, theirs):
        h, outputs = h0, []
        for t in range(4):
            h = cell(xs[t], h)
            outputs.append(h)
        loss = (torch.stack(outputs) * grads).sum()
        results.append(torch.autograd.grad(loss, [xs, h0, *cell.parameters()]))
    torch.testing.assert_close(results[0], results[1])

    x, h, w_ih, w_hh = randn(1, 192), randn(1, 192), ours.weight_ih.detach(), ours.weight_hh.detach()
    output = ops.rnn_cell(x, h, w_ih, w_hh, None, None, False)
    kept = [ops.rnn_cell_backward(g, x, h, [w_ih, w_hh], False, output, [False, False, True])[2]
            for g in (randn(1, 192), randn(1, 192))]
    assert kept[0][0].data_ptr() != kept[1][0].data_ptr()
    expected = ops.rnn_cell_backward(randn(1, 192) * 0, x, h, [w_ih, w_hh], False, output, [False, False, True])[2]
    assert all(float(g.abs().max()) == 0 for g in expected)
    assert all(float(w.abs().max()) > 0 for grads in kept for w in grads)  # not overwritten by the later calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 8, 16])
def test_threaded_steps_and_reused_buffers_in_a_bptt_loop(batch, dtype):
    # I = H = 256: both products and both gradient pairs run on two threads (2^17 multiply-adds
    # and more), and the weight gradients come from the reused buffers, step after step.
    torch.manual_seed(14)
    ours, theirs = make_cells(256, 256, dtype=torch.float32)
    ours.to(dtype), theirs.to(dtype)
    xs = torch.randn(3, batch, 256, dtype=dtype, requires_grad=True)
    h0 = torch.randn(batch, 256, dtype=dtype)
    grads = torch.randn(3, batch, 256, dtype=dtype)
    results = []
    for cell in (ours, theirs):
        h, outputs = h0, []
        for t in range(3):
            h = cell(xs[t], h)
            outputs.append(h)
        outputs = torch.stack(outputs)
        results.append([outputs, *torch.autograd.grad((outputs * grads).sum(), [xs, *cell.parameters()])])
    tolerance = dict(rtol=1e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.5)
    torch.testing.assert_close(results[0], results[1], **tolerance)


def test_relu_gradient_passes_through_nan_as_nn_rnncell():
    for batch in (1, 12):  # both CPU paths
        ours, theirs = make_cells(3, 4, nonlinearity="relu")
        x = torch.full((batch, 3), float("nan"), dtype=torch.float64, requires_grad=True)
        assert_cell_parity_nan = [torch.autograd.grad(cell(x).sum(), x)[0] for cell in (ours, theirs)]
        torch.testing.assert_close(*assert_cell_parity_nan, equal_nan=True)


def test_fake_kernel_checks_as_the_op():
    x, h, w_ih, w_hh = randn(2, 3), randn(2, 5), randn(5, 3), randn(5, 5)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (x, h, w_ih, w_hh)]
        assert ops.rnn_cell(*fake, None, None, False).shape == (2, 5)
        for args in ((fake[0], fake[1], fake[2], fake[2], None, None, False),       # w_hh not [H, H]
                     (fake[0], fake[1], fake[2], fake[3], fake[0], None, False),    # one bias
                     (fake[1], fake[1], fake[2], fake[3], None, None, False)):      # input_size
            with pytest.raises(RuntimeError):
                ops.rnn_cell(*args)
