"""Batching rules (``torch.vmap``) for the ops: ``rnn_layer``, ``rnn_layer_backward``, ``rnn_cell``
and ``rnn_cell_backward`` (shapes in ``rnn_ext/ops.py``).

A vmapped dimension of size V over the data (input, hx, grads, output) with weights shared by
every sample is folded into the op's batch: batch row b of sample v becomes row ``b * V + v``. In
the time-major row layout every step's rows then stay together, in length order for a packed
batch (``batch_sizes * V``; ``lengths`` repeat each row's length V times), so one call runs all
V samples on the kernels. Per-sample weights, or weight gradients (each sample's own sum over
its rows), run the op once per sample instead.

The backward rules serve ``torch.func.vmap`` over ``torch.autograd.grad`` of a recorded graph.
Autograd's own batched gradients (``is_grads_batched=True``, ``jacobian(vectorize=True)``,
gradcheck's batched checks) use the legacy vmap instead: see ``csrc/legacy_vmap.cpp``.
"""
import torch
from torch.utils import _pytree as pytree

from . import ops


def _fold_rows(t, dim, samples):
    """``[R, C]`` per sample (vmapped at ``dim``, or shared when None) -> ``[R * V, C]``, row r of
    sample v at ``r * V + v``."""
    t = t.movedim(dim, 1) if dim is not None else t.unsqueeze(1).expand(t.shape[0], samples, t.shape[1])
    return t.reshape(t.shape[0] * samples, t.shape[2])


def _fold_states(t, dim, samples):
    """``[D, B, H]`` per sample -> ``[D, B * V, H]``, batch row b of sample v at ``b * V + v``."""
    t = t.movedim(dim, 2) if dim is not None else t.unsqueeze(2).expand(t.shape[0], t.shape[1], samples, t.shape[2])
    return t.reshape(t.shape[0], t.shape[1] * samples, t.shape[3])


