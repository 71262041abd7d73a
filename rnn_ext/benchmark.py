"""Times ``rnn_ext.RNN`` against ``torch.nn.RNN`` with the same weights, in one process
(``--cell``: ``rnn_ext.RNNCell`` against ``torch.nn.RNNCell``, see ``rnn_ext.cell_benchmark``;
``--threads 1,2,4,8,16``: both across thread counts, see ``rnn_ext.thread_benchmark``).

Run ``rnn-ext-benchmark --help`` (the console command pip installs; ``python -m
rnn_ext.benchmark`` is the same). For each shape both implementations get the
same weights (``load_state_dict``) and the same inputs; each round times every variant once,
alternating their order from round to round so that machine noise hits all of them; the
table reports medians over rounds:

* fwd: forward under ``torch.no_grad()``;
* fwd+bwd: forward, then ``torch.autograd.grad`` of the output and ``h_n`` (against fixed
  random output gradients) with respect to the input and every parameter;
* speedup: nn.RNN time / rnn_ext time (above 1: rnn_ext is faster);
* GFLOP/s of rnn_ext, counting ``2 * (I_l*H + H*H) * tokens * D`` per layer for the forward
  (``I_l`` = I for layer 0, D*H above; tokens = B*L, or the real tokens when packed) and three
  times that for fwd+bwd, and its share of this machine's SGEMM peak (a large float32
  ``torch.mm`` timed in the same run, before and after the shapes).

With ``--packed`` each batch has lengths drawn uniformly from [1, L] (seeded) and is packed with
``pack_padded_sequence(enforce_sorted=False)``; rnn_ext also runs the same batch padded to all
L steps (dense), and the table gives rnn_ext's packed/padded time ratio.

With ``--lengths`` the batch is padded, with lengths drawn the same way: rnn_ext runs
``model(x, lengths=lengths)``; nn.RNN runs the pipeline a user needs for the same result,
``pack_padded_sequence(x, lengths, enforce_sorted=False)`` -> nn.RNN ->
``pad_packed_sequence(total_length=L)``, timed whole; rnn_ext also runs ``x`` without lengths
(dense), and the table gives rnn_ext's lengths/dense time ratio. ``--batch-first`` lays every
batch out as ``[B, L, ...]``.
"""
import argparse
import datetime
import gc
import importlib.util
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import rnn_ext

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Largest |rnn_ext - nn.RNN| forward difference accepted silently; above it a warning is printed.
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-9, torch.bfloat16: 0.25, torch.float16: 0.05}
TERMINAL_WIDTH = 100  # columns the printed table fits in
PEAK_SIZE = 2048
PEAK_SAMPLES = 5
MIN_ROUNDS = 3


# -- shapes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    batch: int
    seq_len: int
    input_size: int
    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False

    @property
    def directions(self):
        return 2 if self.bidirectional else 1

    @property
    def label(self):
        """The shape in ``--shapes`` syntax: B,L,I,H,layers,yes|no."""
        bidir = "yes" if self.bidirectional else "no"
        return f"{self.batch},{self.seq_len},{self.input_size},{self.hidden_size},{self.num_layers},{bidir}"


SHAPE_SETS = {
    "default": (
        Shape(1, 100, 32, 32),
        Shape(8, 100, 64, 64),
        Shape(1, 1000, 64, 256),
        Shape(8, 1000, 256, 256, 2),
        Shape(32, 200, 128, 128),
        Shape(16, 50, 128, 128, 2, True),
        Shape(64, 100, 256, 256, 2),
        Shape(128, 50, 1024, 1024),
    ),
    "packed": (
        Shape(32, 200, 64, 64),
        Shape(64, 500, 128, 128),
    ),
    "lengths": (
        Shape(32, 200, 64, 64),
        Shape(64, 500, 128, 128),
        Shape(16, 1000, 32, 32),
        Shape(128, 100, 256, 256),
        Shape(8, 100, 64, 64),
        Shape(256, 50, 64, 64),
        Shape(32, 100, 128, 128, 2, True),
        Shape(64, 200, 512, 512),
    ),
}
_BOOLS = {"yes": True, "y": True, "true": True, "1": True, "no": False, "n": False, "false": False, "0": False}
SHAPE_SYNTAX = "B,L,I,H[,layers[,bidir]] with positive integers and bidir one of yes/no/true/false/1/0"


