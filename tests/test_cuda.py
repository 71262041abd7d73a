"""What only CUDA has: the build check, our CUDA kernels against our CPU kernels, float16/bfloat16
and TF32 bounds, streams and CUDA graphs, device checks, and a step large enough for the kernels'
grid-stride loops to wrap.

Parity with torch.nn.RNN (cuDNN), gradcheck, gradgradcheck, opcheck and torch.compile run on CUDA
in the shared suites (test_module.py, test_packed.py, test_ops.py, ...) through the `device`
fixture of conftest.py. Every test here but ``test_cuda_kernels_built`` needs a GPU and is skipped
without one. Inputs are drawn on the CPU from fixed seeds and then moved, so a run is the same on
any machine.
"""
import copy
import os

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnn_ext
from reference import assert_as_accurate_as, make_pair, outputs_and_grads

DEVICE = "cuda"

OPS = ("rnn_ext::rnn_layer", "rnn_ext::rnn_layer_backward", "rnn_ext::rnn_cell", "rnn_ext::rnn_cell_backward")


def requires_cuda(test):
    """Marks a test that needs a GPU (marker `cuda`) and skips it without one."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    return pytest.mark.cuda(skip(test))


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


# -- helpers --------------------------------------------------------------------------------------


def seeded_randn(*shape, dtype=torch.float64, seed):
    """Normal numbers from their own CPU generator, in dtype on DEVICE."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype).to(DEVICE)


def seeded_rand(*shape, dtype=torch.float64, seed):
    """Uniform numbers in [0, 1) from their own CPU generator, in dtype on DEVICE."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=generator, dtype=torch.float64).to(dtype).to(DEVICE)


def run_dense(model, x, hx, grad_out, grad_h_n):
    """Output, h_n and the gradients of input, hx and every parameter for the given upstream gradients."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    hx = hx.detach().clone().requires_grad_()
    out, h_n = model(x, hx)
    torch.autograd.backward([out, h_n], [grad_out, grad_h_n])
    grads = {"input": x.grad, "hx": hx.grad}
    grads.update({name: p.grad for name, p in model.named_parameters()})
    return out.detach(), h_n.detach(), grads


def run_packed(model, padded, lengths, enforce_sorted, hx, grad_data, grad_h_n):
    """As run_dense for the PackedSequence of padded with these lengths; returns the packed output."""
    model.zero_grad(set_to_none=True)
    padded = padded.detach().clone().requires_grad_()
    hx = hx.detach().clone().requires_grad_()
    packed = pack_padded_sequence(padded, lengths, enforce_sorted=enforce_sorted)
    out, h_n = model(packed, hx)
    torch.autograd.backward([out.data, h_n], [grad_data, grad_h_n])
    grads = {"input": padded.grad, "hx": hx.grad}
    grads.update({name: p.grad for name, p in model.named_parameters()})
    return out, h_n.detach(), grads