def _unfold_rows(t, samples):
    """Inverse of _fold_rows, as a view: ``[R, V, C]``, vmapped at dim 1."""
    return t.view(t.shape[0] // samples, samples, t.shape[1])


def _unfold_states(t, samples):
    """Inverse of _fold_states, as a view: ``[D, B, V, H]``, vmapped at dim 2."""
    return t.view(t.shape[0], t.shape[1] // samples, samples, t.shape[2])


def _per_sample(op, samples, in_dims, args):
    """op run once per sample, its outputs stacked: (outputs, out_dims) with the vmapped dim first."""

    def sample(v):
        return pytree.tree_map(
            lambda arg, dim: arg if dim is None else arg.select(dim, v), args, in_dims,
            is_leaf=lambda x: x is None,
        )

    results = [op(*sample(v)) for v in range(samples)]
    stacked = pytree.tree_map(lambda *outputs: torch.stack(outputs), *results)
    return stacked, pytree.tree_map(lambda _: 0, stacked)


def _all_none(dims):
    return all(d is None for d in pytree.tree_leaves(dims, is_leaf=lambda x: x is None))


def _folded_schedule(batch_sizes, lengths, samples):
    return (
        None if batch_sizes is None else batch_sizes * samples,
        None if lengths is None else lengths.repeat_interleave(samples),
    )


def _samples(info):
    if info.batch_size == 0:
        raise RuntimeError("rnn_ext: vmap over a dimension of size 0 is not supported")
    return info.batch_size


@torch.library.register_vmap("rnn_ext::rnn_layer")
def _rnn_layer_vmap(info, in_dims, input, hx, *rest):
    samples = _samples(info)
    args = (input, hx, *rest)
    input_dim, hx_dim, *other_dims = in_dims
    if not _all_none(other_dims):  # per-sample weights (or schedules)
        return _per_sample(ops.rnn_layer, samples, in_dims, args)
    weights = rest[: ops.WEIGHT_SLOTS]
    batch_sizes, relu, lengths = (*rest[ops.WEIGHT_SLOTS :], None)[:3]  # the dispatcher drops a trailing None
    batch_sizes, lengths = _folded_schedule(batch_sizes, lengths, samples)
    output, h_n = ops.rnn_layer(
        _fold_rows(input, input_dim, samples), _fold_states(hx, hx_dim, samples), *weights, batch_sizes, relu,
        lengths,
    )
    return (_unfold_rows(output, samples), _unfold_states(h_n, samples)), (1, 2)


@torch.library.register_vmap("rnn_ext::rnn_layer_backward")
def _rnn_layer_backward_vmap(info, in_dims, grad_output, grad_h_n, input, hx, weights, *rest):
    samples = _samples(info)
    args = (grad_output, grad_h_n, input, hx, weights, *rest)
    batch_sizes, relu, output, output_mask, lengths = (*rest, None)[:5]
    (grad_output_dim, grad_h_n_dim, input_dim, hx_dim, weights_dims, batch_sizes_dim, _, output_dim, _,
     lengths_dim) = (*in_dims, None)[:10]
    if output_mask[2] or not _all_none((weights_dims, batch_sizes_dim, lengths_dim)):
        # Each sample's weight gradients sum over its own rows only.
        return _per_sample(ops.rnn_layer_backward, samples, in_dims, args)
    batch_sizes, lengths = _folded_schedule(batch_sizes, lengths, samples)
    grad_input, grad_hx, _ = ops.rnn_layer_backward(
        _fold_rows(grad_output, grad_output_dim, samples), _fold_states(grad_h_n, grad_h_n_dim, samples),
        _fold_rows(input, input_dim, samples), _fold_states(hx, hx_dim, samples), weights, batch_sizes, relu,
        _fold_rows(output, output_dim, samples), output_mask, lengths,
    )
    grad_input, grad_input_dim = (_unfold_rows(grad_input, samples), 1) if output_mask[0] else (grad_input, None)
    grad_hx, grad_hx_dim = (_unfold_states(grad_hx, samples), 2) if output_mask[1] else (grad_hx, None)
    return (grad_input, grad_hx, []), (grad_input_dim, grad_hx_dim, [])


@torch.library.register_vmap("rnn_ext::rnn_cell")
def _rnn_cell_vmap(info, in_dims, input, hx, w_ih, w_hh, b_ih, b_hh, relu):
    samples = _samples(info)
    input_dim, hx_dim, *weight_dims = in_dims
    if not _all_none(weight_dims):
        return _per_sample(ops.rnn_cell, samples, in_dims, (input, hx, w_ih, w_hh, b_ih, b_hh, relu))
    h = ops.rnn_cell(
        _fold_rows(input, input_dim, samples), _fold_rows(hx, hx_dim, samples), w_ih, w_hh, b_ih, b_hh, relu
    )
    return _unfold_rows(h, samples), 1


@torch.library.register_vmap("rnn_ext::rnn_cell_backward")
def _rnn_cell_backward_vmap(info, in_dims, grad_h, input, hx, weights, relu, output, output_mask):
    samples = _samples(info)
    grad_h_dim, input_dim, hx_dim, weights_dims, _, output_dim, _ = in_dims
    if output_mask[2] or not _all_none(weights_dims):
        args = (grad_h, input, hx, weights, relu, output, output_mask)
        return _per_sample(ops.rnn_cell_backward, samples, in_dims, args)
    grad_input, grad_hx, _ = ops.rnn_cell_backward(
        _fold_rows(grad_h, grad_h_dim, samples), _fold_rows(input, input_dim, samples),
        _fold_rows(hx, hx_dim, samples), weights, relu, _fold_rows(output, output_dim, samples), output_mask,
    )
    grad_input, grad_input_dim = (_unfold_rows(grad_input, samples), 1) if output_mask[0] else (grad_input, None)
    grad_hx, grad_hx_dim = (_unfold_rows(grad_hx, samples), 1) if output_mask[1] else (grad_hx, None)
    return (grad_input, grad_hx, []), (grad_input_dim, grad_hx_dim, [])
