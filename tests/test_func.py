"""torch.func transforms, forward-mode AD and batched gradients, each against nn.RNN in float64.

Under torch.func's differentiating transforms and forward-mode AD the op runs as differentiable
ATen ops (csrc/autograd.cpp); torch.func.vmap has batching rules (rnn_ext/batching.py); the legacy
vmap that autograd uses for is_grads_batched has a per-sample kernel (csrc/legacy_vmap.cpp). On
CUDA, nn.RNN runs with cuDNN off: cuDNN's RNN has no forward-mode AD or batching rule.
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnn_ext
from rnn_ext import ops
from reference import make_pair, randn

CONFIGS = {
    "tanh": dict(),
    "relu-2layer-bidir": dict(num_layers=2, bidirectional=True, nonlinearity="relu"),
    "nobias-batch_first": dict(bias=False, batch_first=True),
}
LENGTHS = [3, 1, 2]  # of the packed and padded batches: unsorted, one row shorter than the rest


class Case:
    """A module pair and one kind of input ("dense", "packed" or "lengths"), with functions of
    (params, x, hx) -> (output, h_n) that give comparable tensors for both modules: the packed
    output's data, the padded output with zeros past each row's length."""

    def __init__(self, kind, config, device, input_size=2, hidden_size=3):
        self.kind, self.config = kind, config
        self.ours, self.theirs = make_pair(input_size, hidden_size, device=device, **config)
        self.params = {name: p.detach() for name, p in self.ours.named_parameters()}
        batch, steps = len(LENGTHS), max(LENGTHS)
        directions = 2 if config.get("bidirectional") else 1
        self.hx = randn(config.get("num_layers", 1) * directions, batch, hidden_size, device=device)
        batch_first = config.get("batch_first", False)
        padded = randn(*((batch, steps) if batch_first else (steps, batch)), input_size, device=device)
        self.lengths = torch.tensor(LENGTHS)
        if kind == "packed":
            self.packed = pack_padded_sequence(padded, self.lengths, batch_first=batch_first, enforce_sorted=False)
            self.x = self.packed.data
        else:
            self.x = padded

    def run(self, module, params, x, hx):
        if module is self.theirs and self.kind != "dense":
            return self.run_each_sequence(params, x, hx)
        if self.kind == "packed":
            output, h_n = functional_call(module, params, (PackedSequence(x, *self.packed[1:]), hx))
            return output.data, h_n
        if self.kind == "lengths":
            return functional_call(module, params, (x, hx), {"lengths": self.lengths})
        return functional_call(module, params, (x, hx))

    def run_each_sequence(self, params, x, hx):
        """nn.RNN on each sequence alone, assembled into the packed or padded layout. (nn.RNN on a
        PackedSequence fails under torch.func: its batch_sizes is read through a wrapper.)"""
        batch_first = self.config.get("batch_first", False)
        steps = max(LENGTHS)
        outputs, h_n = [], []
        for b, length in enumerate(LENGTHS):
            if self.kind == "packed":
                sequence = x[self.packed_rows(b)].unsqueeze(1)
                sequence = sequence.transpose(0, 1) if batch_first else sequence
            else:
                sequence = x[b : b + 1, :length] if batch_first else x[:length, b : b + 1]
            output, h = functional_call(self.theirs, params, (sequence, hx[:, b : b + 1]))
            outputs.append(output.squeeze(0 if batch_first else 1))  # [length, D*H]
            h_n.append(h)
        if self.kind == "packed":
            rows = torch.cat([self.packed_rows(b) for b in range(len(LENGTHS))])
            output = torch.cat(outputs)[torch.argsort(rows).to(x.device)]
        else:
            padded = [torch.cat([o, o.new_zeros(steps - o.shape[0], o.shape[1])]) for o in outputs]
            output = torch.stack(padded, 0 if batch_first else 1)
        return output, torch.cat(h_n, 1)

    def packed_rows(self, b):
        """The rows of batch row b's steps in the packed data, in time order."""
        rank = int(self.packed.unsorted_indices[b])
        offsets = torch.cumsum(self.packed.batch_sizes, 0) - self.packed.batch_sizes
        return (offsets[: LENGTHS[b]] + rank).to(self.x.device)

    def both(self, fn):
        """fn(run) for rnn_ext and for nn.RNN (cuDNN off), where run(params, x, hx) is the module's."""
        ours = fn(lambda *args: self.run(self.ours, *args))
        with torch.backends.cudnn.flags(enabled=False):
            theirs = fn(lambda *args: self.run(self.theirs, *args))
        return ours, theirs


