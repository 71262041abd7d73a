"""rnn_ext.RNN against torch.nn.RNN (same weights) and against the plain reference loop."""
import itertools
import pickle

import pytest
import torch
from torch import nn

import rnn_ext
from reference import make_pair, outputs_and_grads, randn, reference_rnn

GRID = list(
    itertools.product(
        [1, 2, 3],  # num_layers
        [False, True],  # bidirectional
        ["tanh", "relu"],
        [True, False],  # bias
        [False, True],  # batch_first
        [True, False],  # hx given
        [torch.float32, torch.float64],
    )
)


def grid_id(params):
    layers, bidir, act, bias, batch_first, with_hx, dtype = params
    return f"layers{layers}-{'bi' if bidir else 'uni'}-{act}-{'bias' if bias else 'nobias'}-" \
        f"{'bf' if batch_first else 'tf'}-{'hx' if with_hx else 'nohx'}-{str(dtype)[6:]}"


def assert_all_close(ours, theirs):
    for a, b in zip(ours, theirs, strict=True):
        if isinstance(a, (tuple, list)):
            assert_all_close(a, b)
        else:
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("params", GRID, ids=[grid_id(p) for p in GRID])
def test_parity_with_nn_rnn(params, device):
    layers, bidir, act, bias, batch_first, with_hx, dtype = params
    torch.manual_seed(0)
    seq_len, batch, input_size, hidden = 5, 3, 4, 6
    ours, theirs = make_pair(
        input_size, hidden, dtype=dtype, device=device, num_layers=layers, nonlinearity=act, bias=bias,
        batch_first=batch_first, bidirectional=bidir,
    )
    directions = 2 if bidir else 1
    shape = (batch, seq_len, input_size) if batch_first else (seq_len, batch, input_size)
    x = randn(*shape, dtype=dtype, device=device, requires_grad=True)
    state_shape = (layers * directions, batch, hidden)
    hx = randn(*state_shape, dtype=dtype, device=device, requires_grad=True) if with_hx else None
    out_shape = shape[:2] + (directions * hidden,)
    grad_output = randn(*out_shape, dtype=dtype, device=device)
    grad_h_n = randn(*state_shape, dtype=dtype, device=device)

    ours_result = outputs_and_grads(ours, x, hx, grad_output, grad_h_n)
    theirs_result = outputs_and_grads(theirs, x, hx, grad_output, grad_h_n)
    assert ours_result[0].shape == out_shape
    assert_all_close(ours_result, theirs_result)


