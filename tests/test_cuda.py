"""Tests of the CUDA kernels: parity with torch.nn.RNN (cuDNN) and with our CPU kernels, gradients,
opcheck, torch.compile, float16/bfloat16, streams and device checks.

Every test but ``test_cuda_kernels_built`` needs a GPU and is skipped without one. Inputs are drawn
on the CPU from fixed seeds and then moved, so a run is the same on any machine.
"""
import itertools
import os

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnn_ext

DEVICE = "cuda"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

OPS = ("rnn_ext::rnn_layer", "rnn_ext::rnn_layer_backward")


def force_cuda():
    return os.environ.get("FORCE_CUDA", "0").lower() in ("1", "true", "yes", "on")  # as setup.py reads it


@pytest.mark.skipif(
    not force_cuda() and not torch.cuda.is_available(),
    reason="neither a FORCE_CUDA=1 build nor a visible GPU: a CPU-only build is expected",
)
def test_cuda_kernels_built():
    # Runs without a GPU: a build that was asked for CUDA must hold the CUDA kernels.
    assert rnn_ext.cuda_kernels_built()
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 parity is with IEEE float32 on both sides: TF32 off for cuBLAS and cuDNN."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# -- helpers --------------------------------------------------------------------------------------


def model_pair(input_size, hidden_size, num_layers, nonlinearity, bias, batch_first, bidirectional, dtype, seed=0):
    """rnn_ext.RNN and torch.nn.RNN with the same weights, on DEVICE."""
    torch.manual_seed(seed)
    kwargs = dict(
        num_layers=num_layers, nonlinearity=nonlinearity, bias=bias, batch_first=batch_first,
        bidirectional=bidirectional, dtype=dtype,
    )
    ours = rnn_ext.RNN(input_size, hidden_size, **kwargs)
    ref = torch.nn.RNN(input_size, hidden_size, **kwargs)
    ref.load_state_dict(ours.state_dict())
    return ours.to(DEVICE), ref.to(DEVICE)


def randn(*shape, dtype=torch.float64, seed=None):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype).to(DEVICE)


def run_dense(model, x, hx, grad_out, grad_h_n):
    """Output, h_n and the gradients of input, hx and every parameter for the given upstream gradients."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    if hx is not None:
        hx = hx.detach().clone().requires_grad_()
        out, h_n = model(x, hx)
    else:
        out, h_n = model(x)
    torch.autograd.backward([out, h_n], [grad_out, grad_h_n])
    grads = {"input": x.grad}
    if hx is not None:
        grads["hx"] = hx.grad
    grads.update({name: p.grad for name, p in model.named_parameters()})
    return out.detach(), h_n.detach(), grads


def run_packed(model, padded, lengths, enforce_sorted, hx, grad_data, grad_h_n):
    model.zero_grad(set_to_none=True)
    padded = padded.detach().clone().requires_grad_()
    hx = hx.detach().clone().requires_grad_()
    packed = pack_padded_sequence(padded, lengths, enforce_sorted=enforce_sorted)
    out, h_n = model(packed, hx)
    torch.autograd.backward([out.data, h_n], [grad_data, grad_h_n])
    grads = {"input": padded.grad, "hx": hx.grad}
    grads.update({name: p.grad for name, p in model.named_parameters()})
    return out, h_n.detach(), grads


def assert_same_results(got, expected, **tol):
    out, h_n, grads = got
    out_ref, h_n_ref, grads_ref = expected
    torch.testing.assert_close(out, out_ref, **tol)
    torch.testing.assert_close(h_n, h_n_ref, **tol)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], msg=lambda m: f"grad of {name}: {m}", **tol)


# -- parity with torch.nn.RNN on CUDA -----------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("give_hx", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_module_matches_nn_rnn(num_layers, bidirectional, nonlinearity, bias, batch_first, give_hx, dtype):
    T, B, I, H = 5, 3, 4, 6
    D = 2 if bidirectional else 1
    ours, ref = model_pair(I, H, num_layers, nonlinearity, bias, batch_first, bidirectional, dtype)
    x = randn(*((B, T, I) if batch_first else (T, B, I)), dtype=dtype, seed=1)
    hx = randn(num_layers * D, B, H, dtype=dtype, seed=2) if give_hx else None
    grad_out = randn(*((B, T, D * H) if batch_first else (T, B, D * H)), dtype=dtype, seed=3)
    grad_h_n = randn(num_layers * D, B, H, dtype=dtype, seed=4)
    # Default assert_close tolerances for the dtype: both sides are IEEE float32/float64 GEMMs
    # that differ only in summation order.
    assert_same_results(run_dense(ours, x, hx, grad_out, grad_h_n), run_dense(ref, x, hx, grad_out, grad_h_n))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_packed_matches_nn_rnn(num_layers, bidirectional, nonlinearity, enforce_sorted, dtype):
    I, H = 3, 5
    D = 2 if bidirectional else 1
    # Sorted lengths for enforce_sorted=True; shuffled (with ties) otherwise.
    lengths = torch.tensor([6, 4, 4, 2, 1] if enforce_sorted else [2, 6, 1, 4, 4])
    T, B = int(lengths.max()), len(lengths)
    ours, ref = model_pair(I, H, num_layers, nonlinearity, True, False, bidirectional, dtype)
    padded = randn(T, B, I, dtype=dtype, seed=1)
    hx = randn(num_layers * D, B, H, dtype=dtype, seed=2)
    grad_data = randn(int(lengths.sum()), D * H, dtype=dtype, seed=3)
    grad_h_n = randn(num_layers * D, B, H, dtype=dtype, seed=4)
    got = run_packed(ours, padded, lengths, enforce_sorted, hx, grad_data, grad_h_n)
    expected = run_packed(ref, padded, lengths, enforce_sorted, hx, grad_data, grad_h_n)
    assert torch.equal(got[0].batch_sizes, expected[0].batch_sizes)
    if not enforce_sorted:
        assert torch.equal(got[0].sorted_indices, expected[0].sorted_indices)
        assert torch.equal(got[0].unsorted_indices, expected[0].unsorted_indices)
    assert_same_results((got[0].data, got[1], got[2]), (expected[0].data, expected[1], expected[2]))


# -- our CUDA kernels against our CPU kernels -----------------------------------------------------


def layer_args(T_sizes, B, I, H, D, bias, dtype, device, seed=0):
    """(input, hx, weights) for one layer with step sizes T_sizes, drawn on the CPU."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).mul_(0.5).to(dtype).to(device)

    N = sum(T_sizes)
    weights = []
    for _ in range(D):
        weights += [draw(H, I), draw(H, H)] + ([draw(H), draw(H)] if bias else [])
    return draw(N, I), draw(D, B, H), weights


