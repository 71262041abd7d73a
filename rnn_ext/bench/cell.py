"""The cell mode, ``rnn-ext-benchmark --cell``: times Python loops over ``rnn_ext.RNNCell``
against the same loops over ``torch.nn.RNNCell`` (same weights, same inputs), in one process.

For each shape ``B,I,H[,T]`` both cells run a loop of T steps, ``h = cell(x[t], h)`` from a given
h0 (``x[t]`` indexed inside the loop, as user code does), in two modes:

* fwd: the loop under ``torch.no_grad()`` (sampling, inference);
* fwd+bwd: the loop with autograd on, then ``torch.autograd.grad`` of all T states (against fixed
  random gradients) with respect to the inputs and every parameter (BPTT).

Timing is the layer mode's (``timing.time_interleaved``): interleaved rounds, medians. The table
gives the time per step (loop time / T) and speedup = nn.RNNCell's time / rnn_ext's.
"""
import gc
import sys
from dataclasses import dataclass

import torch

import rnn_ext

from . import report, timing
from .inputs import DTYPES, MODES, TOLERANCE
from .report import MODE_TITLES, sig

DEFAULT_STEPS = 100


@dataclass(frozen=True)
class CellShape:
    batch: int
    input_size: int
    hidden_size: int
    steps: int = DEFAULT_STEPS

    @property
    def label(self):
        """The shape in ``--shapes`` syntax: B,I,H,T."""
        return f"{self.batch},{self.input_size},{self.hidden_size},{self.steps}"


CELL_SHAPE_SETS = {
    "cell": (
        CellShape(1, 32, 32),
        CellShape(1, 64, 64),
        CellShape(1, 128, 128),
        CellShape(1, 256, 256),
        CellShape(1, 512, 512),
        CellShape(1, 1024, 1024, 20),
        CellShape(1, 300, 50),
        CellShape(2, 32, 32),
        CellShape(4, 64, 64),
        CellShape(8, 128, 128),
        CellShape(12, 128, 256),
        CellShape(16, 128, 128),
        CellShape(32, 256, 256),
        CellShape(64, 1024, 1024, 20),
    ),
}
CELL_SHAPE_SYNTAX = "B,I,H[,T] with positive integers (T: loop steps, default 100)"


def parse_cell_shapes(tokens):
    """Each token is a named set (``cell``) or one shape ``B,I,H[,T]``; ValueError naming the problem otherwise."""
    shapes = []
    for token in tokens:
        if token in CELL_SHAPE_SETS:
            shapes.extend(CELL_SHAPE_SETS[token])
            continue
        fields = [field.strip() for field in token.split(",")]
        if not 3 <= len(fields) <= 4 or not all(field.isdigit() and int(field) > 0 for field in fields):
            raise ValueError(f"cell shape {token!r}: expected a named set ({', '.join(CELL_SHAPE_SETS)}) or "
                             f"{CELL_SHAPE_SYNTAX}")
        shapes.append(CellShape(*map(int, fields)))
    return shapes


def build_cells(shape, dtype, device, seed):
    """``(nn.RNNCell, rnn_ext.RNNCell)`` holding the same weights."""
    torch.manual_seed(seed)
    reference = torch.nn.RNNCell(shape.input_size, shape.hidden_size, dtype=dtype, device=device)
    ours = rnn_ext.RNNCell(shape.input_size, shape.hidden_size, dtype=dtype, device=device)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def loop(cell, xs, h):
    """The T states of ``h = cell(xs[t], h)``, indexing xs in the loop as user code does."""
    states = []
    for t in range(xs.shape[0]):
        h = cell(xs[t], h)
        states.append(h)
    return states


def make_fns(cell, xs, h0, grads):
    inputs = [xs, *cell.parameters()]

    def forward():
        with torch.no_grad():
            return loop(cell, xs, h0)

    def forward_backward():
        states = loop(cell, xs, h0)
        return torch.autograd.grad(states, inputs, grads)

    return {"fwd": forward, "fwd_bwd": forward_backward}


@dataclass
class CellRow:
    shape: CellShape
    rounds: int
    reference: dict  # mode -> seconds per loop, nn.RNNCell
    ours: dict  # mode -> seconds per loop, rnn_ext.RNNCell

    def per_step_us(self, kind, mode):
        return 1e6 * getattr(self, kind)[mode] / self.shape.steps

    def speedup(self, mode):
        return self.reference[mode] / self.ours[mode]


