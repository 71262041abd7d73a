"""The compiled ops themselves: gradcheck, opcheck, torch.compile and torch.export."""
import pytest
import torch

import rnn_ext
from reference import allow_rnn, randn
from rnn_ext import ops


def layer_sample(*, batch_sizes=None, directions=1, bias=True, relu=False, input_size=3, hidden=4, seq_len=4,
                 batch=3, dtype=torch.float64, requires_grad=False, seed=0, device="cpu"):
    """Arguments of rnn_layer: (input [N, I], hx [D, B, H], weights, batch_sizes, relu), drawn on the
    CPU and moved to device (batch_sizes stays on the CPU)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.rand(*shape, generator=g, dtype=dtype) - 0.5).to(device).requires_grad_(requires_grad)

    if batch_sizes is not None:
        batch_sizes = torch.tensor(batch_sizes, dtype=torch.int64)
        rows, batch = int(batch_sizes.sum()), int(batch_sizes[0])
    else:
        rows = seq_len * batch
    weights = []
    for _ in range(directions):
        weights += [rand(hidden, input_size), rand(hidden, hidden)]
        if bias:
            weights += [rand(hidden), rand(hidden)]
    return rand(rows, input_size), rand(directions, batch, hidden), weights, batch_sizes, relu


# Every combination of dense/packed, one/two directions, bias or not and tanh/relu, then the
# edge cases: one step, no step.
PACKED = {"batch_sizes": [3, 3, 2, 1]}
PACKED_BIDIR = {"batch_sizes": [3, 2, 2, 1, 1], "directions": 2}
COMBINATIONS = {
    "dense": {},
    "dense-relu": {"relu": True},
    "dense-nobias": {"bias": False},
    "dense-nobias-relu": {"bias": False, "relu": True},
    "dense-bidir": {"directions": 2},
    "dense-bidir-relu": {"directions": 2, "relu": True},
    "dense-bidir-nobias": {"directions": 2, "bias": False},
    "dense-bidir-nobias-relu": {"directions": 2, "bias": False, "relu": True},
    "packed": PACKED,
    "packed-relu": PACKED | {"relu": True},
    "packed-nobias": PACKED | {"bias": False},
    "packed-nobias-relu": PACKED | {"bias": False, "relu": True},
    "packed-bidir": PACKED_BIDIR,
    "packed-bidir-relu": PACKED_BIDIR | {"relu": True},
    "packed-bidir-nobias": PACKED_BIDIR | {"bias": False},
    "packed-bidir-nobias-relu": {"batch_sizes": [2, 2, 1], "directions": 2, "relu": True, "bias": False},
}
SAMPLES = COMBINATIONS | {
    "dense-one-step-bidir": {"seq_len": 1, "directions": 2},
    "dense-no-steps": {"seq_len": 0},
    "dense-no-steps-bidir": {"seq_len": 0, "directions": 2},
}


@pytest.mark.parametrize("name", SAMPLES)
def test_gradcheck_op(name, device):
    input, hx, weights, batch_sizes, relu = layer_sample(requires_grad=True, device=device, **SAMPLES[name])

    def run(input, hx, *weights):
        return ops.run_layer(input, hx, weights, batch_sizes, relu)

    assert torch.autograd.gradcheck(run, (input, hx, *weights))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("name", SAMPLES)
def test_opcheck_forward(name, requires_grad, device):
    args = ops.layer_args(*layer_sample(requires_grad=requires_grad, device=device, **SAMPLES[name]))
    torch.library.opcheck(torch.ops.rnn_ext.rnn_layer.default, args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["dense-bidir", "packed-bidir-relu"])
def test_opcheck_low_precision(name, dtype, device):
    """The bfloat16 kernels (and float16's float32 route) under opcheck, forward and backward."""
    sample = layer_sample(requires_grad=True, dtype=dtype, device=device, **SAMPLES[name])
    torch.library.opcheck(torch.ops.rnn_ext.rnn_layer.default, ops.layer_args(*sample))
    input, hx, weights, batch_sizes, relu = layer_sample(dtype=dtype, device=device, **SAMPLES[name])
    output, h_n = ops.run_layer(input, hx, weights, batch_sizes, relu)
    args = (random_like(output), random_like(h_n), input, hx, weights, batch_sizes, relu, output, [True, True, True])
    torch.library.opcheck(torch.ops.rnn_ext.rnn_layer_backward.default, args)


def random_like(t):
    """Random numbers of t's shape, dtype and device, drawn on the CPU."""
    return randn(*t.shape, dtype=t.dtype, device=t.device)


@pytest.mark.parametrize(
    "mask", [(True, True, True), (False, True, True), (True, False, False), (False, True, False), (True, False, True)]
)
@pytest.mark.parametrize("name", COMBINATIONS)
def test_opcheck_backward(name, mask, device):
    input, hx, weights, batch_sizes, relu = layer_sample(device=device, **SAMPLES[name])
    output, h_n = ops.run_layer(input, hx, weights, batch_sizes, relu)
    args = (random_like(output), random_like(h_n), input, hx, weights, batch_sizes, relu, output, list(mask))
    torch.library.opcheck(torch.ops.rnn_ext.rnn_layer_backward.default, args)


def test_backward_mask_skips_work_but_keeps_values(device):
    input, hx, weights, batch_sizes, relu = layer_sample(directions=2, device=device)
    output, h_n = ops.run_layer(input, hx, weights, batch_sizes, relu)
    grads = (random_like(output), random_like(h_n))
    full = ops.rnn_layer_backward(*grads, input, hx, weights, batch_sizes, relu, output, [True, True, True])
    only_hx = ops.rnn_layer_backward(*grads, input, hx, weights, batch_sizes, relu, output, [False, True, False])
    assert only_hx[0].numel() == 0 and len(only_hx[2]) == 0
    torch.testing.assert_close(only_hx[1], full[1])


@pytest.mark.parametrize("directions", [1, 2])
def test_no_step_forward_returns_contiguous_h_n(directions, device):
    """No input rows: h_n is hx, in memory of its own and contiguous even when hx is a strided view."""
    input, _, weights, _, relu = layer_sample(seq_len=0, directions=directions, device=device)
    hx = randn(directions, 4, 3, device=device).transpose(1, 2)  # [D, B, H], transposed strides
    assert not hx.is_contiguous()
    output, h_n = ops.run_layer(input, hx, weights, None, relu)
    assert output.shape == (0, directions * 4)
    assert h_n.is_contiguous() and h_n.data_ptr() != hx.data_ptr()
    torch.testing.assert_close(h_n, hx, rtol=0, atol=0)


def make_model_and_input(batch_first=True, bidirectional=True, device="cpu"):
    """A float32 2-layer model on device, batch_first input [2, 6, 3] and hx, drawn on the CPU."""
    torch.manual_seed(0)
    model = rnn_ext.RNN(3, 5, num_layers=2, bidirectional=bidirectional, batch_first=batch_first).to(device)
    x = randn(2, 6, 3, dtype=torch.float32, device=device, requires_grad=True)
    hx = randn(2 * (2 if bidirectional else 1), 2, 5, dtype=torch.float32, device=device, requires_grad=True)
    return model, x, hx


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidir", "unidir"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@allow_rnn()
def test_torch_compile_fullgraph_matches_eager(backend, bidirectional, device):
    model, x, hx = make_model_and_input(bidirectional=bidirectional, device=device)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out, h_n = compiled(x, hx)
    ref_out, ref_h_n = model(x, hx)
    torch.testing.assert_close((out, h_n), (ref_out, ref_h_n))
    wrt = [x, hx, *model.parameters()]
    grads = torch.autograd.grad(out.square().sum() + h_n.sum(), wrt)
    ref_grads = torch.autograd.grad(ref_out.square().sum() + ref_h_n.sum(), wrt)
    torch.testing.assert_close(grads, ref_grads)


@pytest.mark.parametrize("module", [torch.nn.RNN, rnn_ext.RNN], ids=["nn.RNN", "rnn_ext.RNN"])
def test_dynamo_treats_rnn_ext_rnn_as_nn_rnn(module):
    """dynamo refuses every nn.RNN by default (fullgraph=True raises; without it the graph breaks
    there and the module runs eagerly); torch._dynamo.config.allow_rnn lets it trace rnn_ext's.
    (The message differs by torch release: "Attempted to wrap RNN" on 2.14, a delayed graph break
    on the module's first attribute on 2.15.)"""
    torch.manual_seed(0)
    model = module(3, 5)
    x = torch.randn(4, 2, 3, requires_grad=True)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(model, fullgraph=True, backend="eager")(x)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: model(x)[0].tanh() * 2, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x)[0].tanh() * 2)