def scalar_loss(run):
    """A scalar of both outputs that weighs every element differently (so no gradient is trivial)."""

    def loss(params, x, hx):
        output, h_n = run(params, x, hx)
        return (output.sin() * output).sum() + (h_n * h_n.cos()).sum()

    return loss


def assert_same(pair):
    torch.testing.assert_close(*pair)


KINDS = ["dense", "packed", "lengths"]


@pytest.fixture(params=[(k, c) for k in KINDS for c in CONFIGS], ids=lambda p: f"{p[0]}-{p[1]}")
def case(request, device):
    torch.manual_seed(0)
    kind, config = request.param
    return Case(kind, CONFIGS[config], device)


def tangents_like(tree, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.utils._pytree.tree_map(
        lambda t: torch.randn(t.shape, dtype=t.dtype, generator=generator).to(t.device), tree
    )


def test_plain_autograd_keeps_the_compiled_functions():
    """Outside transforms and without tangents, the op records its C++ Function (one node running
    the compiled backward), not the step-by-step rebuild."""
    x = torch.randn(5, 2, 3)
    _, h_n = rnn_ext.RNN(3, 4)(x)
    assert "RnnLayerFunction" in h_n.grad_fn.name()
    assert "RnnCellFunction" in rnn_ext.RNNCell(3, 4)(x[0]).grad_fn.name()


# -- reverse mode ----------------------------------------------------------------------------------


def test_grad_of_params_input_and_hx(case):
    assert_same(case.both(lambda run: grad(scalar_loss(run), argnums=(0, 1, 2))(case.params, case.x, case.hx)))


def test_vjp(case):
    def fn(run):
        out, pullback = vjp(run, case.params, case.x, case.hx)
        return out, pullback(tangents_like(out))

    assert_same(case.both(fn))


def test_jacrev_of_the_output(case):
    assert_same(case.both(lambda run: jacrev(run, argnums=(0, 1))(case.params, case.x, case.hx)))


# -- forward mode ----------------------------------------------------------------------------------


def test_jvp(case):
    primals = (case.params, case.x, case.hx)
    assert_same(case.both(lambda run: jvp(run, primals, tangents_like(primals))))


def test_jacfwd_of_the_output(case):
    assert_same(case.both(lambda run: jacfwd(run, argnums=(0, 1))(case.params, case.x, case.hx)))


def test_forward_ad_dual_tensors(case):
    """torch.autograd.forward_ad: tangents on the input, hx and one weight."""

    def fn(run):
        with fwAD.dual_level():
            params = dict(case.params)
            params["weight_hh_l0"] = fwAD.make_dual(params["weight_hh_l0"], tangents_like(params["weight_hh_l0"]))
            x = fwAD.make_dual(case.x, tangents_like(case.x, seed=2))
            hx = fwAD.make_dual(case.hx, tangents_like(case.hx, seed=3))
            output, h_n = run(params, x, hx)
            return [t.clone() for u in (output, h_n) for t in fwAD.unpack_dual(u)]

    assert_same(case.both(fn))


def test_hessian_and_hessian_vector_product(case):
    def fn(run):
        loss = scalar_loss(run)
        h = hessian(loss, argnums=1)(case.params, case.x, case.hx)
        v = tangents_like(case.params)
        hvp = jvp(lambda p: grad(loss)(p, case.x, case.hx), (case.params,), (v,))[1]  # forward over reverse
        return h, hvp

    assert_same(case.both(fn))


# -- vmap of the transforms ------------------------------------------------------------------------

SAMPLES = 4


def per_sample_inputs(case):
    """SAMPLES batches of the case's input and hx, stacked on a new dim 0."""
    generator = torch.Generator().manual_seed(5)
    return [torch.randn(SAMPLES, *t.shape, dtype=t.dtype, generator=generator).to(t.device) for t in (case.x, case.hx)]


def loop_over_samples(fn, args, dims, *rest, samples):
    """vmap's reference: fn(*sample_args, *rest) for each sample, the results stacked. dims holds
    each argument's vmapped dim (None: shared by all samples; a list for a list argument)."""

    def one(arg, dim, v):
        if isinstance(arg, list):
            return [one(a, d, v) for a, d in zip(arg, dim)]
        return arg if dim is None else arg.select(dim, v)

    results = [fn(*(one(a, d, v) for a, d in zip(args, dims)), *rest) for v in range(samples)]
    return torch.utils._pytree.tree_map(lambda *r: torch.stack(r), *results)


def looped(fn, *stacked):
    """fn applied to each sample of the arguments stacked on dim 0, the results stacked."""
    return loop_over_samples(fn, stacked, [0] * len(stacked), samples=stacked[0].shape[0])


@pytest.mark.parametrize(
    "transform",
    ["grad", "vjp", "jvp", "jacrev", "jacfwd", "hessian"],
)
def test_vmap_of_each_transform(case, transform):
    """Per-sample results with shared parameters: vmap(transform(f)) over SAMPLES inputs, against
    nn.RNN applied to each sample in a loop (nn.RNN itself has no vmap support)."""
    xs, hxs = per_sample_inputs(case)

    def per_sample(run):
        loss = scalar_loss(run)

        def one(x, hx):
            if transform == "grad":
                return grad(loss, argnums=(0, 1))(case.params, x, hx)
            if transform == "vjp":
                out, pullback = vjp(lambda p, x: run(p, x, hx), case.params, x)
                return pullback(torch.utils._pytree.tree_map(torch.cos, out))
            if transform == "jvp":
                return jvp(lambda x, hx: run(case.params, x, hx), (x, hx), (x.cos(), hx.sin()))
            if transform == "jacrev":
                return jacrev(run, argnums=1)(case.params, x, hx)
            if transform == "jacfwd":
                return jacfwd(run, argnums=2)(case.params, x, hx)
            return hessian(loss, argnums=2)(case.params, x, hx)

        return one

    ours = vmap(per_sample(lambda *a: case.run(case.ours, *a)))(xs, hxs)
    with torch.backends.cudnn.flags(enabled=False):
        theirs = looped(per_sample(lambda *a: case.run(case.theirs, *a)), xs, hxs)
    torch.testing.assert_close(ours, theirs)


def test_per_sample_gradients_of_unbatched_sequences(device):
    """The per-sample-gradient recipe: vmap(grad(loss)) over a batch of [L, I] sequences."""
    torch.manual_seed(0)
    ours, theirs = make_pair(3, 4, device=device, num_layers=2)
    params = {name: p.detach() for name, p in ours.named_parameters()}
    xs, targets = randn(6, 5, 3, device=device), randn(6, 4, device=device)

    def loss(module):
        def sample_loss(params, x, target):
            output, _ = functional_call(module, params, (x,))
            return torch.nn.functional.mse_loss(output[-1], target)

        return sample_loss

    expected = looped(lambda x, t: grad(loss(theirs))(params, x, t), xs, targets)
    torch.testing.assert_close(vmap(grad(loss(ours)), in_dims=(None, 0, 0))(params, xs, targets), expected)


# -- vmap of the forward ---------------------------------------------------------------------------


@pytest.fixture
def no_vmap_fallback():
    """Turns off functorch's slow per-sample fallback for ops without a batching rule: an op
    that would take it raises instead."""
    enabled = torch._C._functorch._is_vmap_fallback_enabled()
    torch._C._functorch._set_vmap_fallback_enabled(False)
    yield
    torch._C._functorch._set_vmap_fallback_enabled(enabled)


def test_vmap_of_the_forward_uses_the_batching_rule(case, no_vmap_fallback):
    """vmap over the forward (shared weights), then plain backward through it."""
    xs, hxs = per_sample_inputs(case)
    params = {name: p.detach().requires_grad_() for name, p in case.params.items()}

    def forward_and_grads(run, batched):
        output, h_n = vmap(lambda x, hx: run(params, x, hx))(xs, hxs) if batched else looped(
            lambda x, hx: run(params, x, hx), xs, hxs)
        loss = (output * output.cos()).sum() + h_n.sin().sum()
        return output, h_n, torch.autograd.grad(loss, list(params.values()))

    ours = forward_and_grads(lambda *a: case.run(case.ours, *a), batched=True)
    with torch.backends.cudnn.flags(enabled=False):
        theirs = forward_and_grads(lambda *a: case.run(case.theirs, *a), batched=False)
    torch.testing.assert_close(ours, theirs)


def test_vmap_over_parameters_runs_an_ensemble(device, no_vmap_fallback):
    """Per-sample weights (model ensembling: stacked parameters, one input) take the rule's
    per-sample path."""
    torch.manual_seed(0)
    members = [make_pair(2, 3, device=device, bidirectional=True) for _ in range(3)]
    stacked = {name: torch.stack([dict(m.named_parameters())[name].detach() for m, _ in members])
               for name, _ in members[0][0].named_parameters()}
    x = randn(4, 2, 2, device=device)
    ours = vmap(lambda p: functional_call(members[0][0], p, (x,)))(stacked)
    theirs = [torch.stack(t) for t in zip(*[theirs(x) for _, theirs in members])]
    torch.testing.assert_close(list(ours), theirs)


class CountingOp:
    """Wraps an op to count its calls (the batching rules call ops.<name> at call time)."""

    def __init__(self, monkeypatch, name):
        self.op, self.calls = getattr(ops, name), 0
        monkeypatch.setattr(ops, name, self)

    def __call__(self, *args):
        self.calls += 1
        return self.op(*args)


def assert_rules_match_a_loop(forward, backward, data, grads, weights, data_dim, weight_dim):
    """forward(*data, weights) and backward(*grads, *data, weights, mask) under torch.func.vmap, data
    and grads vmapped at data_dim, weights at weight_dim (None: shared), against a loop over samples."""
    def loop(fn, args, dims, *rest):
        return loop_over_samples(fn, args, dims, *rest, samples=2)

    dims = (*[data_dim] * len(data), [weight_dim] * len(weights))
    torch.testing.assert_close(vmap(forward, in_dims=dims)(*data, weights), loop(forward, (*data, weights), dims))
    args, dims = (*grads, *data, weights), (*[data_dim] * len(grads), *dims)
    for mask in ([True, True, False], [True, False, True], [False, True, True]):
        result = vmap(lambda *a: backward(*a, mask), in_dims=dims)(*args)
        expected = loop(backward, args, dims, mask)
        for got, want, computed in zip(result, expected, mask):
            if computed:
                torch.testing.assert_close(got, want)


def maybe_batched(shape, dim, device, samples=2):
    shape = list(shape)
    if dim is not None:
        shape.insert(dim, samples)
    return randn(*shape, device=device)


LAYER_ARGS = {
    "dense": dict(batch_sizes=None, lengths=None),
    "packed": dict(batch_sizes=torch.tensor([3, 2, 1]), lengths=None),
    "lengths": dict(batch_sizes=None, lengths=torch.tensor([2, 0, 3])),
}
BATCHED = {"data": (1, None), "weights": (None, 0), "all": (2, 0)}  # vmapped dims of data and weights


@pytest.mark.parametrize("kind", LAYER_ARGS)
@pytest.mark.parametrize("batched", BATCHED)
def test_layer_batching_rules_against_a_loop(kind, batched, device, no_vmap_fallback, monkeypatch):
    """rnn_layer and rnn_layer_backward under torch.func.vmap: shared weights fold the samples into
    one call, vmapped weights run one call per sample."""
    torch.manual_seed(0)
    batch_sizes, lengths = LAYER_ARGS[kind]["batch_sizes"], LAYER_ARGS[kind]["lengths"]
    rows = int(batch_sizes.sum()) if batch_sizes is not None else 9
    D, B, I, H = 2, 3, 2, 4
    data_dim, weight_dim = BATCHED[batched]
    data = [maybe_batched((rows, I), data_dim, device), maybe_batched((D, B, H), data_dim, device)]
    grads = [maybe_batched((rows, D * H), data_dim, device), maybe_batched((D, B, H), data_dim, device)]
    weights = [maybe_batched(s, weight_dim, device) for s in [(H, I), (H, H), (H,), (H,)] * 2]

    def layer(x, hx, weights):
        return ops.run_layer(x, hx, weights, batch_sizes, False, lengths)

    def backward(grad_output, grad_h_n, x, hx, weights, mask):
        output, _ = layer(x, hx, weights)
        return ops.rnn_layer_backward(grad_output, grad_h_n, x, hx, weights, batch_sizes, False, output, mask, lengths)

    assert_rules_match_a_loop(layer, backward, data, grads, weights, data_dim, weight_dim)
    counting = CountingOp(monkeypatch, "rnn_layer")
    vmap(layer, in_dims=(data_dim, data_dim, [weight_dim] * len(weights)))(*data, weights)
    assert counting.calls == 1 + (1 if weight_dim is None else 2)  # the call vmap sees, then the rule's


@pytest.mark.parametrize("batched", BATCHED)
def test_cell_batching_rules_against_a_loop(batched, device, no_vmap_fallback):
    torch.manual_seed(0)
    B, I, H = 3, 2, 4
    data_dim, weight_dim = BATCHED[batched]
    data = [maybe_batched((B, I), data_dim, device), maybe_batched((B, H), data_dim, device)]
    grads = [maybe_batched((B, H), data_dim, device)]
    weights = [maybe_batched(s, weight_dim, device) for s in [(H, I), (H, H), (H,), (H,)]]

    def cell(x, hx, weights):
        return ops.rnn_cell(x, hx, *weights, True)

    def backward(grad_h, x, hx, weights, mask):
        return ops.rnn_cell_backward(grad_h, x, hx, weights, True, cell(x, hx, weights), mask)

    assert_rules_match_a_loop(cell, backward, data, grads, weights, data_dim, weight_dim)


# -- batched gradients in plain autograd (legacy vmap) ---------------------------------------------


def test_is_grads_batched(case):
    """torch.autograd.grad(..., is_grads_batched=True): several cotangents in one backward."""
    def fn(run):
        params = {name: p.clone().requires_grad_() for name, p in case.params.items()}
        x, hx = case.x.clone().requires_grad_(), case.hx.clone().requires_grad_()
        output, h_n = run(params, x, hx)
        cotangents = [torch.stack([tangents_like(t, seed) for seed in range(3)]) for t in (output, h_n)]
        return torch.autograd.grad((output, h_n), [x, hx, *params.values()], cotangents, is_grads_batched=True)

    assert_same(case.both(fn))


@pytest.mark.parametrize("strategy", ["reverse-mode", "forward-mode"])
def test_vectorized_jacobian(case, strategy):
    """Against nn.RNN's jacobian one row at a time: nn.RNN's own forward-mode vectorized jacobian
    is wrong with batch_first=True (torch 2.14)."""
    def jacobian(run, **how):
        return torch.autograd.functional.jacobian(lambda x, hx: run(case.params, x, hx), (case.x, case.hx), **how)

    ours = jacobian(lambda *a: case.run(case.ours, *a), vectorize=True, strategy=strategy)
    with torch.backends.cudnn.flags(enabled=False):
        theirs = jacobian(lambda *a: case.run(case.theirs, *a))
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_with_batched_and_forward_mode_checks(config, kind, device):
    """gradcheck and gradgradcheck with every check nn.RNN passes on the CPU turned on."""
    torch.manual_seed(0)
    case = Case(kind, CONFIGS[config], device, input_size=2, hidden_size=2)
    names = list(case.params)

    def run(x, hx, *weights):
        return case.run(case.ours, dict(zip(names, weights)), x, hx)

    inputs = [t.clone().requires_grad_() for t in (case.x, case.hx, *case.params.values())]
    assert torch.autograd.gradcheck(
        run, inputs, check_batched_grad=True, check_forward_ad=True, check_batched_forward_grad=True
    )
    assert torch.autograd.gradgradcheck(run, inputs, check_batched_grad=True, check_fwd_over_rev=True)


# -- RNNCell ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_cell_under_torch_func(nonlinearity, device):
    torch.manual_seed(0)
    ours = rnn_ext.RNNCell(3, 4, nonlinearity=nonlinearity, dtype=torch.float64).to(device)
    theirs = torch.nn.RNNCell(3, 4, nonlinearity=nonlinearity, dtype=torch.float64).to(device)
    theirs.load_state_dict(ours.state_dict())
    params = {name: p.detach() for name, p in ours.named_parameters()}
    xs, hs = randn(5, 2, 3, device=device), randn(5, 2, 4, device=device)

    def results(module):
        def loss(params, x, h):
            return functional_call(module, params, (x, h)).sin().sum()

        x, h = xs[0], hs[0]
        tangents = (x.cos(), h.cos())
        out = [
            grad(loss, argnums=(0, 1, 2))(params, x, h),
            jvp(lambda x, h: functional_call(module, params, (x, h)), (x, h), tangents),
            jacrev(lambda x: functional_call(module, params, (x, h)))(x),
            hessian(loss, argnums=2)(params, x, h),
        ]
        if module is ours:
            out.append(vmap(grad(loss), in_dims=(None, 0, 0))(params, xs, hs))
        else:
            out.append(looped(lambda x, h: grad(loss)(params, x, h), xs, hs))
        with fwAD.dual_level():
            h_dual = functional_call(module, params, (fwAD.make_dual(x, tangents[0]), h))
            out.append(fwAD.unpack_dual(h_dual).tangent.clone())
        return out

    torch.testing.assert_close(results(ours), results(theirs))
    x, h = xs[0].clone().requires_grad_(), hs[0].clone().requires_grad_()
    weights = [p.detach().clone().requires_grad_() for p in ours.parameters()]
    cell = lambda x, h, *w: rnn_ext.rnn_cell(x, h, *w, nonlinearity=nonlinearity)  # noqa: E731
    assert torch.autograd.gradcheck(
        cell, (x, h, *weights), check_batched_grad=True, check_forward_ad=True, check_batched_forward_grad=True
    )
    assert torch.autograd.gradgradcheck(cell, (x, h, *weights), check_batched_grad=True, check_fwd_over_rev=True)


def test_functionalize(case):
    def fn(run):
        return torch.func.functionalize(run)(case.params, case.x, case.hx)

    assert_same(case.both(fn))