def benchmark_cell_shape(shape, args, device, dtype, timer, on_round):
    reference, ours = build_cells(shape, dtype, device, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    randn = lambda *size: torch.randn(*size, generator=gen, dtype=dtype).to(device)  # noqa: E731
    xs = randn(shape.steps, shape.batch, shape.input_size).requires_grad_()
    h0 = randn(shape.batch, shape.hidden_size)
    grads = list(randn(shape.steps, shape.batch, shape.hidden_size).unbind(0))
    with torch.no_grad():
        difference = (reference(xs[0], h0) - ours(xs[0], h0)).abs().max().item()
    if not difference <= TOLERANCE[dtype]:
        print(f"warning: {shape.label}: rnn_ext and nn.RNNCell differ by {difference:.3g}", file=sys.stderr)
    fns = {}
    for kind, cell in (("reference", reference), ("ours", ours)):
        for mode, fn in make_fns(cell, xs, h0, grads).items():
            fns[kind, mode] = fn
    medians, rounds = timing.time_interleaved(fns, timer, args.rounds, args.min_time, args.shape_budget, on_round)
    return CellRow(shape, rounds, {m: medians["reference", m] for m in MODES}, {m: medians["ours", m] for m in MODES})


def table_columns():
    columns = [("shape B,I,H,T", lambda row: row.shape.label), ("rounds", lambda row: str(row.rounds))]
    for mode in MODES:
        title = MODE_TITLES[mode]
        columns += [
            (f"{title} nn us/step", lambda row, mode=mode: sig(row.per_step_us("reference", mode))),
            (f"{title} rnn_ext us/step", lambda row, mode=mode: sig(row.per_step_us("ours", mode))),
            (f"{title} speedup", lambda row, mode=mode: f"{sig(row.speedup(mode))}x"),
        ]
    return columns


def format_terminal_table(rows):
    """The printed table (within report.TERMINAL_WIDTH): times per step and speedups."""
    headers, groups, body = ["B,I,H,T"], [("", 1)], [[row.shape.label] for row in rows]
    for mode in MODES:
        headers += ["nn.RNNCell", "rnn_ext", "speedup"]
        groups.append((f"{MODE_TITLES[mode]}, us/step", 3))
        for line, row in zip(body, rows):
            line += [sig(row.per_step_us("reference", mode)), sig(row.per_step_us("ours", mode)),
                     f"{sig(row.speedup(mode))}x"]
    return report.render_table(headers, body, groups)


def write_markdown(rows, path, args, device):
    table = report.render_markdown_table(*report.cells(table_columns(), rows), text_columns=2)
    lines = [
        "# rnn_ext.RNNCell vs torch.nn.RNNCell: Python loops of T steps",
        "",
        f"- machine: {report.machine()}",
        f"- torch: {torch.__version__}",
        f"- rnn_ext: {report.rnn_ext_build()}",
        f"- device: {device}; dtype: {args.dtype}; threads: {torch.get_num_threads()}",
        f"- rounds: up to {args.rounds} per shape, medians; samples of at least {args.min_time * 1e3:g} ms",
        f"- date: {report.now()}",
        f"- command: {args.command}",
        "",
        table,
        "",
        "Times are medians per step (loop time / T) in microseconds. fwd: `h = cell(x[t], h)` for T steps "
        "under torch.no_grad(); fwd+bwd: the same loop with autograd, then torch.autograd.grad of all T states "
        "with respect to the inputs and every parameter (BPTT). speedup = nn.RNNCell time / rnn_ext time.",
    ]
    report.write_lines(path, lines)


def run(args, shapes, device):
    """The rows of every shape; prints the table, and writes --markdown when given."""
    dtype = DTYPES[args.dtype]
    timer = timing.make_timer(device)
    rows = []
    progress = report.progress_bar(len(shapes) * args.rounds)
    with progress as bar:
        for shape in shapes:
            bar.set_postfix_str(shape.label)
            row = benchmark_cell_shape(shape, args, device, dtype, timer, lambda: bar.update(1))
            bar.update(args.rounds - row.rounds)
            rows.append(row)
            gc.collect()
    print(f"{args.dtype} on {device}, {torch.get_num_threads()} threads; medians, microseconds per step")
    print(format_terminal_table(rows))
    if args.markdown:
        write_markdown(rows, args.markdown, args, device)
    return rows
