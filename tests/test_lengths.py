"""rnn_ext.RNN(x, hx, lengths=...) on padded batches, against nn.RNN's pack -> RNN -> pad pipeline
and the reference loop."""
import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnn_ext
from rnn_ext import ops
from reference import allow_rnn, assert_as_accurate_as, make_pair, pipeline, randn, reference_rnn, run_and_grads

LENGTHS = {
    "unsorted": [3, 7, 1, 5],
    "sorted": [7, 5, 3, 1],
    "full-rows": [7, 2, 7, 4, 7],  # some rows as long as the batch
    "all-full": [7, 7, 7],
    "ties": [2, 6, 1, 4, 4, 6],
    "shorter-than-input": [4, 2, 3],  # no row reaches the last steps
}
SEQ_LEN = 7


def padded_batch(lengths, input_size, dtype, device, batch_first=False, seq_len=SEQ_LEN, padding=0.0):
    """x [L, B, I] ([B, L, I] batch-first) drawn on the CPU, with `padding` past each row's length."""
    x = torch.randn(seq_len, len(lengths), input_size, dtype=dtype)
    past = torch.arange(seq_len).unsqueeze(1) >= torch.tensor(lengths)
    x = x.masked_fill(past.unsqueeze(2), padding)
    if batch_first:
        x = x.transpose(0, 1).contiguous()
    return x.to(device).requires_grad_()


