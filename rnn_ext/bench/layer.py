"""The layer mode (``rnn-ext-benchmark`` without a mode flag): ``rnn_ext.RNN`` against
``torch.nn.RNN`` on dense batches, and the pieces the modes built on it (``packed``) share: the
rows, their tables and the run's report.

For each shape both models get the same weights and inputs; each round times every variant once,
alternating their order from round to round so that machine noise hits all of them; the table
reports medians over rounds:

* fwd: forward under ``torch.no_grad()``;
* fwd+bwd: forward, then ``torch.autograd.grad`` of the output and ``h_n`` (against fixed
  random output gradients) with respect to the input and every parameter;
* speedup: nn.RNN time / rnn_ext time (above 1: rnn_ext is faster);
* GFLOP/s of rnn_ext, counting ``2 * (I_l*H + H*H) * tokens * D`` per layer for the forward
  (``I_l`` = I for layer 0, D*H above; tokens = B*L, or the real tokens when packed) and three
  times that for fwd+bwd, and its share of this machine's SGEMM peak (a large float32
  ``torch.mm`` timed in the same run, before and after the shapes).
"""
import gc
import math
import sys
from dataclasses import dataclass, field

import torch

from . import inputs, report, timing
from .inputs import MODES
from .report import MODE_TITLES, sig
from .shapes import forward_flops

FLOP_FACTOR = {"fwd": 1, "fwd_bwd": 3}
MARKDOWN_NOTE = (
    "Times are medians in ms per call. fwd runs under torch.no_grad(); fwd+bwd adds "
    "torch.autograd.grad of output and h_n with respect to the input and all parameters. "
    "speedup = nn.RNN time / rnn_ext time. GFLOP/s and % peak are rnn_ext's, counting "
    "2*(I_l*H + H*H)*tokens*D per layer for fwd and 3x that for fwd+bwd."
)
TERMINAL_NOTE = "medians of interleaved rounds; speedup = nn.RNN time / rnn_ext time"


@dataclass
class Row:
    """One shape's medians (seconds per call) per mode, of nn.RNN (``reference``) and rnn_ext (``ours``)."""

    shape: object  # shapes.Shape
    rounds: int
    tokens: int
    reference: dict  # mode -> seconds, nn.RNN
    ours: dict  # mode -> seconds, rnn_ext
    peak_gflops: float = math.nan  # this run's SGEMM GFLOP/s

    @property
    def label(self):
        """The row's name in a plot."""
        return self.shape.label

    def speedup(self, mode):
        return self.reference[mode] / self.ours[mode]

    def gflops(self, mode):
        return FLOP_FACTOR[mode] * forward_flops(self.shape, self.tokens) / self.ours[mode] / 1e9

    def percent_of_peak(self, mode):
        return 100 * self.gflops(mode) / self.peak_gflops


@dataclass
class Additions:
    """What a mode built on this one adds to the layer tables and notes."""

    terminal_column: tuple | None = None  # (header, (row, mode) -> text), after each mode's columns
    markdown_columns: list = field(default_factory=list)  # (header, row -> text), after all others
    terminal_notes: list = field(default_factory=list)
    markdown_notes: list = field(default_factory=list)


# -- measuring ----------------------------------------------------------------------------------


def models_and_batches(shape, args, device, dtype, variable=None):
    """``(nn.RNN, rnn_ext.RNN, dense batch, variable batch or None)``, under --autocast when given; warns
    on stderr when the two models' outputs on the batch timed differ beyond the dtype's tolerance."""
    reference, ours = inputs.build_models(shape, dtype, device, args.seed, args.batch_first)
    dense, varied = inputs.make_batches(shape, dtype, device, args.seed, variable, args.batch_first)
    autocast = inputs.DTYPES[args.autocast] if args.autocast else None
    if autocast is not None:
        for batch in (dense, varied):
            if batch is not None:
                batch.under_autocast(autocast)
    difference = inputs.max_forward_difference(reference, ours, varied or dense)
    if not difference <= inputs.TOLERANCE[autocast or dtype]:
        print(f"warning: {shape.label}: rnn_ext and nn.RNN outputs differ by {difference:.3g}", file=sys.stderr)
    return reference, ours, dense, varied


def time_runs(runs, args, timer, on_round):
    """``runs``: kind -> (model, batch). Returns ``({kind: {mode: median seconds}}, rounds)``, each
    mode's runs timed together, interleaved."""
    fns = {}
    for mode in MODES:
        for kind, (model, batch) in runs.items():
            fns[kind, mode] = inputs.mode_fns(model, batch)[mode]
    medians, rounds = timing.time_interleaved(fns, timer, args.rounds, args.min_time, args.shape_budget, on_round)
    return {kind: {mode: medians[kind, mode] for mode in MODES} for kind in runs}, rounds


def benchmark_shape(shape, args, device, dtype, timer, on_round):
    reference, ours, dense, _ = models_and_batches(shape, args, device, dtype)
    times, rounds = time_runs({"reference": (reference, dense), "ours": (ours, dense)}, args, timer, on_round)
    return Row(shape, rounds, dense.tokens, times["reference"], times["ours"])


