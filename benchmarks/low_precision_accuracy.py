"""Error of rnn_ext and nn.RNN in bfloat16 / float16 (and under CPU autocast) against float64.

Both modules hold the same weights; the float64 reference is nn.RNN run on the same weights and
input rounded to the low-precision dtype, so the error measured is the computation's alone. Error
is relative, in the Frobenius norm: ||result - float64|| / ||float64||, for the output, and for the
gradients (input and every parameter, against fixed random output gradients; the table gives the
largest over those tensors). A ratio below 1: rnn_ext is the more accurate.

    python benchmarks/low_precision_accuracy.py [--shapes B,L,I,H[,layers[,bidir]] ...] [--markdown FILE]
"""
import argparse
import copy

import torch

import rnn_ext
from rnn_ext.bench.shapes import parse_shapes

ISSUE_SHAPES = ["1,100,32,32", "8,100,64,64", "32,200,128,128", "64,100,256,256,2", "128,50,1024,1024"]
MODES = {  # name: (module dtype, autocast dtype or None)
    "bfloat16": (torch.bfloat16, None),
    "autocast(bfloat16)": (torch.float32, torch.bfloat16),
    "float16": (torch.float16, None),
}


def relative_error(value, exact):
    return ((value.double() - exact).norm() / exact.norm().clamp_min(1e-300)).item()


def run(module, x, grad_output, grad_h_n, autocast):
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        output, h_n = module(x)
    wrt = [x, *module.parameters()]
    grads = torch.autograd.grad((output * grad_output.to(output.dtype)).sum() + (h_n * grad_h_n.to(h_n.dtype)).sum(), wrt)
    return output, grads


def errors(shape, mode, seed=0):
    """(output error, largest gradient error) of rnn_ext and of nn.RNN."""
    dtype, autocast = MODES[mode]
    low = autocast or dtype  # the precision the computation runs in
    torch.manual_seed(seed)
    kwargs = dict(num_layers=shape.num_layers, bidirectional=shape.bidirectional)
    theirs = torch.nn.RNN(shape.input_size, shape.hidden_size, **kwargs).to(dtype)
    ours = rnn_ext.RNN(shape.input_size, shape.hidden_size, **kwargs).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    exact = copy.deepcopy(theirs).to(low).double()
    x = torch.randn(shape.seq_len, shape.batch, shape.input_size).to(low)
    grad_output = torch.randn(shape.seq_len, shape.batch, shape.directions * shape.hidden_size).to(low)
    grad_h_n = torch.randn(shape.num_layers * shape.directions, shape.batch, shape.hidden_size).to(low)
    exact_output, exact_grads = run(exact, x.double().requires_grad_(), grad_output.double(), grad_h_n.double(), None)
    result = {}
    for name, module in (("rnn_ext", ours), ("nn.RNN", theirs)):
        output, grads = run(module, x.to(dtype).requires_grad_(), grad_output, grad_h_n, autocast)
        result[name] = (relative_error(output, exact_output),
                        max(relative_error(g, e) for g, e in zip(grads, exact_grads)))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=ISSUE_SHAPES, metavar="SHAPE")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    args = parser.parse_args(argv)
    lines = [
        f"rnn_ext {rnn_ext.__version__} (CPU kernels: {rnn_ext.cpu_isa()}), torch {torch.__version__}",
        "",
        "| B,L,I,H,layers,bidir | mode | output: rnn_ext | output: nn.RNN | ratio | grads (max): rnn_ext "
        "| grads (max): nn.RNN | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for shape in parse_shapes(args.shapes):
        for mode in MODES:
            e = errors(shape, mode)
            (out_ours, grad_ours), (out_theirs, grad_theirs) = e["rnn_ext"], e["nn.RNN"]
            line = (f"| {shape.label} | {mode} | {out_ours:.3g} | {out_theirs:.3g} | {out_ours / out_theirs:.2f} "
                    f"| {grad_ours:.3g} | {grad_theirs:.3g} | {grad_ours / grad_theirs:.2f} |")
            print(line, flush=True)
            lines.append(line)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
