"""The command line of ``rnn-ext-benchmark`` (``python -m rnn_ext.benchmark``): parses and checks
the arguments, then runs one mode (``layer``, ``packed``, ``cell`` or ``threads``), which prints its
table and writes the files asked for. See ``benchmarks/README.md`` for what each mode measures."""
import argparse
import importlib.util
import shlex
import sys

import torch

import rnn_ext

from . import cell, layer, packed, threads, timing
from .inputs import DTYPES
from .shapes import SHAPE_SETS, SHAPE_SYNTAX, parse_shapes


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
                          "(shapes B,I,H[,T]; default: the 'cell' set); see rnn_ext/bench/cell.py")
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
                        f"{timing.MIN_ROUNDS}); "
                        "0: never cut (default: %(default)s)")
    parser.add_argument("--threads", metavar="P[,P...]",
                        help="torch.set_num_threads; several counts (e.g. 1,2,4,8,16) time each shape at each, "
                        "with parallel efficiencies (see rnn_ext/bench/threads.py) (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0, help="weights, inputs and lengths (default: %(default)s)")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table as markdown")
    parser.add_argument("--plot", metavar="FILE", help="also draw the speedups as a PNG")
    return parser


def main(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command = shlex.join(["rnn-ext-benchmark", *argv])
    try:
        if args.cell:
            shapes = cell.parse_cell_shapes(args.shapes or ["cell"])
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
            thread_counts = threads.parse_threads(args.threads)
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
        return cell.run(args, shapes, device)
    if thread_counts is not None:
        return threads.run(args, shapes, device, thread_counts)
    if args.packed or args.lengths:
        return packed.run(args, shapes, device, "packed" if args.packed else "lengths")
    return layer.run(args, shapes, device)


def console_main():
    """The ``rnn-ext-benchmark`` command pip installs (main's rows are not an exit status)."""
    main()