def measure(shapes, args, device, benchmark_shape=benchmark_shape):
    """The rows of every shape, each from ``benchmark_shape(shape, args, device, dtype, timer,
    on_round)``, and the SGEMM peak (GFLOP/s) timed before and after them."""
    dtype = inputs.DTYPES[args.dtype]
    timer = timing.make_timer(device)
    peak_seconds = timing.sgemm_seconds(device, timer)  # more runs after the shapes, under the load then
    rows = []
    with report.progress_bar(len(shapes) * args.rounds) as bar:
        for shape in shapes:
            bar.set_postfix_str(shape.label)
            row = benchmark_shape(shape, args, device, dtype, timer, lambda: bar.update(1))
            bar.update(args.rounds - row.rounds)  # rounds the shape budget skipped
            rows.append(row)
            gc.collect()
    peak_gflops = timing.sgemm_gflops(peak_seconds + timing.sgemm_seconds(device, timer))
    for row in rows:
        row.peak_gflops = peak_gflops
    return rows, peak_gflops


# -- reporting ----------------------------------------------------------------------------------


def mode_columns(mode):
    title = MODE_TITLES[mode]
    return [
        (f"{title} nn.RNN ms", lambda row: sig(1e3 * row.reference[mode])),
        (f"{title} rnn_ext ms", lambda row: sig(1e3 * row.ours[mode])),
        (f"{title} speedup", lambda row: f"{sig(row.speedup(mode))}x"),
        (f"{title} GFLOP/s", lambda row: sig(row.gflops(mode))),
        (f"{title} % peak", lambda row: sig(row.percent_of_peak(mode))),
    ]


def markdown_columns(additions=Additions()):
    """``(header, row -> text)`` pairs of the markdown table."""
    columns = [("shape B,L,I,H,layers,bidir", lambda row: row.shape.label), ("rounds", lambda row: str(row.rounds))]
    for mode in MODES:
        columns += mode_columns(mode)
    return columns + additions.markdown_columns


def format_markdown_table(rows, additions=Additions()):
    return report.render_markdown_table(*report.cells(markdown_columns(additions), rows))


def format_terminal_table(rows, additions=Additions()):
    """The table printed to the terminal, within report.TERMINAL_WIDTH columns: times and speedups
    (the markdown table adds rounds, GFLOP/s and % peak), then the notes."""
    extra = additions.terminal_column
    headers, groups = ["B,L,I,H,layers,bidir"], [("", 1)]
    for mode in MODES:
        headers += ["nn.RNN", "rnn_ext", "speedup"] + ([extra[0]] if extra else [])
        groups.append((f"{MODE_TITLES[mode]}, ms", 4 if extra else 3))
    body = []
    for row in rows:
        cells = [row.shape.label]
        for mode in MODES:
            cells += [sig(1e3 * row.reference[mode]), sig(1e3 * row.ours[mode]), f"{sig(row.speedup(mode))}x"]
            if extra:
                cells.append(extra[1](row, mode))
        body.append(cells)
    return "\n".join([report.render_table(headers, body, groups), TERMINAL_NOTE, *additions.terminal_notes])


def run_info(args, device, peak_gflops):
    """``(name, value)`` pairs describing this run, for the markdown header."""
    autocast = f", under torch.autocast({device.type!r}, dtype=torch.{args.autocast})" if args.autocast else ""
    return [
        ("machine", report.machine(device)),
        ("torch", torch.__version__),
        ("rnn_ext", report.rnn_ext_build()),
        ("device", str(device)),
        ("dtype", args.dtype + autocast),
        ("layout", "batch-first [B, L, ...]" if args.batch_first else "time-major [L, B, ...]"),
        ("threads", str(torch.get_num_threads())),
        ("rounds", f"up to {args.rounds} per shape, medians; samples of at least {args.min_time * 1e3:g} ms; "
         f"shape budget {args.shape_budget:g} s"),
        ("SGEMM peak", f"{peak_gflops:.1f} GFLOP/s ({timing.peak_description()})"),
        ("date", report.now()),
        ("command", args.command),
    ]


def write_markdown(rows, path, info, additions=Additions()):
    lines = ["# rnn_ext.RNN vs torch.nn.RNN", ""]
    lines += [f"- {name}: {value}" for name, value in info]
    lines += ["", format_markdown_table(rows, additions), "", MARKDOWN_NOTE, *additions.markdown_notes]
    report.write_lines(path, lines)


def publish(rows, args, device, peak_gflops, additions=Additions()):
    """Prints the table, and writes --markdown and --plot when given."""
    under = f" under autocast({args.autocast})" if args.autocast else ""
    print(f"SGEMM peak {peak_gflops:.1f} GFLOP/s; {args.dtype}{under} on {device}, {torch.get_num_threads()} threads")
    print(format_terminal_table(rows, additions))
    if args.markdown:
        write_markdown(rows, args.markdown, run_info(args, device, peak_gflops), additions)
    if args.plot:
        speedups = {mode: [row.speedup(mode) for row in rows] for mode in MODES}
        report.plot_speedups([row.label for row in rows], speedups, args.plot)


def run(args, shapes, device):
    """The rows of every shape; prints the table and writes --markdown and --plot when given."""
    rows, peak_gflops = measure(shapes, args, device)
    publish(rows, args, device, peak_gflops)
    return rows