def parse_shape(text):
    """``"B,L,I,H[,layers[,bidir]]"`` -> Shape; ValueError naming the problem otherwise."""
    fields = [field.strip() for field in text.split(",")]
    if not 4 <= len(fields) <= 6:
        raise ValueError(f"shape {text!r}: expected {SHAPE_SYNTAX}; got {len(fields)} fields")
    bidirectional = False
    if len(fields) == 6:
        bidir = fields.pop().lower()
        if bidir not in _BOOLS:
            raise ValueError(f"shape {text!r}: bidir must be one of yes/no/true/false/1/0, got {bidir!r}")
        bidirectional = _BOOLS[bidir]
    names = ("B", "L", "I", "H", "layers")
    sizes = []
    for name, field in zip(names, fields):
        if not field.isdigit() or int(field) <= 0:
            raise ValueError(f"shape {text!r}: {name} must be a positive integer, got {field!r}")
        sizes.append(int(field))
    return Shape(*sizes, bidirectional=bidirectional)


def parse_shapes(tokens):
    """Each token is a named set (``default``, ``packed``) or one shape; returns the shapes in order."""
    shapes = []
    for token in tokens:
        if token in SHAPE_SETS:
            shapes.extend(SHAPE_SETS[token])
        elif "," in token:
            shapes.append(parse_shape(token))
        else:
            raise ValueError(f"unknown shape set {token!r}: use one of {', '.join(SHAPE_SETS)} or {SHAPE_SYNTAX}")
    return shapes


def forward_flops(shape, tokens):
    """Multiply-adds x 2 of every layer's input and recurrent GEMMs over ``tokens`` (B*L dense)."""
    total = 0
    for layer in range(shape.num_layers):
        layer_input = shape.input_size if layer == 0 else shape.directions * shape.hidden_size
        total += 2 * (layer_input * shape.hidden_size + shape.hidden_size**2) * tokens * shape.directions
    return total


# -- models and inputs --------------------------------------------------------------------------


def build_models(shape, dtype, device, seed, batch_first=False):
    """``(nn.RNN, rnn_ext.RNN)`` holding the same weights."""
    kwargs = dict(num_layers=shape.num_layers, bidirectional=shape.bidirectional, dtype=dtype, device=device,
                  batch_first=batch_first)
    torch.manual_seed(seed)
    reference = torch.nn.RNN(shape.input_size, shape.hidden_size, **kwargs)
    ours = rnn_ext.RNN(shape.input_size, shape.hidden_size, **kwargs)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


@dataclass
class Batch:
    """One model input and the gradients fed to the backward pass of its outputs."""

    input: object  # a [L, B, I] ([B, L, I] batch-first) tensor or a PackedSequence; its data requires grad
    leaf: torch.Tensor  # the tensor the input gradient is taken against
    grad_output: torch.Tensor
    grad_h_n: torch.Tensor
    tokens: int
    lengths: torch.Tensor | None = None  # of a padded batch run with lengths (--lengths)
    batch_first: bool = False
    autocast: torch.dtype | None = None  # run under torch.autocast in this dtype (--autocast)


