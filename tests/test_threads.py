"""How the CPU spreads a layer's walks over torch's threads (csrc/cpu/walk_threads.h): each
direction's rows in groups walked side by side, each step's columns in slices that meet once a
step, and a bidirectional layer's threads shared between its directions. Each element's arithmetic
is the same whichever thread computes it, so every thread count, oversubscribed ones included (this
machine has 2 cores), and every split give the same bits; and the results match nn.RNN's."""
import contextlib
import os
import time

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils import cpp_extension

import rnn_ext
from rnn_ext.threads import force_walk_split, walk_split
from reference import make_pair, outputs_and_grads, pipeline, run_and_grads

# (lengths, input size, hidden size, bidirectional) and the split they get. "rows": 9 rows of H=96
# walk in row groups (odd, so the groups differ). "columns": 4 rows of H=192 split each step's
# columns (4 x 192 x 192 multiply-adds a step). "one_thread": one row of H=24 is too small to split.
# "rows_and_columns": 16 rows of H=256 take row groups and column slices together from 8 threads on.
# "bidirectional": the two directions share the threads. "bands": an input projection of depth
# 1024 over 300 rows, whose tiles walk several bands of row blocks (kernels_impl.h's TileOrder), the
# threads' shares starting mid-band. "packs": weights large enough to pack on several threads, a
# range of column panels each, with a ragged last panel and odd depths (w_ih^T of depth 701 for the
# projection; w_ih of depth 401 for grad_input). "weight_chunks": 1536 real rows (1920 dense) of
# H=24, whose weight gradients split the depth into 6 or 7 chunks (rnn_cpu.cpp's blocked_products),
# a dense batch's last chunk spanning the rows that start from hx.
WALKS = {
    "rows": ([20, 3, 17, 20, 1, 9, 14, 20, 6], 16, 96, False),
    "columns": ([7, 2, 7, 5], 16, 192, False),
    "one_thread": ([9], 16, 24, False),
    "rows_and_columns": ([10, 4, 10, 9, 10, 2, 10, 7] * 2, 16, 256, False),
    "bidirectional": ([12, 5, 12, 9, 1, 12, 8, 3], 24, 160, True),
    "bands": ([10, 9, 10] * 10, 1024, 70, False),
    "packs": ([4, 2, 3], 701, 401, False),
    "weight_chunks": ([40, 33, 40, 12, 40, 27] * 8, 16, 24, False),
}
KINDS = ["dense", "packed", "lengths"]
THREADS = [2, 3, 5, 8, 16]  # against one thread