@pytest.mark.parametrize("bidir", [False, True])
@pytest.mark.parametrize("act", ["tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference_loop(bidir, act, bias, device):
    torch.manual_seed(1)
    layers, seq_len, batch, input_size, hidden = 2, 6, 3, 5, 4
    model = rnn_ext.RNN(input_size, hidden, layers, act, bias, bidirectional=bidir, dtype=torch.float64).to(device)
    directions = 2 if bidir else 1
    x = randn(seq_len, batch, input_size, device=device, requires_grad=True)
    hx = randn(layers * directions, batch, hidden, device=device, requires_grad=True)
    weights = list(model.parameters())
    out, h_n = model(x, hx)
    ref_out, ref_h_n = reference_rnn(x, hx, weights, num_layers=layers, nonlinearity=act, bias=bias, bidirectional=bidir)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(h_n, ref_h_n)
    g, gh = randn(*out.shape, device=device), randn(*h_n.shape, device=device)
    ours = torch.autograd.grad((out * g).sum() + (h_n * gh).sum(), [x, hx, *weights])
    ref = torch.autograd.grad((ref_out * g).sum() + (ref_h_n * gh).sum(), [x, hx, *weights])
    assert_all_close(ours, ref)


@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_gradcheck_through_module(act, device):
    torch.manual_seed(2)
    model = rnn_ext.RNN(3, 4, num_layers=2, nonlinearity=act, bidirectional=True, dtype=torch.float64).to(device)
    x = randn(4, 2, 3, device=device, requires_grad=True)
    hx = randn(4, 2, 4, device=device, requires_grad=True)
    params = list(model.parameters())

    def run(x, hx, *weights):
        out, h_n = rnn_ext.rnn(x, hx, weights, num_layers=2, nonlinearity=act, bidirectional=True)
        return out, h_n

    assert torch.autograd.gradcheck(run, (x, hx, *params))


# -- the nn.RNN contract: constructor, attributes, parameters, state_dict -------------------------


def test_constructor_and_attributes_match():
    args = (3, 5, 2, "relu", False, True, 0.25, True)
    ours = rnn_ext.RNN(*args)
    theirs = nn.RNN(*args)
    for name in ("mode", "nonlinearity", "input_size", "hidden_size", "num_layers", "bias", "batch_first",
                 "dropout", "bidirectional", "proj_size"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]
    assert ours._flat_weights_names == theirs._flat_weights_names
    assert [[p.shape for p in ws] for ws in ours.all_weights] == [[p.shape for p in ws] for ws in theirs.all_weights]
    assert repr(ours).replace("RNN", "X") == repr(theirs).replace("RNN", "X")
    ours.flatten_parameters()


def test_keyword_construction_device_dtype(device):
    model = rnn_ext.RNN(input_size=2, hidden_size=3, batch_first=True, device=device, dtype=torch.float64)
    assert all(p.dtype == torch.float64 and p.device.type == device for p in model.parameters())
    assert model.extra_repr() == "2, 3, batch_first=True"
    out, h_n = model(randn(4, 5, 2, device=device))
    assert out.device.type == h_n.device.type == device


def test_init_is_uniform_in_bound(device):
    torch.manual_seed(0)
    hidden = 16
    model = rnn_ext.RNN(8, hidden, num_layers=2, device=device)
    bound = 1 / hidden**0.5
    for p in model.parameters():
        assert p.abs().max() <= bound
        assert p.abs().max() > 0.8 * bound  # spread over the range, not a constant


def test_state_dict_round_trip_both_ways(device):
    torch.manual_seed(0)
    theirs = nn.RNN(3, 4, num_layers=2, bidirectional=True).to(device)
    ours = rnn_ext.RNN(3, 4, num_layers=2, bidirectional=True).to(device)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = randn(5, 2, 3, dtype=torch.float32, device=device)
    torch.testing.assert_close(ours(x), theirs(x))
    back = nn.RNN(3, 4, num_layers=2, bidirectional=True).to(device)
    back.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(back(x), theirs(x))


@pytest.mark.parametrize("kind", ["RNN", "RNNCell"])
def test_whole_model_loads_with_weights_only_once_allow_listed(kind, device, tmp_path):
    """torch.load(path, weights_only=True) of a whole saved model, as the README shows: the
    allow-list that names torch.nn.RNN names rnn_ext.RNN and rnn_ext.RNNCell too."""
    torch.manual_seed(0)
    if kind == "RNN":
        model = rnn_ext.RNN(3, 4, num_layers=2, bidirectional=True, batch_first=True).to(device).double()
        x = randn(2, 5, 3, device=device)
    else:
        model = rnn_ext.RNNCell(3, 4, nonlinearity="relu").to(device).double()
        x = randn(2, 3, device=device)
    expected = model(x)
    torch.save(model, tmp_path / "model.pt")

    with torch.serialization.safe_globals([nn.RNN, nn.RNNCell]), pytest.raises(
        pickle.UnpicklingError, match=f"rnn_ext.module.{kind}"
    ):
        torch.load(tmp_path / "model.pt", weights_only=True)
    with torch.serialization.safe_globals([nn.RNN, nn.RNNCell, rnn_ext.RNN, rnn_ext.RNNCell]):
        loaded = torch.load(tmp_path / "model.pt", weights_only=True)
    assert type(loaded) is type(model)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)


def test_module_moves_and_converts(device):
    model = rnn_ext.RNN(3, 4).to(device).double()
    x = randn(2, 1, 3, device=device)
    out, _ = model(x)
    assert out.dtype == torch.float64 and out.device.type == device


# -- input forms -------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_hx", [False, True])
def test_unbatched_input(batch_first, with_hx, device):
    torch.manual_seed(3)
    ours, theirs = make_pair(3, 4, device=device, num_layers=2, bidirectional=True, batch_first=batch_first)
    x = randn(5, 3, device=device)
    hx = randn(4, 4, device=device) if with_hx else None
    args = (x, hx) if with_hx else (x,)
    out, h_n = ours(*args)
    ref_out, ref_h_n = theirs(*args)
    assert out.shape == ref_out.shape == (5, 8)
    assert h_n.shape == ref_h_n.shape == (4, 4)
    torch.testing.assert_close((out, h_n), (ref_out, ref_h_n))


def test_non_contiguous_input_and_hx(device):
    torch.manual_seed(4)
    ours, theirs = make_pair(3, 4, device=device, num_layers=2, bidirectional=True, batch_first=True)
    x = randn(3, 6, 5, device=device)[:, ::2, 1:4].requires_grad_()  # [3, 3, 3] strided
    hx = randn(3, 4, 4, device=device).transpose(0, 1).requires_grad_()  # [4, 3, 4]
    assert not x.is_contiguous() and not hx.is_contiguous()
    g, gh = randn(3, 3, 8, device=device), randn(4, 3, 4, device=device)
    # nn.RNN gets hx made contiguous (the same values, and the same gradient): cuDNN refuses a
    # non-contiguous hx.
    assert_all_close(outputs_and_grads(ours, x, hx, g, gh), outputs_and_grads(theirs, x, hx.contiguous(), g, gh))


def test_empty_batch(device):
    ours, theirs = make_pair(3, 4, device=device, num_layers=2, bidirectional=True)
    x = randn(5, 0, 3, device=device, requires_grad=True)
    out, h_n = ours(x)
    ref_out, ref_h_n = theirs(x)
    assert out.shape == ref_out.shape and h_n.shape == ref_h_n.shape
    (out.sum() + h_n.sum()).backward()
    assert x.grad.shape == x.shape


def test_sequence_length_one(device):
    torch.manual_seed(5)
    ours, theirs = make_pair(3, 4, device=device, num_layers=3, bidirectional=True)
    x = randn(1, 2, 3, device=device, requires_grad=True)
    g, gh = randn(1, 2, 8, device=device), randn(6, 2, 4, device=device)
    assert_all_close(outputs_and_grads(ours, x, None, g, gh), outputs_and_grads(theirs, x, None, g, gh))


def test_low_precision_cpu_close_to_float32():
    """bfloat16/float16 on the CPU compute in float32 and round the result: compare with a float32
    run of the same (rounded) weights. Tolerance: a few bfloat16 ulps (2^-8 relative) of values ≤ 1."""
    torch.manual_seed(6)
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
        model = rnn_ext.RNN(8, 16, num_layers=2).to(dtype)
        reference = rnn_ext.RNN(8, 16, num_layers=2)
        reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
        x = torch.randn(10, 4, 8).to(dtype)
        out, h_n = model(x)
        ref_out, ref_h_n = reference(x.float())
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref_out, atol=tol, rtol=tol)
        torch.testing.assert_close(h_n.float(), ref_h_n, atol=tol, rtol=tol)
        theirs = nn.RNN(8, 16, num_layers=2).to(dtype)
        theirs.load_state_dict(model.state_dict())
        torch.testing.assert_close(theirs(x)[0].float(), ref_out, atol=4 * tol, rtol=4 * tol)


def test_dropout_only_in_training_and_matches_nn_rnn_mask():
    torch.manual_seed(7)
    ours, theirs = make_pair(3, 4, num_layers=3, dropout=0.5)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))
    ours.train(), theirs.train()
    torch.manual_seed(11)
    out_a, _ = ours(x)
    torch.manual_seed(11)
    out_b, _ = ours(x)
    torch.manual_seed(12)
    out_c, _ = ours(x)
    torch.testing.assert_close(out_a, out_b)
    assert not torch.allclose(out_a, out_c)
    # nn.RNN draws its masks on the same [L*B, D*H] elements in the same order.
    torch.manual_seed(11)
    torch.testing.assert_close(out_a, theirs(x)[0])
