"""bfloat16 and float16 on the CPU (and bfloat16 under autocast): rnn_ext's error against a float64
run of the same rounded weights and inputs is at most twice nn.RNN's error in the same dtype, for
the output, h_n and every gradient.

With AVX512_BF16 (cpu_isa() == "avx512_bf16") bfloat16 runs its own kernels: bf16 products summed
in float, each step's state rounded to bfloat16. Elsewhere, and for float16, the float32 kernels
run and the results are rounded once. test_cpu_isa.py runs these checks on every instruction set.
"""
import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnn_ext
from reference import as_float64, make_pair

LOW_PRECISION = [torch.bfloat16, torch.float16]

# (batch, seq_len, input, hidden, layers, bidirectional, nonlinearity): tile edges (8 rows, 32
# columns, odd depths), two layers, both directions, a hidden size past one 32-column panel.
CONFIGS = [
    (16, 30, 48, 64, 1, False, "tanh"),
    (7, 25, 33, 70, 2, True, "relu"),
    (5, 9, 3, 5, 1, False, "tanh"),
    (33, 12, 97, 130, 1, False, "relu"),
    (9, 20, 16, 40, 2, True, "tanh"),
    (2, 10, 1, 100, 1, False, "tanh"),  # 2-row tiles of 4 panels, a ragged one; a depth of 1
    # Over 1024 rows: the weight gradients' products (depth: every row) add up chunks of 1024 rows;
    # 1147 rows are odd, so the last chunk ends on a single row.
    (41, 30, 20, 40, 1, True, "tanh"),
    (37, 31, 24, 36, 1, False, "relu"),
]


def relative_error(value, exact):
    """||value - exact|| / ||exact|| (Frobenius), in float64."""
    return ((value.double() - exact).norm() / exact.norm().clamp_min(1e-300)).item()


def assert_at_most_twice_nn_rnns_error(ours, theirs, exact, names):
    for name, o, t, e in zip(names, ours, theirs, exact):
        error_ours, error_theirs = relative_error(o, e), relative_error(t, e)
        assert error_ours <= 2 * error_theirs, (
            f"{name}: rnn_ext's relative error against float64 {error_ours:.3g}, nn.RNN's {error_theirs:.3g}")


def results(module, run, x, hx, grad_output, grad_h_n):
    """[output, h_n, grad of x, hx and every parameter] of run() (which returns output, h_n)."""
    output, h_n = run()
    wrt = [x, hx, *module.parameters()]
    grads = torch.autograd.grad((output * grad_output).sum() + (h_n * grad_h_n).sum(), wrt)
    return [output, h_n, *grads]


def names_of(module):
    return ["output", "h_n", "grad input", "grad hx", *(f"grad {n}" for n, _ in module.named_parameters())]


def compare_with_nn_rnn(dtype, config, run, bias=True, batch_first=False, seed=0):
    """run(module, x, hx) -> (output, h_n) for rnn_ext, nn.RNN in dtype, and nn.RNN in float64."""
    batch, seq_len, input_size, hidden, layers, bidirectional, nonlinearity = config
    torch.manual_seed(seed)
    ours, theirs = make_pair(input_size, hidden, dtype=dtype, num_layers=layers, bidirectional=bidirectional,
                             nonlinearity=nonlinearity, bias=bias, batch_first=batch_first)
    exact_model = copy.deepcopy(theirs).double()
    directions = 2 if bidirectional else 1
    sizes = (batch, seq_len) if batch_first else (seq_len, batch)
    x = torch.randn(*sizes, input_size).to(dtype).requires_grad_()
    hx = torch.randn(layers * directions, batch, hidden).to(dtype).requires_grad_()
    grad_output = torch.randn(*sizes, directions * hidden).to(dtype)
    grad_h_n = torch.randn(layers * directions, batch, hidden).to(dtype)
    x64, hx64 = as_float64(x), as_float64(hx)
    mine = results(ours, lambda: run(ours, x, hx), x, hx, grad_output, grad_h_n)
    ref = results(theirs, lambda: run(theirs, x, hx), x, hx, grad_output, grad_h_n)
    exact = results(exact_model, lambda: run(exact_model, x64, hx64), x64, hx64, grad_output.double(),
                    grad_h_n.double())
    for value, dtype_expected in zip(mine, [dtype] * len(mine)):
        assert value.dtype == dtype_expected
    assert_at_most_twice_nn_rnns_error(mine, ref, exact, names_of(ours))


def dense(module, x, hx):
    return module(x, hx)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("config", CONFIGS)
def test_dense_error_at_most_twice_nn_rnns(dtype, config):
    compare_with_nn_rnn(dtype, config, dense)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_without_bias_and_batch_first(dtype):
    compare_with_nn_rnn(dtype, (6, 15, 20, 36, 2, True, "tanh"), dense, bias=False, batch_first=True)


LENGTHS = [11, 3, 11, 7, 1, 9, 5, 11, 2]
# 1440 rows in all: the weight gradients' products (whose depth is every row) in two chunks.
LONG_LENGTHS = [60 - 7 * b % 50 for b in range(40)]


def packed_run(lengths):
    def run(module, x, hx):
        """The padded x packed with lengths; output is the packed data padded back."""
        packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
        output, h_n = module(packed, hx)
        return pad_packed_sequence(output, total_length=x.shape[0])[0], h_n

    return run