CASES = [
    dict(lengths=name, layers=layers, bidirectional=bidir, dtype=dtype, nonlinearity=act, bias=bias,
         batch_first=batch_first, with_hx=with_hx)
    for i, (name, layers, bidir, dtype) in enumerate(
        itertools.product(LENGTHS, [1, 2], [False, True], [torch.float64, torch.float32]))
    for act, bias, batch_first, with_hx in [(
        ("tanh", "relu")[i % 2], (True, False)[i // 2 % 2], (False, True)[i // 4 % 2], (True, False)[i // 8 % 2])]
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(
    f"{k}={str(v).removeprefix('torch.')}" for k, v in c.items()))
def test_matches_nn_rnn_pack_pad_pipeline(case, device):
    torch.manual_seed(0)
    lengths, dtype, batch_first = LENGTHS[case["lengths"]], case["dtype"], case["batch_first"]
    directions = 2 if case["bidirectional"] else 1
    ours, theirs = make_pair(3, 4, dtype=dtype, device=device, num_layers=case["layers"],
                             bidirectional=case["bidirectional"], nonlinearity=case["nonlinearity"],
                             bias=case["bias"], batch_first=batch_first)
    x = padded_batch(lengths, 3, dtype, device, batch_first)
    state = (case["layers"] * directions, len(lengths), 4)
    hx = randn(*state, dtype=dtype, device=device, requires_grad=True) if case["with_hx"] else None
    out_shape = (len(lengths), SEQ_LEN, directions * 4) if batch_first else (SEQ_LEN, len(lengths), directions * 4)
    grad_output = randn(*out_shape, dtype=dtype, device=device)
    grad_h_n = randn(*state, dtype=dtype, device=device)

    mine = run_and_grads(lambda: ours(x, hx, lengths=torch.tensor(lengths)), ours, x, hx, grad_output, grad_h_n)
    ref = run_and_grads(lambda: pipeline(theirs, x, hx, lengths, batch_first), theirs, x, hx, grad_output, grad_h_n)
    if dtype == torch.float64:
        torch.testing.assert_close(mine, ref)
    else:
        exact_model = theirs.double()
        x64 = x.detach().double().requires_grad_()
        hx64 = hx.detach().double().requires_grad_() if hx is not None else None
        exact = run_and_grads(lambda: pipeline(exact_model, x64, hx64, lengths, batch_first), exact_model, x64, hx64,
                              grad_output.double(), grad_h_n.double())
        flat = lambda r: (r[0], r[1], r[2])  # noqa: E731
        assert_as_accurate_as(flat(mine), flat(ref), exact)
    output = mine[0] if not batch_first else mine[0].transpose(0, 1)
    past = torch.arange(SEQ_LEN, device=device).unsqueeze(1) >= torch.tensor(lengths, device=device)
    assert torch.all(output[past] == 0)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("layers", [1, 2])
def test_zero_length_rows_keep_hx_and_match_the_reference_loop(layers, bidirectional, device):
    """A row of length 0 (nn.RNN cannot take one): zero output, h_n = hx, its hx gradient is grad_h_n's."""
    torch.manual_seed(1)
    lengths = [3, 0, 5, 0, 1]
    ours, _ = make_pair(3, 4, device=device, num_layers=layers, bidirectional=bidirectional)
    directions = 2 if bidirectional else 1
    x = padded_batch(lengths, 3, torch.float64, device, seq_len=5)
    hx = randn(layers * directions, len(lengths), 4, device=device, requires_grad=True)
    grad_output = randn(5, len(lengths), directions * 4, device=device)
    grad_h_n = randn(layers * directions, len(lengths), 4, device=device)
    weights = list(ours.parameters())

    mine = run_and_grads(lambda: ours(x, hx, lengths=lengths), ours, x, hx, grad_output, grad_h_n)
    ref = run_and_grads(
        lambda: reference_rnn(x, hx, weights, num_layers=layers, bidirectional=bidirectional, lengths=lengths),
        ours, x, hx, grad_output, grad_h_n)
    torch.testing.assert_close(mine, ref)
    output, h_n, grads = mine
    assert torch.all(output[:, [1, 3]] == 0)
    torch.testing.assert_close(h_n[:, [1, 3]], hx[:, [1, 3]])
    torch.testing.assert_close(grads[1][:, [1, 3]], grad_h_n[:, [1, 3]])


def test_all_lengths_zero(device):
    ours, _ = make_pair(3, 4, device=device, num_layers=2)
    x = padded_batch([0, 0], 3, torch.float64, device, seq_len=4)
    hx = randn(2, 2, 4, device=device, requires_grad=True)
    output, h_n = ours(x, hx, lengths=[0, 0])
    assert output.shape == (4, 2, 4) and torch.all(output == 0)
    torch.testing.assert_close(h_n, hx)
    grad_x, grad_hx = torch.autograd.grad(h_n.sum() + output.sum(), (x, hx))
    assert torch.all(grad_x == 0) and torch.all(grad_hx == 1)


@pytest.mark.parametrize("padding", [float("nan"), float("inf"), 1e30])
def test_padding_values_are_never_read(padding, device):
    """Whatever sits past the lengths (pad_sequence's padding_value, garbage) changes nothing."""
    torch.manual_seed(2)
    lengths = [2, 5, 1, 4]
    ours, _ = make_pair(3, 4, device=device, bidirectional=True)
    clean = padded_batch(lengths, 3, torch.float64, device, seq_len=5)
    dirty = clean.detach().clone()
    past = torch.arange(5, device=device).unsqueeze(1) >= torch.tensor(lengths, device=device)
    dirty[past] = padding
    dirty.requires_grad_()
    grad_output = randn(5, 4, 8, device=device)
    results = [run_and_grads(lambda x=x: ours(x, lengths=lengths), ours, x, None, grad_output, torch.zeros(2, 4, 4,
               dtype=torch.float64, device=device)) for x in (clean, dirty)]
    torch.testing.assert_close(results[0], results[1])


def test_lengths_forms(device):
    """A list of ints, an int64 or int32 tensor, on the CPU or on the input's device: one result."""
    torch.manual_seed(3)
    lengths = [3, 1, 4]
    ours, _ = make_pair(2, 3, device=device)
    x = padded_batch(lengths, 2, torch.float64, device, seq_len=4)
    expected = ours(x, lengths=lengths)
    for form in (torch.tensor(lengths), torch.tensor(lengths, dtype=torch.int32), torch.tensor(lengths, device=device),
                 tuple(lengths)):
        torch.testing.assert_close(ours(x, lengths=form), expected)


def test_functional_form_takes_lengths():
    torch.manual_seed(4)
    ours, theirs = make_pair(3, 4, num_layers=2)
    lengths = [2, 4, 3]
    x = padded_batch(lengths, 3, torch.float64, "cpu", seq_len=4)
    expected = pipeline(theirs, x, None, lengths, False)
    got = rnn_ext.rnn(x, None, ours._flat_weights, num_layers=2, lengths=torch.tensor(lengths))
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_with_lengths(dtype, device):
    torch.manual_seed(5)
    lengths = [5, 2, 4]
    ours, _ = make_pair(3, 8, dtype=torch.float64, device=device, bidirectional=True)
    x64 = padded_batch(lengths, 3, torch.float64, device, seq_len=5).detach()
    exact_out, exact_h = ours(x64, lengths=lengths)
    low = ours.to(dtype)
    out, h_n = low(x64.to(dtype), lengths=lengths)
    assert out.dtype == dtype and h_n.dtype == dtype
    tolerance = 0.05 if dtype == torch.bfloat16 else 0.01
    torch.testing.assert_close(out.double(), exact_out, atol=tolerance, rtol=0)
    torch.testing.assert_close(h_n.double(), exact_h, atol=tolerance, rtol=0)
    past = torch.arange(5, device=device).unsqueeze(1) >= torch.tensor(lengths, device=device)
    assert torch.all(out[past] == 0)


def test_autocast_runs_the_op_in_bfloat16_with_lengths():
    torch.manual_seed(6)
    ours, theirs = make_pair(3, 8, dtype=torch.float32)
    lengths = [4, 1, 3]
    x = padded_batch(lengths, 3, torch.float32, "cpu", seq_len=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, h_n = ours(x, lengths=lengths)
        ref_out, ref_h = pipeline(theirs, x, None, lengths, False)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref_out.float(), atol=0.03, rtol=0)
    torch.testing.assert_close(h_n.float(), ref_h.float(), atol=0.03, rtol=0)
    out.float().sum().backward()
    assert x.grad is not None and torch.all(torch.isfinite(x.grad))


def test_dropout_keeps_padding_zero_and_eval_matches_pipeline():
    torch.manual_seed(7)
    ours, theirs = make_pair(3, 4, num_layers=3, dropout=0.5)
    lengths = [5, 2, 4, 1]
    x = padded_batch(lengths, 3, torch.float64, "cpu", seq_len=5)
    out, _ = ours(x, lengths=lengths)
    past = torch.arange(5).unsqueeze(1) >= torch.tensor(lengths)
    assert torch.all(out[past] == 0)
    out.sum().backward()
    assert torch.all(torch.isfinite(x.grad)) and torch.all(x.grad[past] == 0)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x, lengths=lengths), pipeline(theirs, x, None, lengths, False))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradcheck_and_gradgradcheck(bidirectional, device):
    torch.manual_seed(8)
    ours, _ = make_pair(2, 3, device=device, num_layers=2, bidirectional=bidirectional)
    directions = 2 if bidirectional else 1
    lengths = torch.tensor([2, 0, 4, 3])
    x = padded_batch(lengths.tolist(), 2, torch.float64, device, seq_len=4)
    hx = randn(2 * directions, 4, 3, device=device, requires_grad=True)
    params = list(ours.parameters())

    def fn(x, hx, *weights):
        return rnn_ext.rnn(x, hx, weights, num_layers=2, bidirectional=bidirectional, lengths=lengths)

    assert torch.autograd.gradcheck(fn, (x, hx, *params))
    assert torch.autograd.gradgradcheck(fn, (x, hx, *params))


def layer_args_with_lengths(requires_grad, device):
    torch.manual_seed(9)
    B, T, I, H = 4, 3, 2, 3
    x = randn(T * B, I, device=device, requires_grad=requires_grad)
    hx = randn(2, B, H, device=device, requires_grad=requires_grad)
    weights = [randn(*shape, device=device, requires_grad=requires_grad)
               for shape in ((H, I), (H, H), (H,), (H,)) * 2]
    return ops.layer_args(x, hx, weights, None, False, torch.tensor([2, 0, 3, 1]))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_with_lengths(requires_grad, device):
    torch.library.opcheck(torch.ops.rnn_ext.rnn_layer.default, layer_args_with_lengths(requires_grad, device))


@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, False), (False, False, True)])
def test_opcheck_backward_with_lengths(mask, device):
    args = layer_args_with_lengths(False, device)
    output, h_n = ops.rnn_layer(*args)
    input, hx, *slots = args[:10]
    weights = [w for w in slots if w is not None]
    grads = (torch.randn_like(output), torch.randn_like(h_n))
    backward_args = (*grads, input, hx, weights, None, False, output, list(mask), args[-1])
    torch.library.opcheck(torch.ops.rnn_ext.rnn_layer_backward.default, backward_args)


class PaddedModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = rnn_ext.RNN(3, 4, num_layers=2, batch_first=True, dtype=torch.float64)

    def forward(self, x, lengths):
        output, h_n = self.rnn(x, lengths=lengths)
        return output, h_n


@allow_rnn()
def test_compile_fullgraph_does_not_recompile_per_lengths():
    torch.manual_seed(10)
    model = PaddedModel()
    compiles = []

    def counting_backend(graph_module, example_inputs):
        compiles.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(model, backend=counting_backend, fullgraph=True, dynamic=False)
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    for lengths in ([5, 2, 4], [1, 5, 3], [3, 3, 0]):
        lengths = torch.tensor(lengths)
        torch.testing.assert_close(compiled(x, lengths), model(x, lengths))
    assert len(compiles) == 1
    out, _ = torch.compile(model, fullgraph=True)(x, torch.tensor([2, 5, 1]))
    torch.testing.assert_close(out, model(x, torch.tensor([2, 5, 1]))[0])


@allow_rnn()
def test_compiled_bad_lengths_still_raise():
    model = PaddedModel()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    compiled(x, torch.tensor([5, 2, 4]))
    with pytest.raises(RuntimeError, match="lengths must lie in"):
        compiled(x, torch.tensor([5, 2, 6]))


def test_export_with_lengths_runs_other_lengths():
    torch.manual_seed(11)
    model = PaddedModel()
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    exported = torch.export.export(model, (x, torch.tensor([5, 2, 4])))
    for lengths in ([5, 2, 4], [1, 3, 0]):
        lengths = torch.tensor(lengths)
        torch.testing.assert_close(exported.module()(x, lengths), model(x, lengths))


