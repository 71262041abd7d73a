"""Bad input: the same exception type as nn.RNN, a message naming the argument, never a crash."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import rnn_ext
from reference import make_pair, randn


def raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return e
    return None


def assert_raises_like_nn_rnn(call, device, *, match):
    """call(module, tensor) must raise for rnn_ext.RNN the exception type nn.RNN raises, with a clear
    message; tensor(*shape, dtype=torch.float32) makes the call's arguments on device."""
    ours, theirs = make_pair(3, 4, dtype=torch.float32, device=device, num_layers=2)

    def tensor(*shape, dtype=torch.float32):
        return randn(*shape, dtype=dtype, device=device)

    theirs_error = raised(lambda: call(theirs, tensor))
    assert theirs_error is not None, "nn.RNN accepts this input; the test case is wrong"
    with pytest.raises(type(theirs_error), match=match):
        call(ours, tensor)


CASES = {
    "4-D input": (lambda m, t: m(t(2, 3, 4, 3)), "Expected input to be 2D or 3D, got 4D"),
    "1-D input": (lambda m, t: m(t(3)), "Expected input to be 2D or 3D, got 1D"),
    "input size": (lambda m, t: m(t(5, 2, 7)), "input.size\\(-1\\) must be equal to input_size. Expected 3, got 7"),
    "hx batch": (lambda m, t: m(t(5, 2, 3), t(2, 3, 4)), "Expected hidden size \\(2, 2, 4\\), got \\[2, 3, 4\\]"),
    "hx layers": (lambda m, t: m(t(5, 2, 3), t(1, 2, 4)), "Expected hidden size"),
    "hx ndim batched": (lambda m, t: m(t(5, 2, 3), t(2, 4)), "hx should also be 3-D"),
    "hx ndim unbatched": (lambda m, t: m(t(5, 3), t(2, 1, 4)), "hx should also be 2-D"),
    "input dtype": (lambda m, t: m(t(5, 2, 3, dtype=torch.float64)), "input dtype \\(torch.float64\\) does not match weight dtype"),
    "integer input": (lambda m, t: m(t(5, 2, 3).long()), "does not match weight dtype"),
    "hx dtype": (lambda m, t: m(t(5, 2, 3), t(2, 2, 4, dtype=torch.float64)), "hx must have the input's dtype"),
    "sequence length 0": (lambda m, t: m(t(0, 2, 3)), "sequence length to be larger than 0"),
    "unbatched length 0": (lambda m, t: m(t(0, 3)), "sequence length to be larger than 0"),
}


@pytest.mark.parametrize("case", CASES)
def test_module_input_errors_match_nn_rnn(case, device):
    call, match = CASES[case]
    assert_raises_like_nn_rnn(call, device, match=match)


CONSTRUCTOR_CASES = {
    "nonlinearity": (dict(nonlinearity="gelu"), "Unknown nonlinearity 'gelu'"),
    "dropout > 1": (dict(dropout=1.5), "dropout should be a number in range \\[0, 1\\]"),
    "dropout < 0": (dict(dropout=-0.1), "dropout should be a number in range \\[0, 1\\]"),
    "dropout bool": (dict(dropout=True), "dropout should be a number"),
    "hidden_size 0": (dict(hidden_size=0), "hidden_size must be greater than zero"),
    "hidden_size < 0": (dict(hidden_size=-3), "hidden_size must be greater than zero"),
    "hidden_size float": (dict(hidden_size=4.0), "hidden_size should be of type int"),
    "input_size 0": (dict(input_size=0), "input_size must be greater than zero"),
    "num_layers 0": (dict(num_layers=0), "num_layers must be greater than zero"),
    "bias not bool": (dict(bias=1), "bias should be of type bool"),
    "batch_first not bool": (dict(batch_first="yes"), "batch_first should be of type bool"),
    "proj_size": (dict(proj_size=2), "proj_size argument is only supported for LSTM, not RNN or GRU"),
    "proj_size negative": (dict(proj_size=-1), "proj_size argument is only supported for LSTM"),
}


def test_proj_size_zero_is_accepted_and_positional_as_in_nn_rnn():
    """nn.RNN's positional order puts proj_size after bidirectional (nn.RNN refuses it as a
    keyword even when 0; rnn_ext accepts 0, for code that builds LSTMs and RNNs alike)."""
    assert rnn_ext.RNN(3, 4, proj_size=0).proj_size == 0
    args = (3, 4, 1, "tanh", True, False, 0.0, False, 0, None, torch.float64)
    ours, theirs = rnn_ext.RNN(*args), nn.RNN(*args)
    assert ours.weight_hh_l0.dtype == theirs.weight_hh_l0.dtype == torch.float64