def batch(kind, lengths, input_size, hidden, dtype, states):
    """[x, hx, grad_output, grad_h_n] for a batch of these lengths: dense runs every row for the
    longest length, packed is a PackedSequence, lengths the padded batch. states: layers x directions;
    output features: hidden x directions."""
    generator = torch.Generator().manual_seed(7)
    draw = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=generator).to(dtype)  # noqa: E731
    L, B, features = max(lengths), len(lengths), hidden * (states // 2 if states > 2 else 1)
    x, hx = draw(L, B, input_size).requires_grad_(), draw(states, B, hidden).requires_grad_()
    grad_output, grad_h_n = draw(L, B, features), draw(states, B, hidden)
    if kind == "packed":
        packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
        x = type(packed)(packed.data.detach().requires_grad_(), *packed[1:])
        grad_output = draw(x.data.shape[0], features)
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


def layer_and_batch(walk, kind, dtype, seed=3):
    """A 2-layer rnn_ext.RNN and nn.RNN with the same weights, and a batch for them."""
    lengths, input_size, hidden, bidirectional = WALKS[walk]
    torch.manual_seed(seed)
    nonlinearity = "relu" if walk == "columns" else "tanh"
    ours, theirs = make_pair(input_size, hidden, dtype=dtype, num_layers=2, nonlinearity=nonlinearity,
                             bidirectional=bidirectional)
    return ours, theirs, batch(kind, lengths, input_size, hidden, dtype, 4 if bidirectional else 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("walk", list(WALKS))
def test_every_thread_count_gives_the_same_bits(walk, kind, dtype):
    ours, _, args = layer_and_batch(walk, kind, dtype)
    lengths = WALKS[walk][0]
    one = with_threads(1, lambda: run(ours, kind, lengths, *args))
    for count in THREADS:
        torch.testing.assert_close(with_threads(count, lambda: run(ours, kind, lengths, *args)), one, rtol=0, atol=0,
                                   msg=lambda m: f"{count} threads: {m}")


# Splits forced on a bidirectional layer of H=200 (7 float panels, 13 double ones, the last ragged):
# column slices of one panel or several, row groups of one row, and both at once, on 3 threads.
FORCED = [(1, 3), (2, 7), (5, 1), (3, 4), (9, 13)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("split", FORCED, ids=[f"{r}x{c}" for r, c in FORCED])
def test_every_split_gives_the_same_bits(split, kind, dtype):
    lengths = [7, 2, 7, 5, 6, 1, 7, 4, 3]
    torch.manual_seed(5)
    ours, _ = make_pair(12, 200, dtype=dtype, num_layers=2, bidirectional=True)
    args = batch(kind, lengths, 12, 200, dtype, 4)
    one = with_threads(1, lambda: run(ours, kind, lengths, *args))
    with force_walk_split(*split):
        forced = with_threads(3, lambda: run(ours, kind, lengths, *args))
    torch.testing.assert_close(forced, one, rtol=0, atol=0)


@pytest.mark.parametrize("threads", [2, 8])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("walk", list(WALKS))
def test_threads_match_nn_rnn(walk, kind, threads):
    ours, theirs, args = layer_and_batch(walk, kind, torch.float64, seed=4)
    lengths = WALKS[walk][0]
    torch.testing.assert_close(with_threads(threads, lambda: run(ours, kind, lengths, *args)),
                               run(theirs, kind, lengths, *args))


def test_forced_split_matches_nn_rnn():
    ours, theirs, args = layer_and_batch("bidirectional", "lengths", torch.float64, seed=6)
    lengths = WALKS["bidirectional"][0]
    with force_walk_split(3, 4):
        got = with_threads(4, lambda: run(ours, "lengths", lengths, *args))
    torch.testing.assert_close(got, run(theirs, "lengths", lengths, *args))


def test_walk_split_rules():
    """The split each kind of walk gets (walk_threads.cpp's rules), where they do not depend on
    this machine's cache size."""
    f32 = torch.float32
    # Small walks stay on one thread, at any thread count.
    assert walk_split(1, 100, 32, f32, threads=16) == [(1, 1)]
    # Many rows and a W_hh that fits in cache: row groups only, one per thread, 4 rows or more each.
    assert walk_split(64, 100, 128, f32, threads=16) == [(16, 1)]
    assert walk_split(64, 100, 128, f32, threads=2) == [(2, 1)]
    # Rows to spare for no more groups (4 each): the threads left slice columns, while a slice's share
    # of a step pays for the step's meeting (4 x 128 x 128 / 2 multiply-adds).
    assert walk_split(8, 100, 128, f32, threads=16) == [(2, 2)]
    # Few rows at a large H: column slices use the threads.
    assert walk_split(1, 100, 1024, f32, threads=16) == [(1, 16)]
    assert walk_split(4, 100, 512, f32, threads=2) == [(1, 2)]
    # ... as many as pay for a step's meeting: 1 x 256 x 256 multiply-adds a step make two slices.
    assert walk_split(1, 100, 256, f32, threads=16) == [(1, 2)]
    # A bidirectional layer gives each direction half of the threads (the first the odd one).
    assert walk_split(64, 100, 128, f32, bidirectional=True, threads=16) == [(8, 1), (8, 1)]
    assert walk_split(64, 100, 128, f32, bidirectional=True, threads=5) == [(3, 1), (2, 1)]
    assert walk_split(64, 100, 128, f32, bidirectional=True, threads=1) == [(1, 1), (1, 1)]
    # Every split of a large walk uses all the threads, and never more, whatever the shape.
    for threads in [2, 3, 5, 8, 16, 64]:
        for batch, hidden in [(1, 2048), (8, 1024), (32, 512), (128, 1024), (256, 256)]:
            for dtype in [torch.float32, torch.float64, torch.bfloat16]:
                (rows, cols), = walk_split(batch, 200, hidden, dtype, threads=threads)
                assert rows * cols <= threads and rows <= max(1, batch // 4)
                if batch >= 4 * threads:
                    assert rows * cols >= threads - cols + 1, (batch, hidden, dtype, threads, rows, cols)
    with force_walk_split(3, 5):
        assert walk_split(64, 100, 256, f32, threads=1) == [(3, 5)]
        # Clamped to 2 rows, and to H=16's one panel (two of the baseline kernels' 8 columns).
        assert walk_split(2, 100, 16, f32, threads=1) == [(2, 2 if rnn_ext.cpu_isa() == "baseline" else 1)]
    assert walk_split(64, 100, 128, f32, threads=1) == [(1, 1)]


def thread_cpu_seconds():
    """This process's on-CPU time, per thread (Linux /proc)."""
    seconds = {}
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        seconds[task] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return seconds


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs /proc (Linux)")
@pytest.mark.parametrize("split", [(2, 1), (1, 2)], ids=["rows", "columns"])
def test_walk_runs_on_two_threads(split):
    """The walk itself, not only the products around it, keeps two threads busy: in a layer of input
    size 1 (its projection negligible), whose time is all walk, two threads each take a good share
    of the CPU time, split either way; with one thread, one does. (Shares, not seconds: the test
    holds on a loaded machine.)"""
    torch.manual_seed(0)
    model = rnn_ext.RNN(1, 512, nonlinearity="relu")
    x = torch.randn(400, 8, 1)

    def busiest_two(threads):
        with torch.no_grad(), force_walk_split(*split):
            with_threads(threads, lambda: model(x))  # the pool started
            before, start = thread_cpu_seconds(), time.perf_counter()
            while time.perf_counter() - start < 1.0:
                with_threads(threads, lambda: model(x))
            after = thread_cpu_seconds()
        busy = sorted((after[t] - before.get(t, 0.0) for t in after), reverse=True)
        return busy[0], busy[1]

    first, second = busiest_two(2)
    assert second > 0.5 * first, (first, second)
    first, second = busiest_two(1)
    assert second < 0.1 * first, (first, second)


def weight_gradients_busiest_two(threads):
    """CPU seconds of the two busiest threads while the weights' gradients of a layer are taken over
    and over for a second. Most of that work is the weight gradients' products: W_ih [32, 256] and
    W_hh [32, 32] make one block each, uneven ones, so the depth (25600 rows) splits into chunks
    too (rnn_cpu.cpp's blocked_products)."""
    torch.manual_seed(0)
    model = rnn_ext.RNN(256, 32)
    x = torch.randn(400, 64, 256)
    weights = [model.weight_ih_l0, model.weight_hh_l0]
    output, _ = model(x)
    grad = lambda: torch.autograd.grad(output, weights, torch.ones_like(output), retain_graph=True)  # noqa: E731
    with_threads(threads, grad)  # the pool started
    before, start = thread_cpu_seconds(), time.perf_counter()
    while time.perf_counter() - start < 1.0:
        with_threads(threads, grad)
    after = thread_cpu_seconds()
    busy = sorted((after[t] - before.get(t, 0.0) for t in after), reverse=True)
    return busy[0], busy[1]


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs /proc (Linux)")
def test_weight_gradients_run_on_two_threads():
    """Two threads each take a good share of the weight gradients' CPU time (one thread: one does).
    In a process where OpenMP's idle threads sleep at once (OMP_WAIT_POLICY=PASSIVE): by default a
    thread left without work spins for a while, which would count as a share."""
    import json
    import subprocess
    import sys

    from reference import subprocess_env

    code = "import json, test_threads as t; print(json.dumps([t.weight_gradients_busiest_two(n) for n in (2, 1)]))"
    result = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(__file__)),
                            env=subprocess_env(OMP_WAIT_POLICY="PASSIVE"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (first, second), (only, other) = json.loads(result.stdout.splitlines()[-1])
    assert second > 0.5 * first, (first, second)
    assert other < 0.1 * only, (only, other)


class WalksInWorkers(torch.utils.data.Dataset):
    """Item i: the forward of the layer on batch i, in a DataLoader worker (one thread, as DataLoader
    sets: GNU OpenMP's pool does not survive fork, and with more threads even nn.RNN hangs there),
    split into 2 row groups x 3 column slices all the same."""

    def __init__(self, model, batches):
        self.model, self.batches = model, batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        with torch.no_grad(), force_walk_split(2, 3):
            return torch.get_num_threads(), self.model(self.batches[i])[0]


@pytest.mark.skipif("fork" not in torch.multiprocessing.get_all_start_methods(), reason="needs fork")
def test_dataloader_workers_forked_after_the_pool_started():
    """Workers forked from a process whose walks already ran on its threads run theirs on their one
    thread, a split's slices taken in turn, with the same bits, and do not hang (the loader's
    timeout would fail the test)."""
    torch.manual_seed(8)
    model = rnn_ext.RNN(5, 160, num_layers=2)
    batches = [torch.randn(30, 12, 5) for _ in range(4)]
    with torch.no_grad(), force_walk_split(2, 3):
        expected = with_threads(2, lambda: [model(x)[0] for x in batches])  # the pool is up before the fork
    loader = torch.utils.data.DataLoader(WalksInWorkers(model, batches), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork", timeout=120)
    for (threads, got), want in zip(loader, expected):
        assert threads == 1
        torch.testing.assert_close(got, want, rtol=0, atol=0)


NESTED_SOURCE = r"""
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

// Runs rnn_ext::rnn_layer on each of `copies` inputs inside one at::parallel_for, as a caller that
// parallelises over its own work would; returns each output.
std::vector<at::Tensor> layers_in_parallel_for(const std::vector<at::Tensor>& inputs, const at::Tensor& hx,
                                               const at::Tensor& w_ih, const at::Tensor& w_hh) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("rnn_ext::rnn_layer", "");
  std::vector<at::Tensor> outputs(inputs.size());
  at::parallel_for(0, static_cast<int64_t>(inputs.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      auto stack = op.typed<std::tuple<at::Tensor, at::Tensor>(
          const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
          const std::optional<at::Tensor>&, bool, const std::optional<at::Tensor>&)>()
          .call(inputs[i], hx, w_ih, w_hh, {}, {}, {}, {}, {}, {}, {}, false, {});
      outputs[i] = std::get<0>(stack);
    }
  });
  return outputs;
}
"""


@pytest.mark.skipif(not cpp_extension.is_ninja_available(), reason="load_inline needs ninja")
def test_called_inside_an_outer_parallel_for(tmp_path):
    """A walk started inside another parallel region (at::parallel_for then runs inline) runs on its
    one thread, forced split or not, and gives the same bits as on its own."""
    nested = cpp_extension.load_inline("rnn_ext_nested_check", cpp_sources=NESTED_SOURCE, functions=["layers_in_parallel_for"],
                         build_directory=str(tmp_path), extra_cflags=["-O1", "-fopenmp"], extra_ldflags=["-fopenmp"])
    torch.manual_seed(9)
    inputs = [torch.randn(20 * 8, 6) for _ in range(4)]  # [N, I]: 20 steps of 8 rows
    hx, w_ih, w_hh = torch.randn(1, 8, 96), torch.randn(96, 6) / 4, torch.randn(96, 96) / 10
    alone = [torch.ops.rnn_ext.rnn_layer(x, hx, w_ih, w_hh, *[None] * 7, False)[0] for x in inputs]
    for split in [None, (2, 3)]:
        with force_walk_split(*split) if split else contextlib.nullcontext():
            got = with_threads(2, lambda: nested.layers_in_parallel_for(inputs, hx, w_ih, w_hh))
        for a, b in zip(got, alone):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