# (step sizes, packed?) cases: dense, packed with several sequence ends, one step, one row.
SCHEDULES = [
    ([3, 3, 3, 3], False),
    ([4, 4, 3, 1, 1], True),
    ([2], False),
    ([1, 1, 1], True),
]


ALL_MASKS = ([True, True, True], [True, False, False], [False, True, False], [False, False, True])


def check_layer_against_cpu(sizes, packed, I, H, D, bias, relu, masks, seed=0):
    """rnn_layer and rnn_layer_backward (for each output_mask) on DEVICE against the CPU kernels, float64."""
    batch_sizes = torch.tensor(sizes) if packed else None
    cpu = layer_args(sizes, sizes[0], I, H, D, bias, torch.float64, "cpu", seed=seed)
    dev = [cpu[0].to(DEVICE), cpu[1].to(DEVICE), [w.to(DEVICE) for w in cpu[2]]]
    out_cpu, h_n_cpu = rnn_ext.ops.run_layer(*cpu, batch_sizes, relu)
    out_dev, h_n_dev = rnn_ext.ops.run_layer(*dev, batch_sizes, relu)
    torch.testing.assert_close(out_dev.cpu(), out_cpu)
    torch.testing.assert_close(h_n_dev.cpu(), h_n_cpu)

    grad_out = torch.randn(out_cpu.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    grad_h_n = torch.randn(h_n_cpu.shape, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    for mask in masks:
        expected = torch.ops.rnn_ext.rnn_layer_backward(grad_out, grad_h_n, *cpu, batch_sizes, relu, out_cpu, mask)
        got = torch.ops.rnn_ext.rnn_layer_backward(
            grad_out.to(DEVICE), grad_h_n.to(DEVICE), *dev, batch_sizes, relu, out_dev, mask)
        assert len(got[2]) == len(expected[2])
        # Skipped outputs are [0] tensors / an empty list on both.
        for g, e in zip([got[0], got[1], *got[2]], [expected[0], expected[1], *expected[2]]):
            torch.testing.assert_close(g.cpu(), e)


@requires_cuda
@pytest.mark.parametrize("schedule", range(len(SCHEDULES)))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("D", [1, 2])
def test_layer_matches_cpu_kernels(D, relu, bias, schedule):
    sizes, packed = SCHEDULES[schedule]
    check_layer_against_cpu(sizes, packed, 5, 7, D, bias, relu, ALL_MASKS)


@requires_cuda
@pytest.mark.parametrize("relu", [False, True])
def test_larger_layer_matches_cpu_kernels(relu):
    # Odd sizes, more elements per step than one block, both directions, packed.
    sizes = [37, 37, 30, 30, 12, 5, 1]
    check_layer_against_cpu(sizes, True, 20, 129, 2, True, relu, ALL_MASKS[:1], seed=3)


# -- gradcheck, opcheck, torch.compile ----------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("D", [1, 2])
def test_gradcheck_op(D, relu, packed):
    sizes = [3, 2, 2, 1] if packed else [3, 3, 3]
    batch_sizes = torch.tensor(sizes) if packed else None
    x, hx, weights = layer_args(sizes, sizes[0], 3, 4, D, True, torch.float64, DEVICE, seed=11)
    inputs = [t.requires_grad_() for t in [x, hx, *weights]]

    def layer(x, hx, *weights):
        return rnn_ext.ops.run_layer(x, hx, list(weights), batch_sizes, relu)

    assert torch.autograd.gradcheck(layer, inputs)


@requires_cuda
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_gradcheck_module(nonlinearity):
    model, _ = model_pair(3, 4, 2, nonlinearity, True, True, True, torch.float64)
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    x = randn(2, 3, 3, seed=12).requires_grad_()  # batch_first [B, T, I]
    hx = randn(4, 2, 4, seed=13).requires_grad_()

    def run(x, hx, *params):
        return torch.func.functional_call(model, dict(zip(names, params)), (x, hx))

    assert torch.autograd.gradcheck(run, [x, hx, *params])


@requires_cuda
@pytest.mark.parametrize("D", [1, 2])
def test_gradcheck_op_with_no_steps(D):
    """No step runs: h_n is hx, so grad_hx must be grad_h_n (not zeros)."""
    x, hx, weights = layer_args([], 3, 3, 4, D, True, torch.float64, DEVICE, seed=16)
    inputs = [t.requires_grad_() for t in [x, hx, *weights]]

    def layer(x, hx, *weights):
        return rnn_ext.ops.run_layer(x, hx, list(weights), None, False)

    assert torch.autograd.gradcheck(layer, inputs)


@requires_cuda
def test_gradgradcheck_module():
    """Double backward, which cuDNN's nn.RNN lacks."""
    model, _ = model_pair(3, 4, 2, "tanh", True, True, True, torch.float64)
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    x = randn(2, 3, 3, seed=14).requires_grad_()
    hx = randn(4, 2, 4, seed=15).requires_grad_()

    def run(x, hx, *params):
        return torch.func.functional_call(model, dict(zip(names, params)), (x, hx))

    assert torch.autograd.gradgradcheck(run, [x, hx, *params])


def opcheck_samples():
    """(args) samples of rnn_layer on DEVICE: dense and packed, one and two directions, with and without bias."""
    samples = []
    for (sizes, packed), D, bias, relu in itertools.product(SCHEDULES[:2], [1, 2], [True, False], [False, True]):
        x, hx, weights = layer_args(sizes, sizes[0], 3, 4, D, bias, torch.float32, DEVICE, seed=21)
        samples.append((x, hx, weights, torch.tensor(sizes) if packed else None, relu))
    return samples


@requires_cuda
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_rnn_layer(requires_grad):
    for x, hx, weights, batch_sizes, relu in opcheck_samples():
        if requires_grad:
            x, hx = x.requires_grad_(), hx.requires_grad_()
            weights = [w.requires_grad_() for w in weights]
        torch.library.opcheck(torch.ops.rnn_ext.rnn_layer.default, rnn_ext.ops.layer_args(x, hx, weights, batch_sizes, relu))


@requires_cuda
@pytest.mark.parametrize("mask", [[True, True, True], [False, True, False], [True, False, True]])
def test_opcheck_rnn_layer_backward(mask):
    for x, hx, weights, batch_sizes, relu in opcheck_samples():
        output, _ = rnn_ext.ops.run_layer(x, hx, weights, batch_sizes, relu)
        grad_output = torch.randn_like(output)
        grad_h_n = torch.randn_like(hx)
        args = (grad_output, grad_h_n, x, hx, weights, batch_sizes, relu, output, mask)
        torch.library.opcheck(torch.ops.rnn_ext.rnn_layer_backward.default, args)


@requires_cuda
@pytest.mark.parametrize("bidirectional", [False, True])
def test_compile_matches_eager(bidirectional):
    torch._dynamo.reset()
    model, _ = model_pair(4, 6, 2, "tanh", True, False, bidirectional, torch.float32)
    D = 2 if bidirectional else 1
    x = randn(5, 3, 4, dtype=torch.float32, seed=31)
    hx = randn(2 * D, 3, 6, dtype=torch.float32, seed=32)
    grad_out = randn(5, 3, D * 6, dtype=torch.float32, seed=33)
    grad_h_n = randn(2 * D, 3, 6, dtype=torch.float32, seed=34)
    eager = run_dense(model, x, hx, grad_out, grad_h_n)
    compiled = run_dense(torch.compile(model, fullgraph=True), x, hx, grad_out, grad_h_n)
    # The compiled graph calls the same kernels; only the glue around them may differ.
    compiled_grads = {name.removeprefix("_orig_mod."): g for name, g in compiled[2].items()}
    assert_same_results((compiled[0], compiled[1], compiled_grads), eager)


# -- float16 / bfloat16 -------------------------------------------------------------------------------

# Unit roundoff of each type.
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def assert_close_to_scale(got, expected, tol, what):
    """|got - expected| <= tol * max|expected|, elementwise."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(
        got.float(), expected, rtol=0, atol=tol * scale, msg=lambda m: f"{what} (scale {scale:.3g}): {m}")


@requires_cuda
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_against_float32(dtype, bidirectional, nonlinearity, packed):
    """16-bit storage with float32 accumulation, against nn.RNN in float32 on the same (rounded) values.

    The kernels round to the 16-bit type where they store: the input projection, each step's
    output, each step's grad_z and the final gradients; everything between is float32. A
    rounding-faithful emulation of exactly those steps (over 160 seeded cases of these shapes)
    differs from float32 by at most 1.9 u of each tensor's scale in outputs and 3.2 u in gradients
    (u = unit roundoff: 2^-11 float16, 2^-8 bfloat16). The bounds below, 4 u and 8 u, leave twice
    that for the summation orders of cuBLAS and cuDNN. relu gradients are not compared here: a
    rounding can move a pre-activation near zero across the kink and switch its derivative between
    0 and 1, which no tolerance on the rounding error covers; they are tested in float32/float64.
    """
    u = UNIT_ROUNDOFF[dtype]
    T, B, I, H, L = 7, 4, 6, 16, 2
    D = 2 if bidirectional else 1
    ours, ref = model_pair(I, H, L, nonlinearity, True, False, bidirectional, torch.float32, seed=41)
    ours = ours.to(dtype)
    ref.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})  # the rounded weights
    hx = randn(L * D, B, H, dtype=dtype, seed=43)
    grad_h_n = randn(L * D, B, H, dtype=dtype, seed=45)
    if packed:
        lengths = torch.tensor([7, 5, 3, 1])
        padded = randn(T, B, I, dtype=dtype, seed=42)
        grad_data = randn(int(lengths.sum()), D * H, dtype=dtype, seed=44)
        out, h_n, grads = run_packed(ours, padded, lengths, True, hx, grad_data, grad_h_n)
        out_ref, h_n_ref, grads_ref = run_packed(
            ref, padded.float(), lengths, True, hx.float(), grad_data.float(), grad_h_n.float())
        out, out_ref = out.data, out_ref.data
    else:
        x = randn(T, B, I, dtype=dtype, seed=42)
        grad_out = randn(T, B, D * H, dtype=dtype, seed=44)
        out, h_n, grads = run_dense(ours, x, hx, grad_out, grad_h_n)
        out_ref, h_n_ref, grads_ref = run_dense(ref, x.float(), hx.float(), grad_out.float(), grad_h_n.float())
    assert out.dtype == dtype and h_n.dtype == dtype
    assert_close_to_scale(out, out_ref, 4 * u, "output")
    assert_close_to_scale(h_n, h_n_ref, 4 * u, "h_n")
    if nonlinearity == "tanh":
        for name in grads:
            assert grads[name].dtype == dtype, name
            assert_close_to_scale(grads[name], grads_ref[name], 8 * u, f"grad of {name}")


# -- streams and devices ------------------------------------------------------------------------------


@requires_cuda
def test_runs_on_the_current_stream():
    model, _ = model_pair(4, 8, 2, "tanh", True, False, True, torch.float32)
    x = randn(6, 3, 4, dtype=torch.float32, seed=51)
    expected_out, expected_h_n = model(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out, h_n = model(x)
        out.sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(h_n, expected_h_n)


@requires_cuda
def test_mixed_devices_are_rejected():
    x, hx, weights = layer_args([2, 2], 2, 3, 4, 1, True, torch.float32, DEVICE)
    with pytest.raises(RuntimeError, match="hx must be on the input's device"):
        rnn_ext.ops.run_layer(x, hx.cpu(), weights, None, False)
    with pytest.raises(RuntimeError, match="each weight must be on the input's device"):
        rnn_ext.ops.run_layer(x, hx, [weights[0].cpu(), *weights[1:]], None, False)
    with pytest.raises(RuntimeError, match="batch_sizes must be a 1-D int64 CPU tensor"):
        rnn_ext.ops.run_layer(x, hx, weights, torch.tensor([2, 2], device=DEVICE), False)