def lengths_run(lengths):
    def run(module, x, hx):
        if isinstance(module, rnn_ext.RNN):
            return module(x, hx, lengths=torch.tensor(lengths))
        return packed_run(lengths)(module, x, hx)  # nn.RNN's way to the same result

    return run


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("config", [(9, 11, 17, 33, 2, True, "relu"), (9, 11, 40, 64, 1, False, "tanh"),
                                    (40, 60, 24, 36, 1, True, "tanh")])
@pytest.mark.parametrize("run", [packed_run, lengths_run], ids=["packed", "lengths"])
def test_variable_length_error_at_most_twice_nn_rnns(dtype, config, run):
    compare_with_nn_rnn(dtype, config, run(LENGTHS if config[0] == len(LENGTHS) else LONG_LENGTHS))


def autocast_run(dtype):
    def run(module, x, hx):
        if x.dtype == torch.float64:  # the exact reference
            return module(x, hx)
        with torch.autocast("cpu", dtype=dtype):
            return module(x, hx)

    return run


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_autocast_error_at_most_twice_nn_rnns(dtype):
    """float32 modules under autocast: the float64 reference takes the weights rounded to dtype."""
    torch.manual_seed(3)
    batch, seq_len, input_size, hidden = 12, 20, 24, 48
    ours, theirs = make_pair(input_size, hidden, dtype=torch.float32, num_layers=2, bidirectional=True)
    exact_model = copy.deepcopy(theirs).to(dtype).double()
    x = torch.randn(seq_len, batch, input_size).to(dtype).float().requires_grad_()
    hx = torch.randn(4, batch, hidden).to(dtype).float().requires_grad_()
    grad_output, grad_h_n = torch.randn(seq_len, batch, 2 * hidden).to(dtype), torch.randn(4, batch, hidden).to(dtype)
    run = autocast_run(dtype)
    mine = results(ours, lambda: run(ours, x, hx), x, hx, grad_output, grad_h_n)
    ref = results(theirs, lambda: run(theirs, x, hx), x, hx, grad_output, grad_h_n)
    x64, hx64 = as_float64(x), as_float64(hx)
    exact = results(exact_model, lambda: exact_model(x64, hx64), x64, hx64, grad_output.double(), grad_h_n.double())
    assert mine[0].dtype == ref[0].dtype == dtype
    assert all(g.dtype == torch.float32 for g in mine[2:])
    assert_at_most_twice_nn_rnns_error(mine, ref, exact, names_of(ours))


def test_autocast_runs_the_bfloat16_kernels():
    """Under autocast the op gets the bfloat16 casts of the float32 tensors: the same computation,
    bit for bit, as the bfloat16 module (the avx512_bf16 kernels where the CPU has them)."""
    torch.manual_seed(4)
    model = rnn_ext.RNN(40, 70, num_layers=2, bidirectional=True)
    low = copy.deepcopy(model).bfloat16()
    x = torch.randn(30, 9, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, h_n = model(x)
    expected_output, expected_h_n = low(x.bfloat16())
    assert torch.equal(output, expected_output)
    assert torch.equal(h_n, expected_h_n)


def bfloat16_path():
    """Which computation bfloat16 takes here: "native" (rounded per step) or "float32" (the float32
    kernels' result rounded once), told apart by their results on one batch."""
    torch.manual_seed(5)
    model = rnn_ext.RNN(40, 70, dtype=torch.bfloat16)
    x = torch.randn(30, 9, 40, dtype=torch.bfloat16)
    with torch.no_grad():
        output = model(x)[0]
        via_float32 = copy.deepcopy(model).float()(x.float())[0].bfloat16()
    return "float32" if torch.equal(output, via_float32) else "native"


def test_bfloat16_is_native_exactly_with_avx512_bf16():
    assert bfloat16_path() == ("native" if rnn_ext.cpu_isa() == "avx512_bf16" else "float32")


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_zero_length_rows_keep_hx(dtype):
    model = rnn_ext.RNN(5, 6, dtype=dtype)
    x = torch.randn(4, 3, 5, dtype=dtype)
    hx = torch.randn(1, 3, 6, dtype=dtype)
    output, h_n = model(x, hx, lengths=torch.tensor([4, 0, 2]))
    assert torch.equal(h_n[:, 1], hx[:, 1])
    assert torch.equal(output[:, 1], torch.zeros_like(output[:, 1]))


def test_bfloat16_tanh_rounds_like_tanh():
    """The activation alone (zero weights, the pre-activation in the bias): bfloat16's tanh is
    tanh rounded to bfloat16, NaN and infinities included, tiny values kept."""
    z = torch.cat([torch.linspace(-12, 12, 2001), torch.tensor([float("nan"), float("inf"), -float("inf"), 3e-4,
                                                                -1e-6, 1e-30, 0.0])])
    ours = rnn_ext.RNN(1, z.numel(), dtype=torch.bfloat16)
    with torch.no_grad():
        for weight in ours.parameters():
            weight.zero_()
        ours.bias_ih_l0.copy_(z)
        output, _ = ours(torch.zeros(1, 3, 1, dtype=torch.bfloat16))
    expected = torch.tanh(z.to(torch.bfloat16).double()).to(torch.bfloat16).expand(3, -1)
    torch.testing.assert_close(output[0], expected, rtol=0, atol=0, equal_nan=True)
