"""How the CPU spreads one direction's walk over two threads: its rows in two halves walked side
by side (at least 8 rows and enough work), each step's tiles split over the threads (fewer rows,
larger steps), or one thread (small steps). Each row's arithmetic is the same in all of them, so
one thread and two give the same bits; and the results match nn.RNN's."""
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnn_ext
from reference import make_pair, outputs_and_grads, pipeline, run_and_grads

# (lengths, input size, hidden size) and the walk they get with two threads: 9 rows of H=96 walk in
# halves of 5 and 4 rows (odd, so the halves differ); 4 rows of H=192 split each step's tiles
# (4 x 192 x 192 multiply-adds a step); one row of H=24 runs on one thread. "bands": an input
# projection of depth 1024 over 300 rows, whose tiles walk several bands of row blocks (kernels_impl.h's
# TileOrder), the threads' shares starting mid-band. "packs": weights large enough to pack on both
# threads, a range of column panels each, with a ragged last panel and odd depths (w_ih^T of depth
# 701 for the projection; w_ih of depth 401 for grad_input).
WALKS = {
    "halves": ([20, 3, 17, 20, 1, 9, 14, 20, 6], 16, 96),
    "tiles": ([7, 2, 7, 5], 16, 192),
    "one_thread": ([9], 16, 24),
    "bands": ([10, 9, 10] * 10, 1024, 70),
    "packs": ([4, 2, 3], 701, 401),
}
KINDS = ["dense", "packed", "lengths"]


def batch(kind, lengths, input_size, hidden, dtype):
    """[x, hx, grad_output, grad_h_n] for a batch of these lengths: dense runs every row for the
    longest length, packed is a PackedSequence, lengths the padded batch."""
    generator = torch.Generator().manual_seed(7)
    draw = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=generator).to(dtype)  # noqa: E731
    L, B = max(lengths), len(lengths)
    x, hx = draw(L, B, input_size).requires_grad_(), draw(2, B, hidden).requires_grad_()
    grad_output, grad_h_n = draw(L, B, hidden), draw(2, B, hidden)
    if kind == "packed":
        packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
        x = type(packed)(packed.data.detach().requires_grad_(), *packed[1:])
        grad_output = draw(x.data.shape[0], hidden)
    return x, hx, grad_output, grad_h_n


def run(module, kind, lengths, x, hx, grad_output, grad_h_n):
    """Output, h_n and the gradients of x, hx and every parameter; nn.RNN runs a padded batch
    through pack -> RNN -> pad, as a user has to."""
    if kind != "lengths":
        return outputs_and_grads(module, x, hx, grad_output, grad_h_n)
    if isinstance(module, rnn_ext.RNN):
        return run_and_grads(lambda: module(x, hx, lengths=lengths), module, x, hx, grad_output, grad_h_n)
    return run_and_grads(lambda: pipeline(module, x, hx, lengths), module, x, hx, grad_output, grad_h_n)


def with_threads(count, fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("walk", list(WALKS))
def test_one_thread_and_two_agree(walk, kind, dtype):
    lengths, input_size, hidden = WALKS[walk]
    torch.manual_seed(3)
    ours, _ = make_pair(input_size, hidden, dtype=dtype, num_layers=2, nonlinearity="relu" if walk == "tiles" else "tanh")
    args = batch(kind, lengths, input_size, hidden, dtype)
    one, two = (with_threads(count, lambda: run(ours, kind, lengths, *args)) for count in (1, 2))
    torch.testing.assert_close(two, one, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("walk", list(WALKS))
def test_two_threads_match_nn_rnn(walk, kind):
    lengths, input_size, hidden = WALKS[walk]
    torch.manual_seed(4)
    ours, theirs = make_pair(input_size, hidden, num_layers=2)
    args = batch(kind, lengths, input_size, hidden, torch.float64)
    torch.testing.assert_close(with_threads(2, lambda: run(ours, kind, lengths, *args)), run(theirs, kind, lengths, *args))
