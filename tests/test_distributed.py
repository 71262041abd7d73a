"""rnn_ext.RNN trained data-parallel on the CPU, two gloo processes: DistributedDataParallel and
FSDP2 (``fully_shard``) take the same SGD steps as one process training on the whole batch.

Each rank runs the model on its half of every global batch; DDP averages the gradients (FSDP2
reduce-scatters them, also averaging), so with the loss a mean over the batch the parameters after
a few steps equal single-process full-batch training up to float64 rounding.
"""
import gc
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnn_ext

WORLD_SIZE = 2
STEPS = 3
BATCH = 8  # global: each rank trains on BATCH // WORLD_SIZE rows
SEQ_LEN, INPUT, HIDDEN = 7, 4, 5
LR = 0.1


class Tagger(nn.Module):
    """A 2-layer bidirectional rnn_ext.RNN and a linear head: a score per step and row."""

    def __init__(self):
        super().__init__()
        self.rnn = rnn_ext.RNN(INPUT, HIDDEN, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * HIDDEN, 1)

    def forward(self, x, lengths=None):
        """x [B, L, I] (with lengths: padded) or a PackedSequence -> (scores of every step, h_n)."""
        output, h_n = self.rnn(x) if lengths is None else self.rnn(x, lengths=lengths)
        if isinstance(output, PackedSequence):
            output = output.data
        return self.head(output).squeeze(-1), h_n


def make_model():
    torch.manual_seed(0)
    return Tagger().double()


def global_batches():
    """STEPS batches (x [BATCH, L, I], lengths [BATCH]), the same in every process."""
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(BATCH, SEQ_LEN, INPUT, generator=generator, dtype=torch.float64),
         torch.randint(1, SEQ_LEN + 1, (BATCH,), generator=generator))
        for _ in range(STEPS)
    ]


def model_inputs(x, lengths, variable):
    if variable == "dense":
        return (x,)
    if variable == "lengths":
        return (x, lengths)
    return (pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False),)


def train(model, rows_of, variable):
    """STEPS SGD steps on the rows rows_of(global rows) of each batch. The loss is a sum over rows
    divided by the global batch size per rank (BATCH // WORLD_SIZE rows each): the ranks' mean is
    the whole batch's loss, which is what data-parallel training averages."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for x, lengths in global_batches():
        rows = rows_of(torch.arange(BATCH))
        scores, h_n = model(*model_inputs(x[rows], lengths[rows], variable))
        loss = ((scores ** 2).sum() + (h_n ** 2).sum()) / rows.numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def full_state(module):
    """The module's parameters as plain tensors (FSDP2 holds them as sharded DTensors)."""
    return {name: (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()
            for name, tensor in module.state_dict().items()}


def train_shard(rank, wrapper, variable):
    """This rank's part of data-parallel training; returns the trained parameters, whole."""
    model = make_model()
    if wrapper == "ddp":
        trained = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.rnn)  # the RNN its own unit, as a transformer block would be
        trained = fully_shard(model)

    def my_rows(rows):
        per_rank = rows.numel() // WORLD_SIZE
        return rows[rank * per_rank : (rank + 1) * per_rank]

    with warnings.catch_warnings():
        # FSDP2 warns when a wrapped module returns a view: rnn_ext.RNN's output is a view of
        # its op's [L*B, D*H] result (nn.RNN's is not); nothing here writes to it in place.
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
        train(trained, my_rows, variable)
    return full_state(model)


def worker(rank, init_file, wrapper, variable, result_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        state = train_shard(rank, wrapper, variable)
        if rank == 0:
            torch.save(state, result_path)
    finally:
        # Free the wrapped model (it sits in reference cycles) and then the process group while
        # Python is alive: a gloo thread that drops its last work item during interpreter
        # shutdown aborts the process (seen with nn.RNN as with rnn_ext.RNN).
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def run_distributed(tmp_path, wrapper, variable):
    result_path = tmp_path / "state.pt"
    mp.start_processes(worker, args=(tmp_path / "init", wrapper, variable, result_path), nprocs=WORLD_SIZE,
                       join=True, start_method="spawn")
    return torch.load(result_path, weights_only=True)


def single_process_state(variable):
    model = make_model()
    train(model, lambda rows: rows, variable)
    return full_state(model)


@pytest.mark.parametrize("variable", ["dense", "lengths", "packed"])
def test_ddp_two_gloo_processes_match_full_batch_training(tmp_path, variable):
    distributed = run_distributed(tmp_path, "ddp", variable)
    expected = single_process_state(variable)
    assert distributed.keys() == expected.keys()
    torch.testing.assert_close(distributed, expected, rtol=1e-10, atol=1e-12)
    untrained = full_state(make_model())
    assert all(not torch.equal(expected[name], untrained[name]) for name in expected if ".rnn." in f".{name}")


def test_fsdp2_fully_shard_matches_full_batch_training(tmp_path):
    distributed = run_distributed(tmp_path, "fsdp", "dense")
    torch.testing.assert_close(distributed, single_process_state("dense"), rtol=1e-10, atol=1e-12)
