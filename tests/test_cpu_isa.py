"""The CPU kernels are compiled per instruction set and the best one is picked at load time, so
this machine alone would only ever test one. RNN_EXT_CPU_ISA forces a lower one: each is run in
a subprocess (the choice is made once per process) through a parity check against nn.RNN and
nn.RNNCell."""
import os
import subprocess
import sys
import textwrap

import pytest

import rnn_ext
from reference import subprocess_env

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# Sizes straddle the tile widths (8/16/32 columns, 4/8 rows) so partial tiles are exercised.
PARITY_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import rnn_ext
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    sys.path.insert(0, {tests_dir!r})
    from reference import assert_parity, make_pair

    print(rnn_ext.cpu_isa())
    torch.manual_seed(0)
    configs = [
        dict(batch=1, hidden=1, input=1, layers=1, bidirectional=False, nonlinearity="tanh"),
        dict(batch=3, hidden=7, input=5, layers=2, bidirectional=True, nonlinearity="relu"),
        dict(batch=9, hidden=33, input=17, layers=1, bidirectional=False, nonlinearity="tanh"),
        dict(batch=13, hidden=70, input=40, layers=2, bidirectional=False, nonlinearity="tanh"),
        dict(batch=5, hidden=48, input=8, layers=1, bidirectional=True, nonlinearity="relu", packed=True),
    ]
    for dtype in (torch.float64, torch.float32):
        for c in configs:
            ours, theirs = make_pair(c["input"], c["hidden"], dtype=dtype, num_layers=c["layers"],
                                     bidirectional=c["bidirectional"], nonlinearity=c["nonlinearity"])
            seq_len, directions = 11, 2 if c["bidirectional"] else 1
            x = torch.randn(seq_len, c["batch"], c["input"], dtype=dtype)
            if c.get("packed"):
                lengths = torch.randint(1, seq_len + 1, (c["batch"],))
                x = pack_padded_sequence(x, lengths, enforce_sorted=False)
                x = type(x)(x.data.requires_grad_(), *x[1:])
                out_shape = (x.data.shape[0], directions * c["hidden"])
            else:
                x.requires_grad_()
                out_shape = (seq_len, c["batch"], directions * c["hidden"])
            state_shape = (c["layers"] * directions, c["batch"], c["hidden"])
            hx = torch.randn(state_shape, dtype=dtype, requires_grad=True)
            grad_output, grad_h_n = torch.randn(out_shape, dtype=dtype), torch.randn(state_shape, dtype=dtype)
            assert_parity(ours, theirs, x, hx, grad_output, grad_h_n)
    # A padded batch with lengths: the kernels take its rows in length order through an index.
    for dtype in (torch.float64, torch.float32):
        ours, theirs = make_pair(17, 33, dtype=dtype, num_layers=2, bidirectional=True, nonlinearity="relu")
        lengths = torch.tensor([3, 11, 1, 7, 11, 5, 2, 9, 4])
        x = torch.randn(11, 9, 17, dtype=dtype, requires_grad=True)
        grad_output = torch.randn(11, 9, 66, dtype=dtype)
        results = []
        for model, run in ((ours, lambda: ours(x, lengths=lengths)),
                           (theirs, lambda: pad_packed_sequence(
                               theirs(pack_padded_sequence(x, lengths, enforce_sorted=False))[0], total_length=11))):
            output = run()[0]
            results.append([output, *torch.autograd.grad((output * grad_output).sum(), [x, *model.parameters()])])
        tolerance = {{}} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(results[0], results[1], **tolerance)
    # RNNCell: its dot-product kernels (up to 8 rows) on vector tails, row pairs and two threads.
    for dtype in (torch.float64, torch.float32):
        cell_configs = ((1, 17, 33, "tanh"), (3, 40, 7, "relu"), (8, 64, 70, "tanh"), (1, 256, 256, "tanh"))
        for batch, input_size, hidden, nonlinearity in cell_configs:  # the last one on two threads
            ours = rnn_ext.RNNCell(input_size, hidden, nonlinearity=nonlinearity, dtype=dtype)
            theirs = torch.nn.RNNCell(input_size, hidden, nonlinearity=nonlinearity, dtype=dtype)
            theirs.load_state_dict(ours.state_dict())
            x = torch.randn(batch, input_size, dtype=dtype, requires_grad=True)
            hx = torch.randn(batch, hidden, dtype=dtype, requires_grad=True)
            grad = torch.randn(batch, hidden, dtype=dtype)
            results = []
            for cell in (ours, theirs):
                h = cell(x, hx)
                results.append([h, *torch.autograd.grad((h * grad).sum(), [x, hx, *cell.parameters()])])
            tolerance = {{}} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(results[0], results[1], **tolerance)
    print("parity ok")
""")


def run_with_isa(isa, script):
    return subprocess.run([sys.executable, "-P", "-c", script], env=subprocess_env(RNN_EXT_CPU_ISA=isa), capture_output=True, text=True,
                          timeout=300, cwd=TESTS_DIR)


ISAS = ["baseline", "avx2", "avx512", "avx512_bf16"]


def supported_isas():
    # Every x86-64 CPU runs "baseline"; the others only where the CPU has them.
    return ISAS[: ISAS.index(rnn_ext.cpu_isa()) + 1]


@pytest.mark.parametrize("isa", ISAS)
def test_parity_with_nn_rnn_on_each_instruction_set(isa):
    if isa not in supported_isas():
        pytest.skip(f"this CPU's best instruction set is {rnn_ext.cpu_isa()}")
    result = run_with_isa(isa, PARITY_SCRIPT.format(tests_dir=TESTS_DIR))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [isa, "parity", "ok"]


@pytest.mark.parametrize("isa", ISAS)
def test_low_precision_on_each_instruction_set(isa):
    """test_low_precision.py under each instruction set: bfloat16 on its own kernels with
    avx512_bf16, through the float32 kernels on the others; float16 through them everywhere."""
    if isa not in supported_isas():
        pytest.skip(f"this CPU's best instruction set is {rnn_ext.cpu_isa()}")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(TESTS_DIR, "test_low_precision.py")],
        env=subprocess_env(RNN_EXT_CPU_ISA=isa), capture_output=True, text=True, timeout=600, cwd=TESTS_DIR)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout


def test_unknown_instruction_set_is_a_clear_error():
    script = "import torch, rnn_ext\nrnn_ext.RNN(2, 3)(torch.randn(4, 1, 2))"
    result = run_with_isa("sse9", script)
    assert result.returncode != 0
    assert "RNN_EXT_CPU_ISA must be avx512_bf16, avx512, avx2 or baseline, got 'sse9'" in result.stderr

