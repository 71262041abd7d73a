"""Determinism, concurrent use, memory, long sequences, and 64-bit sizes."""
import threading

import pytest
import torch

import rnn_ext
from reference import make_pair, randn


def forward_backward(model, x, hx):
    out, h_n = model(x, hx)
    loss = out.square().sum() + h_n.sum()
    grads = torch.autograd.grad(loss, [x, hx, *model.parameters()])
    return [out.detach(), h_n.detach(), *grads]


@pytest.mark.parametrize("shape", [(3, 20, 8, 16), (64, 30, 64, 256)], ids=["small-kernel", "blas-path"])
def test_bitwise_deterministic(shape, device):
    batch, seq_len, input_size, hidden = shape
    torch.manual_seed(0)
    model = rnn_ext.RNN(input_size, hidden, num_layers=2, bidirectional=True).to(device)
    x = randn(seq_len, batch, input_size, dtype=torch.float32, device=device, requires_grad=True)
    hx = randn(4, batch, hidden, dtype=torch.float32, device=device, requires_grad=True)
    first = forward_backward(model, x, hx)
    for _ in range(3):
        again = forward_backward(model, x, hx)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


# Small layers on one thread each, and two whose walks split over torch's threads (at 8: 4 row
# groups x 2 column slices, and 4 column slices of 2 rows).
CONCURRENT_JOBS = [(25, 3, 6, 12, False), (25, 3, 6, 16, True), (25, 3, 6, 20, False), (25, 3, 6, 24, True),
                   (30, 16, 16, 160, False), (40, 2, 8, 256, True)]


@pytest.mark.parametrize("torch_threads", [None, 8], ids=["default-threads", "8-threads"])
def test_concurrent_threads_match_sequential_runs(torch_threads):
    """Several Python threads run rnn_ext at once, each with torch's threads (8: oversubscribed on a
    small machine, each walk's split then sharing the cores with the others'), and get the bits the
    same layers get one after the other."""
    threads_before = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    try:
        concurrent_runs_match_sequential_ones()
    finally:
        torch.set_num_threads(threads_before)


def concurrent_runs_match_sequential_ones():
    torch.manual_seed(1)
    jobs = []
    for steps, batch, input_size, hidden, bidirectional in CONCURRENT_JOBS:
        model = rnn_ext.RNN(input_size, hidden, num_layers=2, bidirectional=bidirectional)
        x = torch.randn(steps, batch, input_size, requires_grad=True)
        hx = torch.randn(4 if bidirectional else 2, batch, hidden, requires_grad=True)
        jobs.append((model, x, hx))
    sequential = [forward_backward(*job) for job in jobs]

    results = [None] * len(jobs)
    errors = []

    def work(i):
        try:
            for _ in range(5):
                results[i] = forward_backward(*jobs[i])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got, expected in zip(results, sequential):
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_memory_stays_flat_over_1000_iterations():
    torch.manual_seed(2)
    model = rnn_ext.RNN(32, 64, num_layers=2, bidirectional=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(20, 8, 32)

    def step():
        optimizer.zero_grad()
        out, h_n = model(x)
        (out.square().mean() + h_n.mean()).backward()
        optimizer.step()

    for _ in range(100):  # warm-up: allocator caches, lazy initialisation
        step()
    before = resident_bytes()
    for _ in range(1000):
        step()
    growth = (resident_bytes() - before) / before
    assert growth < 0.01, f"resident memory grew {growth:.2%} over 1000 iterations"


@pytest.mark.parametrize("input_grad", [True, False])
def test_saved_state_is_what_the_gradients_read(device, input_grad):
    """Backward keeps O(L*B*H) per layer: the layer's input, hx, w_hh and its output, and w_ih only
    when the input needs a gradient (the biases' gradients are sums: never)."""
    model = rnn_ext.RNN(5, 7, device=device)
    x = randn(11, 3, 5, dtype=torch.float32, device=device, requires_grad=input_grad)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    # input [L*B, I], hx [1, B, H], output [L*B, H], w_hh, (w_ih)
    assert sorted(saved) == sorted([33 * 5, 3 * 7, 33 * 7, 7 * 7] + ([7 * 5] if input_grad else []))


def test_long_sequence_100k_steps():
    torch.manual_seed(3)
    seq_len = 100_000
    model = rnn_ext.RNN(4, 8)
    x = torch.randn(seq_len, 2, 4, requires_grad=True)
    out, h_n = model(x)
    # Running the two halves one after the other gives the same state, bit for bit.
    with torch.no_grad():
        _, h_half = model(x[: seq_len // 2])
        out_rest, h_rest = model(x[seq_len // 2 :], h_half)
    assert torch.equal(h_rest, h_n)
    assert torch.equal(out_rest, out[seq_len // 2 :].detach())
    (out.sum() + h_n.sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(model.weight_hh_l0.grad).all()


def test_long_sequence_matches_nn_rnn_on_a_prefix(device):
    torch.manual_seed(4)
    ours, theirs = make_pair(4, 8, dtype=torch.float64, device=device)
    x = randn(5000, 1, 4, device=device)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.slow
def test_more_than_2_to_31_elements():
    """output has N*H > 2^31 elements (about 9 GB): run by hand with `pytest -m slow`."""
    torch.manual_seed(5)
    batch, seq_len, hidden = 1024, 16384, 130
    assert batch * seq_len * hidden > 2**31
    model = rnn_ext.RNN(1, hidden)
    x = torch.randn(seq_len, batch, 1)
    with torch.no_grad():
        out, h_n = model(x)
        # Batch rows are independent: the last two alone (past element 2^31 of the output) must
        # give the same numbers; the big run takes the BLAS path, the small one our kernel, so
        # they agree to float32 rounding rather than bit for bit.
        tail_out, tail_h_n = model(x[:, -2:].contiguous())
    assert out[-1, -1].data_ptr() - out.data_ptr() > 4 * 2**31
    torch.testing.assert_close(out[:, -2:], tail_out)
    torch.testing.assert_close(h_n[:, -2:], tail_h_n)