def make_batches(shape, dtype, device, seed, variable=None, batch_first=False):
    """The dense batch, and with ``variable`` ("packed" or "lengths") also the same batch with random
    lengths, packed or padded.

    Returns ``(dense, variable_or_None)``; lengths are uniform in [1, L], padding is zero.
    """
    gen = torch.Generator().manual_seed(seed)
    out_features = shape.directions * shape.hidden_size
    h_n_shape = (shape.num_layers * shape.directions, shape.batch, shape.hidden_size)

    def randn(*size):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    def layout(t):  # [L, B, ...] -> the models' layout
        return t.transpose(0, 1).contiguous() if batch_first else t

    x = randn(shape.seq_len, shape.batch, shape.input_size)
    grad_h_n = randn(*h_n_shape)
    if variable is not None:
        lengths = torch.randint(1, shape.seq_len + 1, (shape.batch,), generator=gen)
        steps = torch.arange(shape.seq_len).unsqueeze(1)
        x = x * (steps < lengths).unsqueeze(2).to(device=device, dtype=dtype)
    dense_x = layout(x).requires_grad_()
    grad_output = layout(randn(*x.shape[:2], out_features))
    dense = Batch(dense_x, dense_x, grad_output, grad_h_n, shape.seq_len * shape.batch, batch_first=batch_first)
    if variable is None:
        return dense, None
    tokens = int(lengths.sum())
    if variable == "lengths":
        return dense, Batch(dense_x, dense_x, grad_output, grad_h_n, tokens, lengths, batch_first)
    data, batch_sizes, sorted_indices, unsorted_indices = pack_padded_sequence(
        layout(x), lengths, batch_first=batch_first, enforce_sorted=False
    )
    data = data.detach().requires_grad_()
    sequence = PackedSequence(data, batch_sizes, sorted_indices, unsorted_indices)
    return dense, Batch(sequence, data, randn(tokens, out_features), grad_h_n, tokens, batch_first=batch_first)


def run_model(model, batch):
    """``(output tensor, h_n)`` of ``model`` on ``batch``, under ``torch.autocast`` when the batch
    asks for it."""
    enabled = batch.autocast is not None
    with torch.autocast(batch.leaf.device.type, dtype=batch.autocast, enabled=enabled):
        return run_model_as_is(model, batch)


def run_model_as_is(model, batch):
    """run_model without autocast. With lengths, rnn_ext.RNN takes them itself; nn.RNN runs the
    pack -> RNN -> pad pipeline that gives the same result."""
    if batch.lengths is None:
        output, h_n = model(batch.input)
        return (output.data if isinstance(output, PackedSequence) else output), h_n
    if isinstance(model, rnn_ext.RNN):
        return model(batch.input, lengths=batch.lengths)
    total_length = batch.input.shape[1 if batch.batch_first else 0]
    packed = pack_padded_sequence(batch.input, batch.lengths, batch_first=batch.batch_first, enforce_sorted=False)
    output, h_n = model(packed)
    output, _ = pad_packed_sequence(output, batch_first=batch.batch_first, total_length=total_length)
    return output, h_n


def forward_fn(model, batch):
    def run():
        with torch.no_grad():
            return run_model(model, batch)

    return run


def forward_backward_fn(model, batch):
    inputs = [batch.leaf, *model.parameters()]

    def run():
        output, h_n = run_model(model, batch)
        return torch.autograd.grad((output, h_n), inputs, (batch.grad_output, batch.grad_h_n))

    return run


def max_forward_difference(reference, ours, batch):
    """Largest |difference| of output and h_n between the two models on ``batch``."""
    with torch.no_grad():
        (ref_out, ref_h), (our_out, our_h) = run_model(reference, batch), run_model(ours, batch)
    pairs = ((ref_out, our_out), (ref_h, our_h))
    return max(float((a.float() - b.float()).abs().max()) for a, b in pairs)


# -- timing -------------------------------------------------------------------------------------


def without_gc(timer):
    """``timer`` with Python's garbage collector off while it runs, as ``timeit`` does: a
    collection then lands in no sample, whichever function's garbage set it off."""

    def timed(fn, n):
        enabled = gc.isenabled()
        gc.disable()
        try:
            return timer(fn, n)
        finally:
            if enabled:
                gc.enable()

    return timed


def make_timer(device):
    """``timer(fn, n)`` -> seconds per call of ``fn`` over ``n`` back-to-back calls."""
    if device.type == "cuda":

        def cuda_timer(fn, n):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / n

        return without_gc(cuda_timer)

    def cpu_timer(fn, n):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - start) / n

    return without_gc(cpu_timer)


