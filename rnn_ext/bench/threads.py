"""The threads mode, ``rnn-ext-benchmark --threads 1,2,4,8,16``: how rnn_ext.RNN and torch.nn.RNN
scale with torch's threads (``torch.set_num_threads``), shape by shape.

For each shape and each thread count P (one thread is always measured: it is the base of the
efficiencies) both models are timed as the layer benchmark times them (same weights, same inputs,
interleaved rounds, medians; fwd and fwd+bwd). The table gives, per P, each one's time, the speedup
(nn.RNN time / rnn_ext time) and each one's parallel efficiency, time at 1 thread / (P x time at P):
1 is perfect scaling. It also gives the split rnn_ext's walks take at P (``rnn_ext.threads``): row
groups x column slices per direction. Thread counts above the machine's cores are oversubscribed.
"""
import gc
from dataclasses import dataclass

import torch

from rnn_ext.threads import walk_split

from . import inputs, layer, report, timing
from .inputs import MODES
from .report import MODE_TITLES, sig


@dataclass
class ThreadRow:
    """One shape at one thread count: medians (seconds per call) per mode, and the 1-thread ones."""

    shape: object  # shapes.Shape
    threads: int
    rounds: int
    split: str
    reference: dict
    ours: dict
    reference_one: dict
    ours_one: dict

    def speedup(self, mode):
        return self.reference[mode] / self.ours[mode]

    def efficiency(self, kind, mode):
        times, base = (self.ours, self.ours_one) if kind == "ours" else (self.reference, self.reference_one)
        return base[mode] / (self.threads * times[mode])


def parse_threads(text):
    """"1,2,4,8,16" -> [1, 2, 4, 8, 16] (ValueError when not positive integers)."""
    counts = [int(token) for token in text.split(",") if token.strip()]
    if not counts or min(counts) < 1:
        raise ValueError(f"thread counts must be positive integers, got {text!r}")
    return counts


def split_label(shape, dtype, threads):
    """rnn_ext's split of the first layer's walk at this thread count: 'rows x cols' per direction."""
    splits = walk_split(shape.batch, shape.seq_len, shape.hidden_size, dtype, shape.bidirectional, threads)
    return " + ".join(f"{rows}x{cols}" for rows, cols in splits)


def time_at(threads, shape, args, device, dtype, timer, on_round):
    """``({kind: {mode: median seconds}}, rounds)`` of both models on one shape with this many threads."""
    torch.set_num_threads(threads)
    reference, ours = inputs.build_models(shape, dtype, device, args.seed, args.batch_first)
    batch, _ = inputs.make_batches(shape, dtype, device, args.seed, None, args.batch_first)
    return layer.time_runs({"reference": (reference, batch), "ours": (ours, batch)}, args, timer, on_round)


def benchmark_threads(shape, counts, args, device, dtype, timer, on_round):
    """The rows of one shape, one per thread count."""
    at_one = time_at(1, shape, args, device, dtype, timer, on_round)
    rows = []
    for threads in counts:
        times, rounds = at_one if threads == 1 else time_at(threads, shape, args, device, dtype, timer, on_round)
        rows.append(ThreadRow(shape, threads, rounds, split_label(shape, dtype, threads), times["reference"],
                              times["ours"], at_one[0]["reference"], at_one[0]["ours"]))
    return rows


def table(rows):
    """(headers, body) of the full table."""
    headers = ["shape B,L,I,H,layers,bidir", "threads", "rnn_ext split"]
    for mode in MODES:
        title = MODE_TITLES[mode]
        headers += [f"{title} nn.RNN ms", f"{title} rnn_ext ms", f"{title} speedup", f"{title} nn.RNN eff",
                    f"{title} rnn_ext eff"]
    body = []
    for row in rows:
        line = [row.shape.label, str(row.threads), row.split]
        for mode in MODES:
            line += [sig(1e3 * row.reference[mode]), sig(1e3 * row.ours[mode]), f"{sig(row.speedup(mode))}x",
                     f"{row.efficiency('reference', mode):.2f}", f"{row.efficiency('ours', mode):.2f}"]
        body.append(line)
    return headers, body


def format_terminal_table(rows):
    """Speedups and efficiencies (times are in the markdown), within the terminal's width."""
    headers, groups = ["B,L,I,H,layers,bidir", "P", "split"], [("", 3)]
    body = [[row.shape.label, str(row.threads), row.split] for row in rows]
    for mode in MODES:
        headers += ["speedup", "eff nn", "eff ours"]
        groups.append((MODE_TITLES[mode], 3))
        for line, row in zip(body, rows):
            line += [f"{sig(row.speedup(mode))}x", f"{row.efficiency('reference', mode):.2f}",
                     f"{row.efficiency('ours', mode):.2f}"]
    return report.render_table(headers, body, groups)


def write_markdown(rows, path, args, device):
    lines = [
        "# rnn_ext.RNN vs torch.nn.RNN across thread counts",
        "",
        f"- machine: {report.machine()}",
        f"- torch: {torch.__version__}",
        f"- rnn_ext: {report.rnn_ext_build(', L2 as the OS reports it')}",
        f"- device: {device}; dtype: {args.dtype}",
        f"- rounds: up to {args.rounds} per shape and thread count, medians; samples of at least "
        f"{args.min_time * 1e3:g} ms; shape budget {args.shape_budget:g} s",
        f"- date: {report.now()}",
        f"- command: {args.command}",
        "",
        report.render_markdown_table(*table(rows), text_columns=3),
        "",
        "Times are medians in ms per call (fwd under torch.no_grad(); fwd+bwd adds torch.autograd.grad with "
        "respect to the input and every parameter). speedup = nn.RNN time / rnn_ext time. eff = parallel "
        "efficiency, time at 1 thread / (threads x time at that count). rnn_ext split: row groups x column "
        "slices of the first layer's walk, per direction (rnn_ext.threads.walk_split). Thread counts above "
        "the core count are oversubscribed.",
    ]
    report.write_lines(path, lines)


def run(args, shapes, device, counts):
    """The rows of every shape and thread count; prints the table, writes --markdown when given."""
    dtype = inputs.DTYPES[args.dtype]
    timer = timing.make_timer(device)
    threads_before = torch.get_num_threads()
    timed_counts = len([c for c in counts if c != 1]) + 1
    rows = []
    try:
        with report.progress_bar(len(shapes) * timed_counts * args.rounds) as bar:
            for shape in shapes:
                bar.set_postfix_str(shape.label)
                rows += benchmark_threads(shape, counts, args, device, dtype, timer, lambda: bar.update(1))
                gc.collect()
    finally:
        torch.set_num_threads(threads_before)
    print(f"{args.dtype} on {device}; speedup = nn.RNN / rnn_ext, eff = t(1) / (P t(P))")
    print(format_terminal_table(rows))
    if args.markdown:
        write_markdown(rows, args.markdown, args, device)
    return rows
