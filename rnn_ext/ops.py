"""Python side of the compiled ops: fake kernels for tracing, and autograd.

``torch.ops.rnn_ext.rnn_layer(input, hx, weights, batch_sizes, relu) -> (output, h_n)`` runs one
layer (every direction) of the recurrence; shapes are documented in ``csrc/rnn.h``:

    input        [N, I]      time-major rows (N = T*B dense, or sum(batch_sizes) packed)
    hx           [D, B, H]
    weights      per direction: w_ih [H, I], w_hh [H, H], (b_ih [H], b_hh [H])
    batch_sizes  [T] int64 CPU tensor, or None for dense input
    output       [N, D*H],   h_n [D, B, H]

``rnn_layer_backward`` is its gradient, itself a registered op so that compiled graphs can hold it.
"""
import torch

from . import _C  # noqa: F401  (importing the extension registers the ops)

rnn_layer = torch.ops.rnn_ext.rnn_layer.default
rnn_layer_backward = torch.ops.rnn_ext.rnn_layer_backward.default


@torch.library.register_fake("rnn_ext::rnn_layer")
def _rnn_layer_fake(input, hx, weights, batch_sizes, relu):
    torch._check(input.dim() == 2, lambda: f"rnn_ext: input must be 2-D, got {input.dim()}-D")
    torch._check(hx.dim() == 3, lambda: f"rnn_ext: hx must be 3-D, got {hx.dim()}-D")
    directions, batch, hidden = hx.shape
    output = input.new_empty((input.shape[0], directions * hidden))
    h_n = input.new_empty((directions, batch, hidden))
    return output, h_n


@torch.library.register_fake("rnn_ext::rnn_layer_backward")
def _rnn_layer_backward_fake(grad_output, grad_h_n, input, hx, weights, batch_sizes, relu, output, output_mask):
    grad_input = input.new_empty(input.shape if output_mask[0] else (0,))
    grad_hx = hx.new_empty(hx.shape if output_mask[1] else (0,))
    grad_weights = [w.new_empty(w.shape) for w in weights] if output_mask[2] else []
    return grad_input, grad_hx, grad_weights


def _setup_context(ctx, inputs, output):
    input, hx, weights, batch_sizes, relu = inputs
    layer_output, _ = output
    ctx.relu = relu
    ctx.save_for_backward(input, hx, layer_output, batch_sizes, *weights)


def _backward(ctx, grad_output, grad_h_n):
    input, hx, layer_output, batch_sizes, *weights = ctx.saved_tensors
    need_input, need_hx, need_weights, _, _ = ctx.needs_input_grad
    output_mask = [need_input, need_hx, any(need_weights)]
    grad_input, grad_hx, grad_weights = rnn_layer_backward(
        grad_output, grad_h_n, input, hx, weights, batch_sizes, ctx.relu, layer_output, output_mask
    )
    if not output_mask[2]:
        grad_weights = [None] * len(weights)
    else:
        grad_weights = [g if need else None for g, need in zip(grad_weights, need_weights)]
    return (
        grad_input if need_input else None,
        grad_hx if need_hx else None,
        grad_weights,
        None,
        None,
    )


torch.library.register_autograd("rnn_ext::rnn_layer", _backward, setup_context=_setup_context)
