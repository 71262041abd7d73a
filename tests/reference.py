"""The two references every test compares against: a plain PyTorch loop, and torch.nn.RNN."""
import copy
import os

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnn_ext


def reference_rnn(x, hx, weights, *, num_layers, nonlinearity="tanh", bias=True, bidirectional=False, lengths=None):
    """The Elman recurrence written out step by step, one sequence at a time.

    x: [L, B, I] padded, time-major; hx: [num_layers * D, B, H]; weights in nn.RNN's flat order;
    lengths: real length of each sequence (default: all L). Returns (output [L, B, D*H] with zeros
    past each sequence's end, h_n [num_layers * D, B, H]).
    """
    act = torch.tanh if nonlinearity == "tanh" else torch.relu
    seq_len, batch, _ = x.shape
    lengths = [seq_len] * batch if lengths is None else list(lengths)
    directions = 2 if bidirectional else 1
    per_direction = 4 if bias else 2
    layer_input = x
    h_n = []
    for layer in range(num_layers):
        direction_outputs = []
        for d in range(directions):
            w = weights[(layer * directions + d) * per_direction :][:per_direction]
            w_ih, w_hh = w[0], w[1]
            sequences = []
            for b in range(batch):
                h = hx[layer * directions + d, b]
                steps = range(lengths[b]) if d == 0 else reversed(range(lengths[b]))
                states = {}
                for t in steps:
                    z = layer_input[t, b] @ w_ih.T + h @ w_hh.T
                    if bias:
                        z = z + w[2] + w[3]
                    h = act(z)
                    states[t] = h
                pad = torch.zeros_like(h)
                sequences.append((torch.stack([states.get(t, pad) for t in range(seq_len)]), h))
            direction_outputs.append(torch.stack([s for s, _ in sequences], 1))
            h_n.append(torch.stack([h for _, h in sequences], 0))
        layer_input = torch.cat(direction_outputs, -1)
    return layer_input, torch.stack(h_n, 0)


def allow_rnn():
    """dynamo refuses every nn.RNN, rnn_ext.RNN included, unless this switch lets it trace the
    forward (rnn_ext.RNN's then compiles whole): for the tests that compile it with fullgraph=True."""
    return torch._dynamo.config.patch(allow_rnn=True)


