"""Plain-autograd speed of two or more builds of rnn_ext, side by side: a regression check.

    python benchmarks/ab_builds.py before=/path/to/old/checkout after=. [--rounds 8] [--markdown FILE]
        [--threads 2] [--shapes small|large|all] [--inference]

Each NAME=PATH is a directory holding a built ``rnn_ext`` package (a checkout built in place, or
a copy of one). Every round runs one fresh process per build, in rotating order, with --threads
threads (default 1); a process times forward+backward of the shapes (small: where fixed per-call
costs show most; large: where the kernels and the threads do) and reports, per shape, the best of
15 samples of at least 50 ms (large shapes: 5 samples). The table gives each build's median over
rounds, and its ratio to the first build. --inference times the forward alone, under torch.no_grad().
"""
import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

# B, L, I, H, layers, bidirectional, kind ("dense", "packed", "lengths", or "cell": one RNNCell step)
SMALL_SHAPES = [
    (1, 100, 32, 32, 1, False, "dense"),
    (8, 100, 64, 64, 1, False, "dense"),
    (1, 10, 8, 8, 1, False, "dense"),
    (4, 50, 16, 16, 2, True, "dense"),
    (16, 50, 32, 32, 1, False, "packed"),
    (16, 50, 32, 32, 1, False, "lengths"),
    (1, 1, 32, 32, 1, False, "cell"),
    (8, 1, 64, 64, 1, False, "cell"),
]
LARGE_SHAPES = [
    (1, 1000, 64, 256, 1, False, "dense"),
    (32, 200, 128, 128, 1, False, "dense"),
    (16, 50, 128, 128, 2, True, "dense"),
    (64, 100, 256, 256, 2, False, "dense"),
    (128, 50, 1024, 1024, 1, False, "dense"),
    (4, 100, 512, 512, 1, False, "dense"),
    (64, 200, 128, 128, 1, False, "lengths"),
]
SHAPE_SETS = {"small": SMALL_SHAPES, "large": LARGE_SHAPES, "all": SMALL_SHAPES + LARGE_SHAPES}


def label(shape):
    return ",".join(map(str, shape))


def training_step(shape, inference=False):
    """A closure running forward and backward once on the given shape (inference: the forward alone,
    under torch.no_grad())."""
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence

    import rnn_ext

    batch, steps, input_size, hidden, layers, bidirectional, kind = shape
    torch.manual_seed(0)
    if kind == "cell":
        cell = rnn_ext.RNNCell(input_size, hidden)
        x, h = torch.randn(batch, input_size, requires_grad=True), torch.randn(batch, hidden)
        if inference:
            return torch.no_grad()(lambda: cell(x, h))
        return lambda: cell(x, h).sum().backward()
    rnn = rnn_ext.RNN(input_size, hidden, layers, bidirectional=bidirectional)
    x = torch.randn(steps, batch, input_size, requires_grad=True)
    lengths = torch.randint(1, steps + 1, (batch,))
    lengths[0] = steps

    def forward():
        if kind == "packed":
            return rnn(pack_padded_sequence(x, lengths, enforce_sorted=False))
        return rnn(x, lengths=lengths) if kind == "lengths" else rnn(x)

    def step():
        if kind == "packed":
            output = rnn(pack_padded_sequence(x, lengths, enforce_sorted=False))[0].data
        elif kind == "lengths":
            output = rnn(x, lengths=lengths)[0]
        else:
            output = rnn(x)[0]
        output.sum().backward()

    return torch.no_grad()(forward) if inference else step


def best_time(step, samples=15, min_time=0.05):
    for _ in range(3 if samples < 15 else 20):
        step()
    best = float("inf")
    gc.disable()
    try:
        for _ in range(samples):
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < min_time:
                step()
                calls += 1
            best = min(best, (time.perf_counter() - start) / calls)
    finally:
        gc.enable()
    return best


def worker():
    import torch

    import rnn_ext

    # rnn_ext loads another copy in place of a tree without a built extension: refuse that here.
    expected = os.path.realpath(os.environ["PYTHONPATH"].split(os.pathsep)[0])
    if not os.path.realpath(rnn_ext.__file__).startswith(expected + os.sep):
        sys.exit(f"{expected} holds no built rnn_ext: {rnn_ext.__file__} was loaded instead")
    torch.set_num_threads(int(os.environ["AB_THREADS"]))
    shapes = SHAPE_SETS[os.environ["AB_SHAPES"]]
    inference = os.environ["AB_INFERENCE"] == "1"
    print(json.dumps({label(shape): best_time(training_step(shape, inference),
                                              samples=15 if shape in SMALL_SHAPES else 5) * 1e6
                      for shape in shapes}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("builds", nargs="+", metavar="NAME=PATH", help="at least two; the first is the baseline")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--markdown", metavar="FILE")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in each process (default: 1)")
    parser.add_argument("--shapes", choices=list(SHAPE_SETS), default="small")
    parser.add_argument("--inference", action="store_true", help="time the forward alone, under torch.no_grad()")
    args = parser.parse_args()
    builds = dict(b.split("=", 1) for b in args.builds)
    if len(builds) < 2 or not all(os.path.isdir(os.path.join(p, "rnn_ext")) for p in builds.values()):
        parser.error("give at least two NAME=PATH, each PATH a directory holding a built rnn_ext package")
    names = list(builds)
    times = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(builds[name]), OMP_NUM_THREADS=str(args.threads),
                       AB_THREADS=str(args.threads), AB_SHAPES=args.shapes, AB_INFERENCE=str(int(args.inference)))
            done = subprocess.run([sys.executable, __file__, "--worker"], env=env, capture_output=True, text=True,
                                  check=True)
            times[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    lines = ["| B,L,I,H,layers,bidir,kind | " + " | ".join(f"{n}, µs" for n in names) + " | "
             + " | ".join(f"{n} / {names[0]}" for n in names[1:]) + " |",
             "|---" * (2 * len(names)) + "|"]
    for shape in map(label, SHAPE_SETS[args.shapes]):
        median = {n: statistics.median(t[shape] for t in times[n]) for n in names}
        lines.append(f"| {shape} | " + " | ".join(f"{median[n]:.1f}" for n in names) + " | "
                     + " | ".join(f"{median[n] / median[names[0]]:.3f}" for n in names[1:]) + " |")
    print("\n".join(lines))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    worker() if sys.argv[1:] == ["--worker"] else main()
