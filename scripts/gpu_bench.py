"""Times rnn_ext.RNN against torch.nn.RNN (cuDNN) on the GPU: forward and forward+backward.

Medians over --iters runs timed with CUDA events, after --warmup runs; float32 with TF32 off on
both sides. Writes a markdown table (--out) and prints it. `--list` prints the shapes and exits
(needs no GPU).

    python scripts/gpu_bench.py --out benchmarks/results/cuda.md
"""
import argparse
import statistics
import sys
import time

import torch

# name: (seq_len T, batch B, input_size I, hidden_size H, num_layers, bidirectional)
SHAPES = {
    "small": (50, 32, 64, 128, 1, False),
    "medium-2layer": (100, 64, 256, 256, 2, False),
    "medium-bidir": (100, 64, 256, 256, 2, True),
    "large": (200, 128, 512, 512, 1, False),
    "long-thin": (500, 8, 32, 64, 1, False),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), metavar="NAME",
                        help=f"shapes to run (default: all of {', '.join(SHAPES)})")
    parser.add_argument("--nonlinearity", default="tanh", choices=["tanh", "relu"])
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per measurement (default 3)")
    parser.add_argument("--iters", type=int, default=15, help="timed runs per measurement (default 15)")
    parser.add_argument("--out", help="markdown file to write the results table to")
    parser.add_argument("--list", action="store_true", help="print the shapes and exit (no GPU needed)")
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.iters < 1:
        parser.error("--warmup must be >= 0 and --iters >= 1")
    return args


def describe(name):
    T, B, I, H, L, bi = SHAPES[name]
    return f"{name}: T={T} B={B} I={I} H={H} layers={L}{' bidirectional' if bi else ''}"


def median_ms(fn, warmup, iters):
    """Median wall time of fn on the GPU, in ms, from CUDA events around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_shape(name, nonlinearity, warmup, iters):
    import rnn_ext

    T, B, I, H, L, bi = SHAPES[name]
    torch.manual_seed(0)
    ours = rnn_ext.RNN(I, H, L, nonlinearity=nonlinearity, bidirectional=bi).cuda()
    ref = torch.nn.RNN(I, H, L, nonlinearity=nonlinearity, bidirectional=bi).cuda()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(T, B, I, device="cuda")
    grad_out = torch.randn(T, B, (2 if bi else 1) * H, device="cuda")

    # Sanity: both compute the same thing (a loose check; tests/test_cuda.py holds the strict ones).
    with torch.no_grad():
        diff = (ours(x)[0] - ref(x)[0]).abs().max().item()

    row = {"shape": name, "max |diff|": diff}
    for label, model in (("rnn_ext", ours), ("cuDNN", ref)):
        def forward(model=model):
            with torch.no_grad():
                model(x)

        def forward_backward(model=model):  # the gradients of training: weights (and hx), not input
            model.zero_grad(set_to_none=True)
            out, _ = model(x)
            out.backward(grad_out)

        row[f"{label} fwd"] = median_ms(forward, warmup, iters)
        row[f"{label} fwd+bwd"] = median_ms(forward_backward, warmup, iters)
    return row


def markdown(rows, args, device_name):
    lines = [
        f"GPU: {device_name}; torch {torch.__version__}; float32, TF32 off; "
        f"{args.nonlinearity}; median of {args.iters} runs after {args.warmup} warm-up (CUDA events), ms.",
        "",
        "| shape | rnn_ext fwd | cuDNN fwd | ratio | rnn_ext fwd+bwd | cuDNN fwd+bwd | ratio | max abs diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {describe(r['shape'])} | {r['rnn_ext fwd']:.3f} | {r['cuDNN fwd']:.3f} | "
            f"{r['rnn_ext fwd'] / r['cuDNN fwd']:.2f} | {r['rnn_ext fwd+bwd']:.3f} | {r['cuDNN fwd+bwd']:.3f} | "
            f"{r['rnn_ext fwd+bwd'] / r['cuDNN fwd+bwd']:.2f} | {r['max |diff|']:.1e} |"
        )
    lines.append("")
    lines.append("ratio = rnn_ext / cuDNN (below 1: rnn_ext is faster).")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        for name in args.shapes:
            print(describe(name))
        return 0
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA GPU visible", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    for name in args.shapes:
        start = time.perf_counter()
        rows.append(bench_shape(name, args.nonlinearity, args.warmup, args.iters))
        print(f"{describe(name)}: done in {time.perf_counter() - start:.1f}s", flush=True)
    table = markdown(rows, args, torch.cuda.get_device_name())
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
