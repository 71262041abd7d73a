"""torch.autocast: rnn_ext runs in the autocast dtype like nn.RNN does (CPU: bfloat16)."""
import pytest
import torch

import rnn_ext
from reference import allow_rnn, make_pair, randn

# Hidden states lie in [-1, 1], where a bfloat16 ulp is at most 2^-8 ≈ 0.004. Inputs, weights and
# each step's result are rounded to bfloat16, and rounding differences propagate through the
# recurrence, so two bfloat16 runs (ours, nn.RNN's, or one against float32) differ by a few ulps.
BF16_TOL = dict(atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("bidir", [False, True])
def test_cpu_autocast_bfloat16_matches_nn_rnn(bidir):
    torch.manual_seed(0)
    ours, theirs = make_pair(8, 16, dtype=torch.float32, num_layers=2, bidirectional=bidir)
    x = torch.randn(12, 4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, h_n = ours(x)
        ref_out, ref_h_n = theirs(x)
    assert out.dtype == ref_out.dtype == torch.bfloat16
    assert h_n.dtype == ref_h_n.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref_out.float(), **BF16_TOL)
    torch.testing.assert_close(h_n.float(), ref_h_n.float(), **BF16_TOL)

    full_out, _ = ours(x)
    torch.testing.assert_close(out.float(), full_out, **BF16_TOL)

    # Gradients flow back to the float32 parameters and input.
    grads = torch.autograd.grad(out.float().sum(), [x, *ours.parameters()])
    ref_grads = torch.autograd.grad(full_out.sum(), [x, *ours.parameters()])
    for g, ref in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        scale = ref.abs().max().clamp_min(1.0)
        assert (g - ref).abs().max() <= 5e-2 * scale


def test_autocast_applies_to_the_op_and_compiles(device):
    torch.manual_seed(1)
    model = rnn_ext.RNN(4, 6).to(device)
    x = randn(5, 2, 4, dtype=torch.float32, device=device)

    def run(x):
        with torch.autocast(device, dtype=torch.bfloat16):
            return model(x)

    eager = run(x)
    with allow_rnn():
        compiled = torch.compile(run, fullgraph=True, backend="aot_eager")(x)
    assert eager[0].dtype == compiled[0].dtype == torch.bfloat16
    torch.testing.assert_close(eager, compiled)


def test_autocast_disabled_keeps_float32(device):
    model = rnn_ext.RNN(4, 6, device=device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=False):
        out, _ = model(randn(3, 1, 4, dtype=torch.float32, device=device))
    assert out.dtype == torch.float32
