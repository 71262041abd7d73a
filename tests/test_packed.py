"""PackedSequence input, walked natively by the kernels, against nn.RNN and the reference loop."""
import itertools

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import rnn_ext
from reference import assert_parity, make_pair, packed_batch, randn, reference_rnn

# Sequence lengths of a batch; the unsorted ones are only packed with enforce_sorted=False.
LENGTHS = {
    "unsorted": [3, 7, 1, 5],
    "sorted": [7, 5, 3, 1],
    "equal": [4, 4, 4],
    "all-ones": [1, 1, 1],
    "single": [6],
    "unsorted-ties": [2, 6, 1, 4, 4],
    "sorted-ties": [6, 4, 4, 2, 1],
}


def is_sorted(lengths):
    return lengths == sorted(lengths, reverse=True)


@pytest.mark.parametrize(
    "lengths,enforce_sorted,layers,bidir,act,with_hx,dtype",
    [
        (name, enforce, layers, bidir, act, with_hx, dtype)
        for name, enforce, layers, bidir, act, with_hx, dtype in itertools.product(
            LENGTHS, [False, True], [1, 2], [False, True], ["tanh", "relu"], [False, True],
            [torch.float64, torch.float32],
        )
        if is_sorted(LENGTHS[name]) or not enforce
    ],
    ids=lambda value: str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None,
)
def test_packed_parity_with_nn_rnn(lengths, enforce_sorted, layers, bidir, act, with_hx, dtype, device):
    """Outputs and gradients as assert_parity compares them (float64: assert_close's defaults)."""
    torch.manual_seed(0)
    lengths = LENGTHS[lengths]
    ours, theirs = make_pair(3, 4, dtype=dtype, device=device, num_layers=layers, bidirectional=bidir, nonlinearity=act)
    _, packed = packed_batch(lengths, 3, dtype=dtype, enforce_sorted=enforce_sorted, device=device)
    directions = 2 if bidir else 1
    state_shape = (layers * directions, len(lengths), 4)
    hx = randn(*state_shape, dtype=dtype, device=device, requires_grad=True) if with_hx else None
    grad_output = randn(packed.data.shape[0], directions * 4, dtype=dtype, device=device)
    grad_h_n = randn(*state_shape, dtype=dtype, device=device)

    out, h_n = ours(packed, hx)
    ref_out, ref_h_n = theirs(packed, hx)
    assert isinstance(out, PackedSequence)
    assert out.batch_sizes.device.type == "cpu"
    assert torch.equal(out.batch_sizes, ref_out.batch_sizes)
    for a, b in ((out.sorted_indices, ref_out.sorted_indices), (out.unsorted_indices, ref_out.unsorted_indices)):
        assert (a is None and b is None) or torch.equal(a, b)
    assert_parity(ours, theirs, packed, hx, grad_output, grad_h_n)
    torch.testing.assert_close(pad_packed_sequence(out), pad_packed_sequence(ref_out))


@pytest.mark.parametrize("batch_first", [False, True])
def test_packed_batch_first_matches_reference_loop(batch_first, device):
    torch.manual_seed(1)
    lengths = [2, 6, 4, 1]
    model = rnn_ext.RNN(3, 5, num_layers=2, bidirectional=True, batch_first=batch_first, dtype=torch.float64)
    model = model.to(device)
    padded, packed = packed_batch(lengths, 3, batch_first=batch_first, device=device)
    hx = randn(4, 4, 5, device=device)
    out, h_n = model(packed, hx)
    padded_out, out_lengths = pad_packed_sequence(out, batch_first=batch_first)
    time_major = padded.transpose(0, 1) if batch_first else padded
    ref_out, ref_h_n = reference_rnn(time_major, hx, list(model.parameters()), num_layers=2, bidirectional=True,
                                     lengths=lengths)
    assert out_lengths.tolist() == lengths
    torch.testing.assert_close(padded_out, ref_out.transpose(0, 1) if batch_first else ref_out)
    torch.testing.assert_close(h_n, ref_h_n)


def test_packed_dropout_between_layers():
    torch.manual_seed(2)
    ours, theirs = make_pair(3, 4, num_layers=2, dropout=0.5)
    _, packed = packed_batch([5, 2, 3], 3)
    torch.manual_seed(3)
    out, h_n = ours(packed)
    torch.manual_seed(3)
    ref_out, ref_h_n = theirs(packed)
    torch.testing.assert_close((out.data, h_n), (ref_out.data, ref_h_n))


def test_gradcheck_packed_module(device):
    torch.manual_seed(4)
    model = rnn_ext.RNN(2, 3, num_layers=2, bidirectional=True, dtype=torch.float64).to(device)
    _, packed = packed_batch([4, 1, 3], 2, device=device)
    hx = randn(4, 3, 3, device=device, requires_grad=True)

    def run(data, hx, *weights):
        out, h_n = rnn_ext.rnn(data, hx.index_select(1, packed.sorted_indices), weights, num_layers=2,
                               bidirectional=True, batch_sizes=packed.batch_sizes)
        return out, h_n

    assert torch.autograd.gradcheck(run, (packed.data, hx, *model.parameters()))


def test_packed_float32(device):
    torch.manual_seed(5)
    ours, theirs = make_pair(6, 8, dtype=torch.float32, device=device, num_layers=2, bidirectional=True)
    lengths = torch.randint(1, 30, (16,)).tolist()
    padded = randn(max(lengths), 16, 6, dtype=torch.float32, device=device)
    packed = pack_padded_sequence(padded, torch.tensor(lengths), enforce_sorted=False)
    (out, h_n), (ref_out, ref_h_n) = ours(packed), theirs(packed)
    torch.testing.assert_close((out.data, h_n), (ref_out.data, ref_h_n))