def calls_per_sample(fn, timer, min_time):
    """Warms ``fn`` up with a timed call, and when that was shorter than ``min_time`` times one
    more; returns ``(calls per sample of at least min_time seconds, seconds per call)``."""
    seconds = timer(fn, 1)
    if seconds < min_time:
        seconds = timer(fn, 1)
    return max(1, math.ceil(min_time / max(seconds, 1e-9))), seconds


def time_interleaved(fns, timer, rounds, min_time, budget=0.0, on_round=None):
    """Median seconds per call of each of ``fns`` (a name -> callable dict), timed in rounds.

    Each round takes one sample (of enough calls to last ``min_time``, after one untimed call) of
    every function, in an order reversed every other round. ``budget`` (seconds for warm-up and rounds, 0: none) lowers
    the rounds when they are slow, down to MIN_ROUNDS (or ``rounds`` if fewer). Returns
    ``(medians, rounds_run)``.
    """
    start = time.perf_counter()
    counts, round_cost = {}, 0.0
    for name, fn in fns.items():
        counts[name], seconds = calls_per_sample(fn, timer, min_time)
        round_cost += counts[name] * seconds
    if budget > 0:
        left = budget - (time.perf_counter() - start)
        rounds = min(rounds, max(MIN_ROUNDS, int(left / max(round_cost, 1e-9))))
    samples = {name: [] for name in fns}
    names = list(fns)
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            fns[name]()  # untimed: the sample does not pay for the caches and threads the last function left
            samples[name].append(timer(fns[name], counts[name]))
        if on_round is not None:
            on_round()
    return {name: statistics.median(values) for name, values in samples.items()}, rounds