def make_pair(input_size, hidden_size, dtype=torch.float64, device="cpu", **kwargs):
    """(rnn_ext.RNN, torch.nn.RNN) on device with identical weights. Both are built on the CPU,
    so a seed of the global generator gives the same weights on every device, and then moved."""
    ours = rnn_ext.RNN(input_size, hidden_size, dtype=dtype, **kwargs)
    theirs = torch.nn.RNN(input_size, hidden_size, dtype=dtype, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    return ours.to(device), theirs.to(device)


def eval_pair(input_size, hidden_size, **kwargs):
    """make_pair in float32 eval mode, weights drawn from seed 0: the models the export tests export."""
    torch.manual_seed(0)
    ours, theirs = make_pair(input_size, hidden_size, dtype=torch.float32, **kwargs)
    return ours.eval(), theirs.eval()


def randn(*shape, dtype=torch.float64, device="cpu", requires_grad=False):
    """torch.randn drawn from the global CPU generator and then moved to device: the same numbers
    on every device and machine for a given seed."""
    return torch.randn(*shape, dtype=dtype).to(device).requires_grad_(requires_grad)


def outputs_and_grads(module, input, hx, grad_output, grad_h_n):
    """Output, h_n, and the gradients of input, hx and every parameter for given upstream grads."""
    output, h_n = module(input, hx) if hx is not None else module(input)
    if isinstance(output, torch.nn.utils.rnn.PackedSequence):
        output, input = output.data, input.data
    wrt = [t for t in (input, hx) if t is not None and t.requires_grad] + list(module.parameters())
    loss = (output * grad_output).sum() + (h_n * grad_h_n).sum()
    grads = torch.autograd.grad(loss, wrt)
    return output, h_n, grads


def assert_parity(ours, theirs, x, hx, grad_output, grad_h_n):
    """Outputs and all gradients of two modules with the same weights agree: exactly as
    assert_close's defaults in float64; in float32 see assert_as_accurate_as."""
    ours_result = outputs_and_grads(ours, x, hx, grad_output, grad_h_n)
    theirs_result = outputs_and_grads(theirs, x, hx, grad_output, grad_h_n)
    if x.data.dtype == torch.float64:
        torch.testing.assert_close(ours_result, theirs_result)
    else:
        exact = float64_outputs_and_grads(theirs, x, hx, grad_output, grad_h_n)
        assert_as_accurate_as(ours_result, theirs_result, exact)


def as_float64(t):
    if t is None:
        return None
    if isinstance(t, torch.nn.utils.rnn.PackedSequence):
        return type(t)(as_float64(t.data), *t[1:])
    return t.detach().double().requires_grad_(t.requires_grad)


def float64_outputs_and_grads(module, x, hx, grad_output, grad_h_n):
    """The float32 computation redone in float64 by nn.RNN: the reference both are measured against."""
    return outputs_and_grads(copy.deepcopy(module).double(), as_float64(x), as_float64(hx),
                             grad_output.double(), grad_h_n.double())


def flatten(result):
    output, h_n, grads = result
    return [output, h_n, *grads]


def assert_as_accurate_as(ours, theirs, exact):
    """float32: each of our tensors matches nn.RNN's within assert_close's default float32
    tolerance, or, where it does not, is within 4x nn.RNN's own max error against the float64
    result. Long sums (over up to L*B rows, in different orders) put both implementations
    ~1e-5 away from the exact gradient when it is large; a wrong kernel misses by far more."""
    for i, (o, t, e) in enumerate(zip(flatten(ours), flatten(theirs), flatten(exact))):
        if e.numel() == 0 or torch.allclose(o, t, rtol=1.3e-6, atol=1e-5):
            continue
        error_ours = (o.double() - e).abs().max().item()
        error_theirs = (t.double() - e).abs().max().item()
        assert error_ours <= 4 * error_theirs, (
            f"tensor {i} of (output, h_n, grads...): our max error against float64 {error_ours:.3g}, "
            f"nn.RNN's {error_theirs:.3g}")


def packed_batch(lengths, input_size, dtype=torch.float64, enforce_sorted=False, batch_first=False, seed=0,
                 device="cpu"):
    """A padded batch with the given lengths, drawn on the CPU and moved to device, and its
    PackedSequence (data requires grad; batch_sizes stays on the CPU, as PackedSequence keeps it)."""
    generator = torch.Generator().manual_seed(seed)
    seq_len = max(lengths)
    padded = torch.randn(seq_len, len(lengths), input_size, dtype=dtype, generator=generator).to(device)
    if batch_first:
        padded = padded.transpose(0, 1).contiguous()
    packed = pack_padded_sequence(padded, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=enforce_sorted)
    data = packed.data.detach().requires_grad_()
    return padded, type(packed)(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)


def subprocess_env(**variables):
    """os.environ plus variables, with PYTHONPATH leading to the rnn_ext this process imported
    (installed or built in place), for tests that run Python in a subprocess."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(rnn_ext.__file__)))
    path = os.pathsep.join(p for p in [package_root, os.environ.get("PYTHONPATH")] if p)
    return dict(os.environ, PYTHONPATH=path, **variables)


def pipeline(module, x, hx, lengths, batch_first=False):
    """nn.RNN on a padded batch the way a user has to run it: pack, run, unpack."""
    seq_len = x.shape[1 if batch_first else 0]
    packed = pack_padded_sequence(x, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False)
    output, h_n = module(packed, hx)
    output, _ = pad_packed_sequence(output, batch_first=batch_first, total_length=seq_len)
    return output, h_n


def run_and_grads(fn, module, x, hx, grad_output, grad_h_n):
    """fn()'s (output, h_n), and the gradients of x, hx (when given) and every parameter."""
    output, h_n = fn()
    wrt = [x] + ([hx] if hx is not None else []) + list(module.parameters())
    grads = torch.autograd.grad((output * grad_output).sum() + (h_n * grad_h_n).sum(), wrt)
    return output, h_n, grads
