"""Reports: aligned terminal tables, markdown tables and headers, progress on stderr, and the
speedup plot. Nothing here knows what a mode measured; a mode hands over cells and labels."""
import datetime
import os
import platform
import sys

import torch

import rnn_ext

MODE_TITLES = {"fwd": "fwd", "fwd_bwd": "fwd+bwd"}
TERMINAL_WIDTH = 100  # columns a printed table fits in


def sig(value):
    """About three significant digits, without an exponent for values from 0.001 up."""
    for digits, bound in ((0, 100), (1, 10), (2, 1)):
        if abs(value) >= bound:
            return f"{value:.{digits}f}"
    return f"{value:.3f}" if abs(value) >= 0.01 else f"{value:.2g}"


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


def cells(columns, rows):
    """``(headers, body)`` from ``(header, row -> text)`` pairs."""
    return [header for header, _ in columns], [[cell(row) for _, cell in columns] for row in rows]


def cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device=None):
    """The CPU and its cores, and the GPU when ``device`` is one."""
    text = f"{cpu_model()}, {os.cpu_count()} cores"
    if device is not None and device.type == "cuda":
        text += f"; GPU {torch.cuda.get_device_name(device)}"
    return text


def rnn_ext_build(detail=""):
    """rnn_ext's version and CPU kernels, for a report's header."""
    return f"{rnn_ext.__version__} (CPU kernels: {rnn_ext.cpu_isa()}{detail})"


def now():
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def write_lines(path, lines):
    with open(path, "w") as out:
        out.write("\n".join(lines) + "\n")


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


def plot_speedups(labels, speedups, path, title="rnn_ext.RNN vs torch.nn.RNN", xlabel="shape B,L,I,H,layers,bidir"):
    """PNG of the speedup per label: grouped bars, one per mode (``speedups``: mode -> a speedup per
    label), around a line at 1x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    width = 0.76 / len(speedups)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 4.8))
    for index, (mode, values) in enumerate(speedups.items()):
        offset = (index - (len(speedups) - 1) / 2) * width
        positions = [position + offset for position in range(len(labels))]
        bars = ax.bar(positions, [s - 1 for s in values], width, bottom=1, label=MODE_TITLES[mode])
        ax.bar_label(bars, labels=[f"{s:.2g}x" for s in values], fontsize=7, padding=2)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("speedup (nn.RNN time / rnn_ext time)")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