def test_torch_export(device):
    model, x, hx = make_model_and_input(device=device)
    exported = torch.export.export(model, (x.detach(), hx.detach()))
    out, h_n = exported.module()(x.detach(), hx.detach())
    torch.testing.assert_close((out, h_n), model(x, hx))
    assert any("rnn_ext.rnn_layer" in str(node.target) for node in exported.graph.nodes)


def test_op_rejects_bad_arguments(device):
    input, hx, weights, batch_sizes, relu = layer_sample(device=device)
    with pytest.raises(RuntimeError, match="input must be 2-D"):
        ops.run_layer(input[None], hx, weights, batch_sizes, relu)
    with pytest.raises(RuntimeError, match="hx must have the input's dtype"):
        ops.run_layer(input, hx.float(), weights, batch_sizes, relu)
    with pytest.raises(RuntimeError, match="w_hh must have shape"):
        ops.run_layer(input, hx, [weights[0], weights[1][:, :2], *weights[2:]], batch_sizes, relu)
    with pytest.raises(RuntimeError, match="2 \\(no bias\\) or 4 tensors per direction"):
        ops.run_layer(input, hx, weights[:3], batch_sizes, relu)
    with pytest.raises(RuntimeError, match="2 \\(no bias\\) or 4 tensors per direction"):
        ops.run_layer(input, hx.expand(3, -1, -1), weights, batch_sizes, relu)
    op = torch.ops.rnn_ext.rnn_layer.default
    with pytest.raises(RuntimeError, match="b_ih and b_hh must be given together"):
        op(input, hx, weights[0], weights[1], weights[2], None, None, None, None, None, batch_sizes, relu)
    with pytest.raises(RuntimeError, match="w_ih must have shape"):  # a one-direction layer called as two
        op(input, hx.expand(2, -1, -1), *weights, None, None, None, None, batch_sizes, relu)
    with pytest.raises(RuntimeError, match="floating point"):
        ops.run_layer(input.long(), hx.long(), [w.long() for w in weights], batch_sizes, relu)
    with pytest.raises(RuntimeError, match="multiple of the batch size"):
        ops.run_layer(input[:-1], hx, weights, batch_sizes, relu)