# -- bad input -------------------------------------------------------------------------------------


@pytest.fixture
def module_and_input():
    return rnn_ext.RNN(3, 4, dtype=torch.float64), torch.randn(5, 2, 3, dtype=torch.float64)


@pytest.mark.parametrize(
    "lengths, error, message",
    [
        ([5, 2, 1], ValueError, r"one length per batch row \(2\), got 3"),
        ([5], ValueError, r"one length per batch row \(2\), got 1"),
        ([6, 2], RuntimeError, r"lengths must lie in \[0, 5\] \(the time steps\), got lengths\[0\] = 6"),
        ([3, -1], RuntimeError, r"lengths must lie in \[0, 5\] \(the time steps\), got lengths\[1\] = -1"),
        ([2.0, 3.0], ValueError, "lengths must be a 1-D integer tensor or a list of ints"),
        (torch.tensor([2.0, 3.0]), ValueError, "lengths must hold integers"),
        (torch.tensor([True, False]), ValueError, "lengths must hold integers"),
        (torch.tensor([[2, 3]]), ValueError, "lengths must be 1-D"),
        ("23", ValueError, "lengths must be a 1-D integer tensor or a list of ints"),
    ],
)
def test_bad_lengths_raise(module_and_input, lengths, error, message):
    module, x = module_and_input
    with pytest.raises(error, match=message):
        module(x, lengths=lengths)


def test_lengths_with_packed_input_raise(module_and_input):
    module, x = module_and_input
    packed = pack_padded_sequence(x, torch.tensor([5, 3]))
    with pytest.raises(ValueError, match="PackedSequence already holds its lengths"):
        module(packed, lengths=[5, 3])


def test_lengths_with_unbatched_input_raise(module_and_input):
    module, x = module_and_input
    with pytest.raises(ValueError, match="needs batched 3-D input"):
        module(x[:, 0], lengths=[5])


def test_op_checks_lengths():
    B, T = 2, 3
    x, hx = torch.randn(T * B, 2), torch.zeros(1, B, 3)
    weights = [torch.randn(3, 2), torch.randn(3, 3)]
    for lengths, message in (
        (torch.tensor([1, 2], dtype=torch.int32), "lengths must be a 1-D int64 CPU tensor"),
        (torch.tensor([1, 2, 3]), r"one length per batch row \(2\)"),
        (torch.tensor([4, 1]), r"lengths must lie in \[0, 3\]"),
        (torch.tensor([-1, 1]), r"lengths must lie in \[0, 3\]"),
    ):
        with pytest.raises(RuntimeError, match=message):
            ops.run_layer(x, hx, weights, None, False, lengths)
    with pytest.raises(RuntimeError, match="either packed .* or padded"):
        ops.run_layer(x, hx, weights, torch.tensor([2, 2, 2]), False, torch.tensor([3, 3]))
    with pytest.raises(RuntimeError, match="must be a multiple of the batch size"):
        ops.run_layer(x[:5], hx, weights, None, False, torch.tensor([2, 2]))