@pytest.mark.parametrize("case", CONSTRUCTOR_CASES)
def test_constructor_errors_match_nn_rnn(case):
    overrides, match = CONSTRUCTOR_CASES[case]
    kwargs = dict(input_size=3, hidden_size=4) | overrides
    theirs_error = raised(lambda: nn.RNN(**kwargs))
    assert theirs_error is not None
    with pytest.raises(type(theirs_error), match=match):
        rnn_ext.RNN(**kwargs)


def packed_with(batch_sizes, device, rows=None):
    """A PackedSequence of input size 3 on device with these batch_sizes (on the CPU) and rows."""
    batch_sizes = torch.tensor(batch_sizes, dtype=torch.int64)
    rows = int(batch_sizes.sum()) if rows is None else rows
    return PackedSequence(randn(rows, 3, dtype=torch.float32, device=device), batch_sizes)


@pytest.mark.parametrize(
    "batch_sizes,rows,match",
    [
        ([2, 3, 1], None, "batch_sizes must be non-increasing"),
        ([3, 0, 0], None, "batch_sizes\\[1\\] must be positive, got 0"),
        ([3, 2, 1], 5, "sum\\(batch_sizes\\) must equal the number of input rows \\(5\\), got 6"),
        ([3, -1], 2, "batch_sizes\\[1\\] must be positive, got -1"),
    ],
)
def test_malformed_batch_sizes_raise(batch_sizes, rows, match, device):
    model = rnn_ext.RNN(3, 4, bidirectional=True, device=device)
    with pytest.raises(RuntimeError, match=match):
        model(packed_with(batch_sizes, device, rows))


def test_batch_sizes_must_be_int64_cpu(device):
    model = rnn_ext.RNN(3, 4, device=device)
    packed = PackedSequence(randn(3, 3, dtype=torch.float32, device=device), torch.tensor([2, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="batch_sizes must be a 1-D int64 CPU tensor"):
        model(packed)


def test_functional_weight_errors(device):
    def tensor(*shape):
        return randn(*shape, dtype=torch.float32, device=device)

    x = tensor(5, 2, 3)
    hx = torch.zeros(1, 2, 4, device=device)
    good = [tensor(4, 3), tensor(4, 4), tensor(4), tensor(4)]
    with pytest.raises(RuntimeError, match="w_ih must have shape \\[4, 3\\], got \\[4, 5\\]"):
        rnn_ext.rnn(x, hx, [tensor(4, 5), *good[1:]])
    with pytest.raises(RuntimeError, match="b_hh must have shape \\[4\\], got \\[5\\]"):
        rnn_ext.rnn(x, hx, [*good[:3], tensor(5)])
    with pytest.raises(RuntimeError, match="each weight must have the input's dtype Float, got Double"):
        rnn_ext.rnn(x, hx, [good[0].double(), *good[1:]])
    with pytest.raises(ValueError, match="expected 4 weight tensors"):
        rnn_ext.rnn(x, hx, good[:3])
    with pytest.raises(ValueError, match="Unknown nonlinearity"):
        rnn_ext.rnn(x, hx, good, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="dropout should be a number in range"):
        rnn_ext.rnn(x, hx, good, dropout=2.0)


def test_fake_kernel_rejects_mixed_devices():
    x = torch.randn(6, 3)
    hx = torch.zeros(1, 2, 4, device="meta")
    weights = [torch.randn(4, 3), torch.randn(4, 4)]
    with pytest.raises(RuntimeError):
        rnn_ext.ops.run_layer(x, hx, weights, None, False)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_nan_and_inf_propagate_like_nn_rnn(value, act, device):
    """Against nn.RNN's own ops (cuDNN off on CUDA): their relu passes NaN on as torch.relu does,
    which cuDNN's fused relu is not documented to do."""
    torch.manual_seed(0)
    ours, theirs = make_pair(3, 4, dtype=torch.float32, device=device, num_layers=2, nonlinearity=act,
                             bidirectional=True)
    x = torch.randn(6, 3, 3)
    x[2, 1, 0] = value
    x = x.to(device)
    out, h_n = ours(x)
    with torch.backends.cudnn.flags(enabled=False):
        ref_out, ref_h_n = theirs(x)
    torch.testing.assert_close(out, ref_out, equal_nan=True)
    torch.testing.assert_close(h_n, ref_h_n, equal_nan=True)
