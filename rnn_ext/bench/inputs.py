"""What a layer benchmark runs: both models with the same weights, the batches they see, and the
functions timed in each mode (``fwd``, ``fwd_bwd``)."""
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import rnn_ext

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Largest |rnn_ext - nn.RNN| forward difference accepted silently; above it a warning is printed.
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-9, torch.bfloat16: 0.25, torch.float16: 0.05}
MODES = ("fwd", "fwd_bwd")  # forward under no_grad; forward, then the gradients of every input


def build_models(shape, dtype, device, seed, batch_first=False):
    """``(nn.RNN, rnn_ext.RNN)`` holding the same weights."""
    kwargs = dict(num_layers=shape.num_layers, bidirectional=shape.bidirectional, dtype=dtype, device=device,
                  batch_first=batch_first)
    torch.manual_seed(seed)
    reference = torch.nn.RNN(shape.input_size, shape.hidden_size, **kwargs)
    ours = rnn_ext.RNN(shape.input_size, shape.hidden_size, **kwargs)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


@dataclass
class Batch:
    """One model input and the gradients fed to the backward pass of its outputs."""

    input: object  # a [L, B, I] ([B, L, I] batch-first) tensor or a PackedSequence; its data requires grad
    leaf: torch.Tensor  # the tensor the input gradient is taken against
    grad_output: torch.Tensor
    grad_h_n: torch.Tensor
    tokens: int
    lengths: torch.Tensor | None = None  # of a padded batch run with lengths (--lengths)
    batch_first: bool = False
    autocast: torch.dtype | None = None  # run under torch.autocast in this dtype (--autocast)

    def under_autocast(self, dtype):
        """Run under torch.autocast in ``dtype``, whose outputs (and so their gradients) are in it."""
        self.autocast, self.grad_output, self.grad_h_n = dtype, self.grad_output.to(dtype), self.grad_h_n.to(dtype)


def make_batches(shape, dtype, device, seed, variable=None, batch_first=False):
    """The dense batch, and with ``variable`` ("packed" or "lengths") also the same batch with random
    lengths, packed or padded.

    Returns ``(dense, variable_or_None)``; lengths are uniform in [1, L], padding is zero.
    """
    gen = torch.Generator().manual_seed(seed)
    out_features = shape.directions * shape.hidden_size
    h_n_shape = (shape.num_layers * shape.directions, shape.batch, shape.hidden_size)

    def randn(*size):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    def layout(t):  # [L, B, ...] -> the models' layout
        return t.transpose(0, 1).contiguous() if batch_first else t

    x = randn(shape.seq_len, shape.batch, shape.input_size)
    grad_h_n = randn(*h_n_shape)
    if variable is not None:
        lengths = torch.randint(1, shape.seq_len + 1, (shape.batch,), generator=gen)
        steps = torch.arange(shape.seq_len).unsqueeze(1)
        x = x * (steps < lengths).unsqueeze(2).to(device=device, dtype=dtype)
    dense_x = layout(x).requires_grad_()
    grad_output = layout(randn(*x.shape[:2], out_features))
    dense = Batch(dense_x, dense_x, grad_output, grad_h_n, shape.seq_len * shape.batch, batch_first=batch_first)
    if variable is None:
        return dense, None
    tokens = int(lengths.sum())
    if variable == "lengths":
        return dense, Batch(dense_x, dense_x, grad_output, grad_h_n, tokens, lengths, batch_first)
    data, batch_sizes, sorted_indices, unsorted_indices = pack_padded_sequence(
        layout(x), lengths, batch_first=batch_first, enforce_sorted=False
    )
    data = data.detach().requires_grad_()
    sequence = PackedSequence(data, batch_sizes, sorted_indices, unsorted_indices)
    return dense, Batch(sequence, data, randn(tokens, out_features), grad_h_n, tokens, batch_first=batch_first)


def run_model(model, batch):
    """``(output tensor, h_n)`` of ``model`` on ``batch``, under ``torch.autocast`` when the batch
    asks for it."""
    enabled = batch.autocast is not None
    with torch.autocast(batch.leaf.device.type, dtype=batch.autocast, enabled=enabled):
        return run_model_as_is(model, batch)


def run_model_as_is(model, batch):
    """run_model without autocast. With lengths, rnn_ext.RNN takes them itself; nn.RNN runs the
    pack -> RNN -> pad pipeline that gives the same result."""
    if batch.lengths is None:
        output, h_n = model(batch.input)
        return (output.data if isinstance(output, PackedSequence) else output), h_n
    if isinstance(model, rnn_ext.RNN):
        return model(batch.input, lengths=batch.lengths)
    total_length = batch.input.shape[1 if batch.batch_first else 0]
    packed = pack_padded_sequence(batch.input, batch.lengths, batch_first=batch.batch_first, enforce_sorted=False)
    output, h_n = model(packed)
    output, _ = pad_packed_sequence(output, batch_first=batch.batch_first, total_length=total_length)
    return output, h_n


def forward_fn(model, batch):
    def run():
        with torch.no_grad():
            return run_model(model, batch)

    return run


def forward_backward_fn(model, batch):
    inputs = [batch.leaf, *model.parameters()]

    def run():
        output, h_n = run_model(model, batch)
        return torch.autograd.grad((output, h_n), inputs, (batch.grad_output, batch.grad_h_n))

    return run


def mode_fns(model, batch):
    """``{mode: fn}``: what is timed of ``model`` on ``batch`` in each of MODES."""
    return {"fwd": forward_fn(model, batch), "fwd_bwd": forward_backward_fn(model, batch)}


def max_forward_difference(reference, ours, batch):
    """Largest |difference| of output and h_n between the two models on ``batch``."""
    with torch.no_grad():
        (ref_out, ref_h), (our_out, our_h) = run_model(reference, batch), run_model(ours, batch)
    pairs = ((ref_out, our_out), (ref_h, our_h))
    return max(float((a.float() - b.float()).abs().max()) for a, b in pairs)
