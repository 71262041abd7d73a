"""The compiled ops themselves: gradcheck, opcheck, torch.compile and torch.export."""
import pytest
import torch

import rnn_ext
from rnn_ext import ops


def layer_sample(*, batch_sizes=None, directions=1, bias=True, relu=False, input_size=3, hidden=4, seq_len=4,
                 batch=3, dtype=torch.float64, requires_grad=False, seed=0):
    """Arguments of rnn_layer: (input [N, I], hx [D, B, H], weights, batch_sizes, relu)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.rand(*shape, generator=g, dtype=dtype) - 0.5).requires_grad_(requires_grad)

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


SAMPLES = {
    "dense": {},
    "dense-bidir": {"directions": 2},
    "dense-nobias-relu": {"bias": False, "relu": True},
    "dense-one-step-bidir": {"seq_len": 1, "directions": 2},
    "dense-no-steps-bidir": {"seq_len": 0, "directions": 2},
    "packed": {"batch_sizes": [3, 3, 2, 1]},
    "packed-bidir": {"batch_sizes": [3, 2, 2, 1, 1], "directions": 2},
    "packed-bidir-relu-nobias": {"batch_sizes": [2, 2, 1], "directions": 2, "relu": True, "bias": False},
}


@pytest.mark.parametrize("name", SAMPLES)
def test_gradcheck_op(name):
    input, hx, weights, batch_sizes, relu = layer_sample(requires_grad=True, **SAMPLES[name])

    def run(input, hx, *weights):
        return ops.run_layer(input, hx, weights, batch_sizes, relu)

    assert torch.autograd.gradcheck(run, (input, hx, *weights))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("name", SAMPLES)
def test_opcheck_forward(name, requires_grad):
    args = ops.layer_args(*layer_sample(requires_grad=requires_grad, **SAMPLES[name]))
    torch.library.opcheck(torch.ops.rnn_ext.rnn_layer.default, args)


@pytest.mark.parametrize("mask", [(True, True, True), (False, True, True), (True, False, False)])
@pytest.mark.parametrize("name", ["dense-bidir", "packed-bidir"])
def test_opcheck_backward(name, mask):
    input, hx, weights, batch_sizes, relu = layer_sample(**SAMPLES[name])
    output, h_n = ops.run_layer(input, hx, weights, batch_sizes, relu)
    args = (torch.randn_like(output), torch.randn_like(h_n), input, hx, weights, batch_sizes, relu, output, list(mask))
    torch.library.opcheck(torch.ops.rnn_ext.rnn_layer_backward.default, args)


def test_backward_mask_skips_work_but_keeps_values():
    input, hx, weights, batch_sizes, relu = layer_sample(directions=2)
    output, h_n = ops.run_layer(input, hx, weights, batch_sizes, relu)
    grads = (torch.randn_like(output), torch.randn_like(h_n))
    full = ops.rnn_layer_backward(*grads, input, hx, weights, batch_sizes, relu, output, [True, True, True])
    only_hx = ops.rnn_layer_backward(*grads, input, hx, weights, batch_sizes, relu, output, [False, True, False])
    assert only_hx[0].numel() == 0 and len(only_hx[2]) == 0
    torch.testing.assert_close(only_hx[1], full[1])


def make_model_and_input(batch_first=True):
    torch.manual_seed(0)
    model = rnn_ext.RNN(3, 5, num_layers=2, bidirectional=True, batch_first=batch_first)
    x = torch.randn(2, 6, 3, requires_grad=True)
    hx = torch.randn(4, 2, 5, requires_grad=True)
    return model, x, hx


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(backend):
    model, x, hx = make_model_and_input()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out, h_n = compiled(x, hx)
    ref_out, ref_h_n = model(x, hx)
    torch.testing.assert_close((out, h_n), (ref_out, ref_h_n))
    wrt = [x, hx, *model.parameters()]
    grads = torch.autograd.grad(out.square().sum() + h_n.sum(), wrt)
    ref_grads = torch.autograd.grad(ref_out.square().sum() + ref_h_n.sum(), wrt)
    torch.testing.assert_close(grads, ref_grads)


def test_nn_rnn_cannot_compile_fullgraph_but_we_can():
    """The reason fullgraph matters: dynamo refuses nn.RNN (checked, so this stays true)."""
    model = torch.nn.RNN(3, 5)
    x = torch.randn(4, 2, 3)
    torch._dynamo.reset()
    with pytest.raises(Exception):
        torch.compile(model, fullgraph=True, backend="eager")(x)


def test_torch_export():
    model, x, hx = make_model_and_input()
    exported = torch.export.export(model, (x.detach(), hx.detach()))
    out, h_n = exported.module()(x.detach(), hx.detach())
    torch.testing.assert_close((out, h_n), model(x, hx))
    assert any("rnn_ext.rnn_layer" in str(node.target) for node in exported.graph.nodes)


def test_op_rejects_bad_arguments():
    input, hx, weights, batch_sizes, relu = layer_sample()
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