def assert_close_to_scale(got, expected, tol, what):
    """|got - expected| <= tol * max|expected|, elementwise."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(
        got.double(), expected.double(), rtol=0, atol=tol * scale, msg=lambda m: f"{what} (scale {scale:.3g}): {m}")


def assert_outputs_close_to_scale(got, expected, tol):
    """Output and h_n of two (output, h_n, grads) results, each within tol of its scale."""
    (out, h_n, _), (out_ref, h_n_ref, _) = got, expected
    assert_close_to_scale(out, out_ref, tol, "output")
    assert_close_to_scale(h_n, h_n_ref, tol, "h_n")


def assert_grads_close_to_scale(got, expected, tol):
    """Every gradient of two (output, h_n, grads by name) results, each within tol of its scale."""
    grads, grads_ref = got[2], expected[2]
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        assert_close_to_scale(grads[name], grads_ref[name], tol, f"grad of {name}")


# -- our CUDA kernels against our CPU kernels -----------------------------------------------------


def layer_tensors(step_sizes, B, I, H, D, bias, dtype, device, seed=0):
    """(input, hx, weights) of one layer with these step sizes, drawn on the CPU and moved to device."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).mul_(0.5).to(dtype).to(device)

    N = sum(step_sizes)
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
    cpu = layer_tensors(sizes, sizes[0], I, H, D, bias, torch.float64, "cpu", seed=seed)
    dev = [cpu[0].to(DEVICE), cpu[1].to(DEVICE), [w.to(DEVICE) for w in cpu[2]]]
    out_cpu, h_n_cpu = rnn_ext.ops.run_layer(*cpu, batch_sizes, relu)
    out_dev, h_n_dev = rnn_ext.ops.run_layer(*dev, batch_sizes, relu)
    torch.testing.assert_close(out_dev.cpu(), out_cpu)
    torch.testing.assert_close(h_n_dev.cpu(), h_n_cpu)

    grad_out = torch.randn(out_cpu.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    grad_h_n = torch.randn(h_n_cpu.shape, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    for mask in masks:
        expected = rnn_ext.ops.rnn_layer_backward(grad_out, grad_h_n, *cpu, batch_sizes, relu, out_cpu, mask)
        got = rnn_ext.ops.rnn_layer_backward(
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


@requires_cuda
def test_grid_stride_loops_wrap():
    """A step of B * H = 8192 * 2112 elements needs 67584 blocks of 256 threads, more than the 2^16
    a launch is capped at: the step kernels' grid-stride loops go round a second time. float32,
    judged as the shared suites judge it (reference.assert_as_accurate_as)."""
    seq_len, batch, input_size, hidden = 2, 8192, 1, 2112
    assert batch * hidden > 256 * 2**16
    torch.manual_seed(81)
    ours, theirs = make_pair(input_size, hidden, dtype=torch.float32, device=DEVICE)
    x = seeded_randn(seq_len, batch, input_size, dtype=torch.float32, seed=82)
    with torch.no_grad():
        got = ours(x)
        expected = theirs(x)
        exact = copy.deepcopy(theirs).double()(x.double())
    assert_as_accurate_as((*got, ()), (*expected, ()), (*exact, ()))


# -- float16 / bfloat16 -------------------------------------------------------------------------------

# Unit roundoff of each type.
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}

# Sizes of the 16-bit tests: sequence length, batch, input and hidden size, layers; the lengths of
# their packed batch.
LOW_PRECISION_SIZES = 7, 4, 6, 16, 2
LOW_PRECISION_LENGTHS = [7, 5, 3, 1]


def run_low_precision_and_float32(ours, ref, dtype, packed, draw):
    """ours, converted to dtype, and ref, nn.RNN in float32 with the same (rounded) weights, on the
    same inputs: x and hx from draw(*shape, dtype=, seed=), upstream gradients normal, all rounded
    to dtype. Returns the two (output, h_n, grads by name), output as packed data when packed."""
    T, B, I, H, layers = LOW_PRECISION_SIZES
    D = 2 if ours.bidirectional else 1
    ours = ours.to(dtype)
    ref.load_state_dict({k: v.float() for k, v in ours.state_dict().items()})
    hx = draw(layers * D, B, H, dtype=dtype, seed=43)
    grad_h_n = seeded_randn(layers * D, B, H, dtype=dtype, seed=45)
    if packed:
        lengths = torch.tensor(LOW_PRECISION_LENGTHS)
        padded = draw(T, B, I, dtype=dtype, seed=42)
        grad_data = seeded_randn(int(lengths.sum()), D * H, dtype=dtype, seed=44)
        out, h_n, grads = run_packed(ours, padded, lengths, True, hx, grad_data, grad_h_n)
        out_ref, h_n_ref, grads_ref = run_packed(
            ref, padded.float(), lengths, True, hx.float(), grad_data.float(), grad_h_n.float())
        return (out.data, h_n, grads), (out_ref.data, h_n_ref, grads_ref)
    x = draw(T, B, I, dtype=dtype, seed=42)
    grad_out = seeded_randn(T, B, D * H, dtype=dtype, seed=44)
    return (run_dense(ours, x, hx, grad_out, grad_h_n),
            run_dense(ref, x.float(), hx.float(), grad_out.float(), grad_h_n.float()))


def assert_dtype(result, dtype):
    out, h_n, grads = result
    assert out.dtype == dtype and h_n.dtype == dtype
    for name, grad in grads.items():
        assert grad.dtype == dtype, name


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
    0 and 1, which no tolerance on the rounding error covers; they are compared in
    test_low_precision_relu_gradients_against_float32, whose pre-activations stay far from 0.
    """
    u = UNIT_ROUNDOFF[dtype]
    _, _, input_size, hidden, layers = LOW_PRECISION_SIZES
    torch.manual_seed(41)
    ours, ref = make_pair(input_size, hidden, dtype=torch.float32, device=DEVICE, num_layers=layers,
                          nonlinearity=nonlinearity, bidirectional=bidirectional)
    got, expected = run_low_precision_and_float32(ours, ref, dtype, packed, seeded_randn)
    assert_dtype(got, dtype)
    assert_outputs_close_to_scale(got, expected, 4 * u)
    if nonlinearity == "tanh":
        assert_grads_close_to_scale(got, expected, 8 * u)


def keep_relu_away_from_its_kink(model, generator):
    """Weights with which every pre-activation of a relu model stays at least 0.5 away from 0 for
    input and hx in [0, 1]: nonnegative weights small enough that a unit's input and recurrent
    terms add at most half the largest input and half the largest state, b_ih + b_hh in [0.5, 1]
    for the first half of the units (always active, pre-activation >= 0.5) and -8 for the others.
    States then stay below 3 in the first layer and 5 in the second, so the others'
    pre-activations stay below -4: never active."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("weight"):
                fan_in = p.shape[1]
                p.copy_(torch.rand(p.shape, generator=generator) * 0.5 / fan_in)
            else:
                active = torch.arange(p.shape[0]) < p.shape[0] // 2
                p.copy_(torch.where(active, 0.25 + 0.25 * torch.rand(p.shape, generator=generator), -4.0))


@requires_cuda
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_relu_gradients_against_float32(dtype, bidirectional, packed):
    """relu in 16 bits against float32, gradients included, with pre-activations kept far from the
    kink (keep_relu_away_from_its_kink) so that rounding cannot switch a derivative. The same
    emulation as in test_low_precision_against_float32 (200 seeds of each of these cases) gives at
    most 2.2 u in outputs and 4.7 u in gradients: the same bounds, 4 u and 8 u, apply."""
    u = UNIT_ROUNDOFF[dtype]
    _, _, input_size, hidden, layers = LOW_PRECISION_SIZES
    torch.manual_seed(41)
    ours, ref = make_pair(input_size, hidden, dtype=torch.float32, device=DEVICE, num_layers=layers,
                          nonlinearity="relu", bidirectional=bidirectional)
    keep_relu_away_from_its_kink(ours, torch.Generator().manual_seed(46))
    got, expected = run_low_precision_and_float32(ours, ref, dtype, packed, seeded_rand)
    # The premise: in every direction the first half of the units is active, the rest is not.
    directions = 2 if bidirectional else 1
    units = expected[0].unflatten(-1, (directions, hidden))
    assert (units[..., : hidden // 2] >= 0.5).all() and (units[..., hidden // 2 :] == 0).all()
    assert_dtype(got, dtype)
    assert_outputs_close_to_scale(got, expected, 4 * u)
    assert_grads_close_to_scale(got, expected, 8 * u)


# -- TF32 ---------------------------------------------------------------------------------------------


@requires_cuda
def test_tf32_float32_within_tf32_rounding_of_float64():
    """With torch.backends.cuda.matmul.allow_tf32 set (conftest's no_tf32 fixture restores it), our
    float32 GEMMs may run in TF32 (10-bit mantissa, u = 2^-11), as torch.mm's do. Outputs and
    gradients then stay within 1e-2 of each tensor's scale of a float64 run: an emulation that
    truncates every GEMM operand to TF32 gives at most 2.8e-3 (30 seeds of this case). tanh only:
    as in 16 bits, a rounding can carry a relu pre-activation across the kink."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(71)
    seq_len, batch, input_size, hidden, layers, directions = 10, 4, 16, 32, 2, 2
    model, _ = make_pair(input_size, hidden, dtype=torch.float32, device=DEVICE, num_layers=layers,
                         bidirectional=True)
    exact = copy.deepcopy(model).double()
    x = seeded_randn(seq_len, batch, input_size, seed=72)
    hx = seeded_randn(layers * directions, batch, hidden, seed=73)
    grad_out = seeded_randn(seq_len, batch, directions * hidden, seed=74)
    grad_h_n = seeded_randn(layers * directions, batch, hidden, seed=75)
    got = run_dense(model, x.float(), hx.float(), grad_out.float(), grad_h_n.float())
    expected = run_dense(exact, x, hx, grad_out, grad_h_n)
    assert_outputs_close_to_scale(got, expected, 1e-2)
    assert_grads_close_to_scale(got, expected, 1e-2)


# -- streams, CUDA graphs and devices -----------------------------------------------------------------


@requires_cuda
def test_runs_on_the_current_stream():
    torch.manual_seed(0)
    model, _ = make_pair(4, 8, dtype=torch.float32, device=DEVICE, num_layers=2, bidirectional=True)
    x = seeded_randn(6, 3, 4, dtype=torch.float32, seed=51)
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
def test_cuda_graph_replay_matches_eager():
    """Forward and backward of a 2-layer bidirectional float32 model captured in a CUDA graph (on
    torch.cuda.graph's side stream) and replayed on new input: the eager results. A kernel or
    cuBLAS call issued on the legacy default stream instead of the current one fails the capture."""
    torch.manual_seed(61)
    model, _ = make_pair(4, 8, dtype=torch.float32, device=DEVICE, num_layers=2, bidirectional=True)
    static_x = seeded_randn(6, 3, 4, dtype=torch.float32, seed=62).requires_grad_()
    grad_out = seeded_randn(6, 3, 16, dtype=torch.float32, seed=63)
    grad_h_n = seeded_randn(4, 3, 8, dtype=torch.float32, seed=64)

    def forward_backward():
        out, h_n = model(static_x)
        torch.autograd.backward([out, h_n], [grad_out, grad_h_n])
        return out, h_n

    # Warm-up on a side stream before capturing, as torch.cuda.graph's documentation asks.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            forward_backward()
    torch.cuda.current_stream().wait_stream(side)

    # Gradients unset, so that the captured backward allocates them rather than accumulating.
    model.zero_grad(set_to_none=True)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_h_n = forward_backward()

    x = seeded_randn(6, 3, 4, dtype=torch.float32, seed=65)
    with torch.no_grad():
        static_x.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    replayed = (static_out, static_h_n, (static_x.grad, *(p.grad for p in model.parameters())))
    torch.testing.assert_close(replayed, outputs_and_grads(model, x.requires_grad_(), None, grad_out, grad_h_n))


@requires_cuda
def test_mixed_devices_are_rejected():
    x, hx, weights = layer_tensors([2, 2], 2, 3, 4, 1, True, torch.float32, DEVICE)
    with pytest.raises(RuntimeError, match="hx must be on the input's device"):
        rnn_ext.ops.run_layer(x, hx.cpu(), weights, None, False)
    with pytest.raises(RuntimeError, match="each weight must be on the input's device"):
        rnn_ext.ops.run_layer(x, hx, [weights[0].cpu(), *weights[1:]], None, False)
    with pytest.raises(RuntimeError, match="batch_sizes must be a 1-D int64 CPU tensor"):
        rnn_ext.ops.run_layer(x, hx, weights, torch.tensor([2, 2], device=DEVICE), False)