def sgemm_seconds(device, timer):
    """Seconds of each of PEAK_SAMPLES PEAK_SIZE-cubed float32 ``torch.mm`` runs (after a warm-up)."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(PEAK_SIZE, PEAK_SIZE, generator=gen).to(device) for _ in range(2))
    timer(lambda: torch.mm(a, b), 1)
    return [timer(lambda: torch.mm(a, b), 1) for _ in range(PEAK_SAMPLES)]


def sgemm_gflops(seconds):
    """GFLOP/s of the fastest run: a busy machine only slows runs down, so the fastest is the
    steadiest estimate of what the machine can do (a median drifts with the load)."""
    return 2 * PEAK_SIZE**3 / min(seconds) / 1e9


# -- results ------------------------------------------------------------------------------------

MODES = ("fwd", "fwd_bwd")
MODE_TITLES = {"fwd": "fwd", "fwd_bwd": "fwd+bwd"}
FLOP_FACTOR = {"fwd": 1, "fwd_bwd": 3}


@dataclass
class Row:
    """One shape's medians (seconds per call); ``padded`` holds rnn_ext's dense times when packed
    or run with lengths (``variable``)."""

    shape: Shape
    rounds: int
    tokens: int
    reference: dict  # mode -> seconds, nn.RNN
    ours: dict  # mode -> seconds, rnn_ext
    padded: dict | None = None  # mode -> seconds, rnn_ext on the padded batch (only with --packed/--lengths)
    peak_gflops: float = math.nan  # this run's SGEMM GFLOP/s
    variable: str | None = None  # "packed" or "lengths"

    @property
    def packed(self):
        return self.padded is not None

    @property
    def fill(self):
        """Real tokens / padded tokens."""
        return self.tokens / (self.shape.batch * self.shape.seq_len)

    def speedup(self, mode):
        return self.reference[mode] / self.ours[mode]

    def gflops(self, mode):
        return FLOP_FACTOR[mode] * forward_flops(self.shape, self.tokens) / self.ours[mode] / 1e9

    def percent_of_peak(self, mode):
        return 100 * self.gflops(mode) / self.peak_gflops

    def packed_ratio(self, mode):
        return self.ours[mode] / self.padded[mode]


def _sig(value):
    """About three significant digits, without an exponent for values from 0.001 up."""
    for digits, bound in ((0, 100), (1, 10), (2, 1)):
        if abs(value) >= bound:
            return f"{value:.{digits}f}"
    return f"{value:.3f}" if abs(value) >= 0.01 else f"{value:.2g}"


def _mode_columns(mode):
    title = MODE_TITLES[mode]
    return [
        (f"{title} nn.RNN ms", lambda row: _sig(1e3 * row.reference[mode])),
        (f"{title} rnn_ext ms", lambda row: _sig(1e3 * row.ours[mode])),
        (f"{title} speedup", lambda row: f"{_sig(row.speedup(mode))}x"),
        (f"{title} GFLOP/s", lambda row: _sig(row.gflops(mode))),
        (f"{title} % peak", lambda row: _sig(row.percent_of_peak(mode))),
    ]


def table_columns(rows):
    """``(header, row -> text)`` pairs shared by the printed and the markdown table."""
    columns = [("shape B,L,I,H,layers,bidir", lambda row: row.shape.label), ("rounds", lambda row: str(row.rounds))]
    for mode in MODES:
        columns += _mode_columns(mode)
    if any(row.packed for row in rows):
        ratio = "lengths/dense" if any(row.variable == "lengths" for row in rows) else "packed/padded"
        columns.append(("fill %", lambda row: f"{100 * row.fill:.0f}" if row.packed else "-"))
        for mode in MODES:
            columns.append(
                (
                    f"{MODE_TITLES[mode]} {ratio}",
                    lambda row, mode=mode: f"{row.packed_ratio(mode):.2f}" if row.packed else "-",
                )
            )
    return columns


def _cells(rows):
    columns = table_columns(rows)
    return [header for header, _ in columns], [[cell(row) for _, cell in columns] for row in rows]


def render_table(headers, body, groups=()):
    """Header and rows of cell texts as an aligned plain-text table. groups: (title, column count)
    pairs in column order, each titling the run of columns below it on a line above the headers
    (an empty title leaves its columns untitled)."""
    widths = [max(len(text) for text in column) for column in zip(headers, *body)]
    lines = ["  ".join(text.rjust(width) for text, width in zip(line, widths)) for line in [headers, *body]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    if groups:
        spans, first = [], 0
        for title, count in groups:
            span = sum(widths[first : first + count]) + 2 * (count - 1)
            spans.append(f" {title} ".center(span, "-") if title else " " * span)
            first += count
        lines.insert(0, "  ".join(spans).rstrip())
    return "\n".join(lines)


def render_markdown_table(headers, body, text_columns=1):
    """The same as a markdown table; columns after the first text_columns are right-aligned."""
    lines = ["| " + " | ".join(line) + " |" for line in [headers, *body]]
    lines.insert(1, "|" + "|".join(["---"] * text_columns + ["---:"] * (len(headers) - text_columns)) + "|")
    return "\n".join(lines)


def format_terminal_table(rows):
    """The table printed to the terminal, within TERMINAL_WIDTH columns: times and speedups (the
    markdown table adds rounds, GFLOP/s, % peak and fill)."""
    ratio = "vs dense" if any(row.packed for row in rows) else None
    headers, groups = ["B,L,I,H,layers,bidir"], [("", 1)]
    for mode in MODES:
        headers += ["nn.RNN", "rnn_ext", "speedup"] + ([ratio] if ratio else [])
        groups.append((f"{MODE_TITLES[mode]}, ms", 4 if ratio else 3))
    body = []
    for row in rows:
        cells = [row.shape.label]
        for mode in MODES:
            cells += [_sig(1e3 * row.reference[mode]), _sig(1e3 * row.ours[mode]), f"{_sig(row.speedup(mode))}x"]
            if ratio:
                cells.append(f"{row.packed_ratio(mode):.2f}" if row.packed else "-")
        body.append(cells)
    notes = ["medians of interleaved rounds; speedup = nn.RNN time / rnn_ext time"]
    if any(row.variable == "lengths" for row in rows):
        notes.append("vs dense = rnn_ext with lengths= / rnn_ext on the same x without them")
    elif ratio:
        notes.append("vs dense = rnn_ext on the PackedSequence / rnn_ext on the same batch padded to L steps")
    return "\n".join([render_table(headers, body, groups), *notes])


def format_markdown_table(rows):
    return render_markdown_table(*_cells(rows))


# -- reports ------------------------------------------------------------------------------------


def cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_info(args, device, peak_gflops):
    """``(name, value)`` pairs describing this run, for the markdown header."""
    machine = f"{cpu_model()}, {os.cpu_count()} cores"
    if device.type == "cuda":
        machine += f"; GPU {torch.cuda.get_device_name(device)}"
    return [
        ("machine", machine),
        ("torch", torch.__version__),
        ("rnn_ext", f"{rnn_ext.__version__} (CPU kernels: {rnn_ext.cpu_isa()})"),
        ("device", str(device)),
        ("dtype", args.dtype + (f", under torch.autocast({device.type!r}, dtype=torch.{args.autocast})"
                                if args.autocast else "")),
        ("layout", "batch-first [B, L, ...]" if args.batch_first else "time-major [L, B, ...]"),
        ("threads", str(torch.get_num_threads())),
        ("rounds", f"up to {args.rounds} per shape, medians; samples of at least {args.min_time * 1e3:g} ms; "
         f"shape budget {args.shape_budget:g} s"),
        ("SGEMM peak", f"{peak_gflops:.1f} GFLOP/s ({PEAK_SIZE}^3 float32 torch.mm, fastest of {PEAK_SAMPLES} "
         f"runs before and {PEAK_SAMPLES} after the shapes)"),
        ("date", datetime.datetime.now().astimezone().isoformat(timespec="seconds")),
        ("command", args.command),
    ]


def write_markdown(rows, path, info):
    lines = ["# rnn_ext.RNN vs torch.nn.RNN", ""]
    lines += [f"- {name}: {value}" for name, value in info]
    lines += [
        "",
        format_markdown_table(rows),
        "",
        "Times are medians in ms per call. fwd runs under torch.no_grad(); fwd+bwd adds "
        "torch.autograd.grad of output and h_n with respect to the input and all parameters. "
        "speedup = nn.RNN time / rnn_ext time. GFLOP/s and % peak are rnn_ext's, counting "
        "2*(I_l*H + H*H)*tokens*D per layer for fwd and 3x that for fwd+bwd.",
    ]
    if any(row.variable == "packed" for row in rows):
        lines.append(
            "Packed rows: lengths uniform in [1, L]; fill = real tokens / (B*L); packed/padded = rnn_ext "
            "time on the PackedSequence / rnn_ext time on the same batch padded to L steps."
        )
    if any(row.variable == "lengths" for row in rows):
        lines.append(
            "Lengths rows: lengths uniform in [1, L]; nn.RNN times are of pack_padded_sequence(enforce_sorted=False) "
            "-> nn.RNN -> pad_packed_sequence(total_length=L), rnn_ext's of rnn_ext.RNN(x, lengths=lengths); "
            "fill = real tokens / (B*L); lengths/dense = rnn_ext with lengths / rnn_ext on the same x without them."
        )
    with open(path, "w") as out:
        out.write("\n".join(lines) + "\n")


def plot_speedups(rows, path, title="rnn_ext.RNN vs torch.nn.RNN"):
    """PNG of the speedup per shape: grouped fwd and fwd+bwd bars around a line at 1x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    width = 0.38
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.8))
    for offset, mode in zip((-width / 2, width / 2), MODES):
        speedups = [row.speedup(mode) for row in rows]
        positions = [index + offset for index in range(len(rows))]
        bars = ax.bar(positions, [s - 1 for s in speedups], width, bottom=1, label=MODE_TITLES[mode])
        ax.bar_label(bars, labels=[f"{s:.2g}x" for s in speedups], fontsize=7, padding=2)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("speedup (nn.RNN time / rnn_ext time)")
    ax.set_xticks(range(len(rows)), [row.shape.label + (f" {row.variable}" if row.packed else "") for row in rows],
                  rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("shape B,L,I,H,layers,bidir")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- driver -------------------------------------------------------------------------------------


def benchmark_shape(shape, args, device, dtype, timer, on_round):
    variable = "packed" if args.packed else "lengths" if args.lengths else None
    reference, ours = build_models(shape, dtype, device, args.seed, args.batch_first)
    dense, varied = make_batches(shape, dtype, device, args.seed, variable, args.batch_first)
    autocast = DTYPES[args.autocast] if args.autocast else None
    for b in (dense, varied):
        if b is not None and autocast is not None:  # both models' outputs are in the autocast dtype
            b.autocast, b.grad_output, b.grad_h_n = autocast, b.grad_output.to(autocast), b.grad_h_n.to(autocast)
    batch = varied if variable else dense
    difference = max_forward_difference(reference, ours, batch)
    if not difference <= TOLERANCE[autocast or dtype]:
        print(f"warning: {shape.label}: rnn_ext and nn.RNN outputs differ by {difference:.3g}", file=sys.stderr)

    fns = {}
    for mode, make in (("fwd", forward_fn), ("fwd_bwd", forward_backward_fn)):
        fns[("reference", mode)] = make(reference, batch)
        fns[("ours", mode)] = make(ours, batch)
        if variable:
            fns[("padded", mode)] = make(ours, dense)
    medians, rounds = time_interleaved(fns, timer, args.rounds, args.min_time, args.shape_budget, on_round)
    results = {kind: {mode: medians[kind, mode] for mode in MODES} for kind in ("reference", "ours")}
    padded = {mode: medians["padded", mode] for mode in MODES} if variable else None
    return Row(shape, rounds, batch.tokens, results["reference"], results["ours"], padded, variable=variable)


class LineProgress:
    """A stand-in for tqdm when it is not installed: one line per shape on stderr."""

    def __init__(self, total):
        self.total, self.done = total, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    def update(self, count=1):
        self.done += count

    def set_postfix_str(self, text):
        print(f"[{self.done}/{self.total} rounds] {text}", file=sys.stderr, flush=True)


def progress_bar(total):
    """A progress bar of ``total`` rounds on stderr: tqdm's (pip install tqdm, or the [bench]
    extra), else a line per shape."""
    try:
        from tqdm import tqdm
    except ImportError:
        return LineProgress(total)
    return tqdm(total=total, unit="round", file=sys.stderr, dynamic_ncols=True)


def run_benchmark(args, shapes, device):
    dtype = DTYPES[args.dtype]
    timer = make_timer(device)
    peak_seconds = sgemm_seconds(device, timer)  # more runs after the shapes, under the load then
    rows = []
    with progress_bar(len(shapes) * args.rounds) as bar:
        for shape in shapes:
            bar.set_postfix_str(shape.label)
            row = benchmark_shape(shape, args, device, dtype, timer, lambda: bar.update(1))
            bar.update(args.rounds - row.rounds)  # rounds the shape budget skipped
            rows.append(row)
            gc.collect()
    peak_gflops = sgemm_gflops(peak_seconds + sgemm_seconds(device, timer))
    for row in rows:
        row.peak_gflops = peak_gflops
    return rows, peak_gflops


def build_parser():
    parser = argparse.ArgumentParser(
        prog="rnn-ext-benchmark",
        description="Time rnn_ext.RNN against torch.nn.RNN (same weights, interleaved rounds, medians).",
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        metavar="SHAPE",
        help=f"named sets ({', '.join(SHAPE_SETS)}) and/or shapes {SHAPE_SYNTAX}, e.g. 1,100,32,32 8,1000,256,256,2 "
        "(default: the 'default' set, or the 'packed' / 'lengths' set with --packed / --lengths)",
    )
    variable = parser.add_mutually_exclusive_group()
    variable.add_argument("--packed", action="store_true",
                          help="variable-length batches as PackedSequence; also times rnn_ext on the padded batch")
    variable.add_argument("--lengths", action="store_true",
                          help="variable-length padded batches: rnn_ext with lengths= against nn.RNN's "
                          "pack -> RNN -> pad pipeline; also times rnn_ext without lengths")
    variable.add_argument("--cell", action="store_true",
                          help="time Python loops of rnn_ext.RNNCell against torch.nn.RNNCell instead "
                          "(shapes B,I,H[,T]; default: the 'cell' set); see rnn_ext/cell_benchmark.py")
    parser.add_argument("--batch-first", action="store_true", help="batches laid out [B, L, ...]")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="(default: %(default)s)")
    parser.add_argument("--autocast", nargs="?", const="bfloat16", choices=["bfloat16", "float16"],
                        help="run both models (in --dtype float32) under torch.autocast in this dtype "
                        "(default: bfloat16)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="(default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds per shape (default: %(default)s)")
    parser.add_argument("--min-time", type=float, default=0.02,
                        help="least seconds per timed sample (default: %(default)s)")
    parser.add_argument("--shape-budget", type=float, default=20.0,
                        help="seconds of warm-up and timing per shape, past which rounds are cut (to no fewer than "
                        f"{MIN_ROUNDS}); "
                        "0: never cut (default: %(default)s)")
    parser.add_argument("--threads", metavar="P[,P...]",
                        help="torch.set_num_threads; several counts (e.g. 1,2,4,8,16) time each shape at each, "
                        "with parallel efficiencies (see rnn_ext/thread_benchmark.py) (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0, help="weights, inputs and lengths (default: %(default)s)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table as markdown")
    parser.add_argument("--plot", metavar="FILE", help="also draw the speedups as a PNG")
    return parser


def main(argv=None):
    from . import cell_benchmark, thread_benchmark

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command = shlex.join(["rnn-ext-benchmark", *argv])
    try:
        if args.cell:
            shapes = cell_benchmark.parse_cell_shapes(args.shapes or ["cell"])
        else:
            shapes = parse_shapes(args.shapes or ["packed" if args.packed else "lengths" if args.lengths else "default"])
    except ValueError as error:
        parser.error(f"--shapes: {error}")
    if args.cell and (args.batch_first or args.plot or args.autocast):
        parser.error("--cell takes no --batch-first, --plot or --autocast")
    if args.autocast and args.dtype != "float32":
        parser.error("--autocast runs float32 models: leave --dtype at float32")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib: pip install matplotlib (or the package's [bench] extra)")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    thread_counts = None
    if args.threads is not None:
        try:
            thread_counts = thread_benchmark.parse_threads(args.threads)
        except ValueError:
            parser.error(f"--threads takes positive integers separated by commas, got {args.threads!r}")
        if len(thread_counts) == 1:
            torch.set_num_threads(thread_counts[0])
            thread_counts = None
        elif args.cell or args.packed or args.lengths or args.autocast or args.plot:
            parser.error("several --threads take no --cell, --packed, --lengths, --autocast or --plot")
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA GPU is visible")
        if not rnn_ext.cuda_kernels_built():
            parser.error("--device cuda: this build of rnn_ext has no CUDA kernels (rebuild with FORCE_CUDA=1)")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    if args.cell:
        return cell_benchmark.run_cell_benchmark(args, shapes, device)
    if thread_counts is not None:
        return thread_benchmark.run_thread_benchmark(args, shapes, thread_counts, device)
    rows, peak_gflops = run_benchmark(args, shapes, device)
    under = f" under autocast({args.autocast})" if args.autocast else ""
    print(f"SGEMM peak {peak_gflops:.1f} GFLOP/s; {args.dtype}{under} on {device}, {torch.get_num_threads()} threads")
    print(format_terminal_table(rows))
    if args.markdown:
        write_markdown(rows, args.markdown, run_info(args, device, peak_gflops))
    if args.plot:
        plot_speedups(rows, args.plot)
    return rows


def console_main():
    """The ``rnn-ext-benchmark`` command pip installs (main's rows are not an exit status)."""
    main()


if __name__ == "__main__":
    main()
