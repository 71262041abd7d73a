"""How rnn_ext's CPU recurrence uses torch's threads (``torch.get_num_threads()``).

Each direction's walk through time splits into row groups (independent sequences, walked with no
synchronisation) and column slices (each step's columns, meeting once a step; each slice keeps its
part of ``W_hh`` in its own core's cache), and a bidirectional layer shares the threads between its
two directions. The split never changes the order of a sum, so every thread count gives the same
bits. ``walk_split`` tells which split a layer gets; ``force_walk_split`` imposes one (tests and
benchmarks). The rules are in ``csrc/cpu/walk_threads.cpp``.
"""
import contextlib

import torch

__all__ = ["walk_split", "force_walk_split"]


def walk_split(batch, steps, hidden_size, dtype=torch.float32, bidirectional=False, threads=None, walk_rows=None):
    """The split of a layer's CPU walk: one ``(row_groups, col_slices)`` pair per direction.

    ``batch`` rows walk ``steps`` time steps (a dense batch: ``batch * steps`` rows in all; give
    ``walk_rows`` for a packed or padded batch, its real rows, with ``batch`` the rows of its first
    step). ``threads`` defaults to ``torch.get_num_threads()``. A direction runs on
    ``row_groups * col_slices`` threads.
    """
    threads = torch.get_num_threads() if threads is None else threads
    walk_rows = batch * steps if walk_rows is None else walk_rows
    flat = torch.ops.rnn_ext.cpu_walk_split(batch, walk_rows, hidden_size, dtype, 2 if bidirectional else 1, threads)
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


@contextlib.contextmanager
def force_walk_split(row_groups, col_slices):
    """Within the block, every CPU walk splits into ``row_groups x col_slices`` (each clamped to the
    walk's rows and ``W_hh``'s column panels), whatever the thread count. Process-wide."""
    torch.ops.rnn_ext.cpu_force_walk_split(row_groups, col_slices)
    try:
        yield
    finally:
        torch.ops.rnn_ext.cpu_force_walk_split(0, 0)
