"""Training code that reaches into nn.RNN / nn.RNNCell behaves the same with rnn_ext's: isinstance,
in-place changes to outputs, what backward saves, ``_flat_weights``, FX, FLOP counts, TorchScript,
and the errors for missing weights. Each idiom runs on both modules with the same weights."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune
from torch.nn.utils.rnn import PackedSequence
from torch.utils.flop_counter import FlopCounterMode

import rnn_ext
from reference import make_pair, packed_batch, pipeline, randn


def cell_pair(input_size, hidden_size, **kwargs):
    """(rnn_ext.RNNCell, nn.RNNCell) with identical float64 weights."""
    ours = rnn_ext.RNNCell(input_size, hidden_size, dtype=torch.float64, **kwargs)
    theirs = nn.RNNCell(input_size, hidden_size, dtype=torch.float64, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def grads_of(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


# -- isinstance ---------------------------------------------------------------------------------


def test_isinstance_of_torch_nn_classes():
    assert isinstance(rnn_ext.RNN(3, 4), nn.RNN) and isinstance(rnn_ext.RNN(3, 4), nn.RNNBase)
    assert isinstance(rnn_ext.RNNCell(3, 4), nn.RNNCell) and isinstance(rnn_ext.RNNCell(3, 4), nn.RNNCellBase)


def test_init_code_that_selects_by_isinstance_reaches_our_modules():
    """The silent failure this prevents: init code skipping rnn_ext's modules."""

    def init_recurrent(model):
        for m in model.modules():
            if isinstance(m, (nn.RNN, nn.LSTM, nn.GRU)):
                nn.init.orthogonal_(m.weight_hh_l0)
                nn.init.zeros_(m.bias_hh_l0)
            elif isinstance(m, nn.RNNCell):
                nn.init.eye_(m.weight_hh)

    models = []
    for module in (rnn_ext, nn):
        torch.manual_seed(0)
        model = nn.ModuleDict({"rnn": module.RNN(3, 5, num_layers=2), "cell": module.RNNCell(3, 5)})
        init_recurrent(model)
        models.append(model)
    ours, theirs = models
    torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), rtol=0, atol=0)
    assert torch.equal(ours["cell"].weight_hh, torch.eye(5))


# -- in-place changes to the outputs before backward -----------------------------------------------

# Each takes (output, h_n, generator seed) and changes them in place, as training code does.
IN_PLACE = {
    "out += residual": lambda out, h, x: out.add_(torch.ones_like(out) * 0.5),
    "out.mul_(mask)": lambda out, h, x: out.mul_((torch.arange(out.numel()).view_as(out) % 3 != 0).to(out.dtype)),
    "F.dropout(inplace)": lambda out, h, x: F.dropout(out, 0.5, training=True, inplace=True),
    "nn.ReLU(inplace)": lambda out, h, x: nn.ReLU(inplace=True)(out),
    "out[:, 0] = 0": lambda out, h, x: out.__setitem__((slice(None), 0), 0),
    "out.masked_fill_": lambda out, h, x: out.masked_fill_(out > 0.2, 0),
    "out.data.masked_fill_": lambda out, h, x: out.data.masked_fill_(out.data > 0.2, 0),
    "h_n.mul_": lambda out, h, x: h.mul_(3),
    "h_n.data.zero_": lambda out, h, x: h.data.zero_(),
}


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("idiom", IN_PLACE)
def test_in_place_changes_to_outputs_as_nn_rnn(idiom, bidirectional, batch_first, layers):
    torch.manual_seed(0)
    ours, theirs = make_pair(3, 4, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
    x = randn(5, 2, 3, requires_grad=True)
    results = []
    for module in (ours, theirs):
        out, h_n = module(x)
        assert not out._is_view() and out.stride() == theirs(x)[0].stride()
        torch.manual_seed(1)  # the same dropout mask on both sides
        IN_PLACE[idiom](out, h_n, x)
        loss = (out * out.detach().cos()).sum() + (h_n * 0.3).sum()
        results.append((out, h_n, grads_of(loss, [x, *module.parameters()])))
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("batch_first", [False, True])
def test_output_is_not_a_view_and_detach_in_place_works(batch_first):
    torch.manual_seed(0)
    ours, theirs = make_pair(3, 4, num_layers=2, batch_first=batch_first)
    x = randn(2, 5, 3, requires_grad=True)
    for module in (ours, theirs):
        out, h_n = module(x)
        assert not out._is_view() and out.stride() == theirs(x)[0].stride()
        out.detach_()
        assert not out.requires_grad
    with torch.no_grad():  # outside autograd: the same values and layout, without a copy
        (out, _), (expected, _) = ours(x), theirs(x)
        torch.testing.assert_close(out, expected)
        assert out.stride() == expected.stride()


def test_in_place_change_to_a_packed_output():
    torch.manual_seed(0)
    ours, theirs = make_pair(3, 4, num_layers=2)
    _, packed = packed_batch([5, 2, 4], 3)
    results = []
    for module in (ours, theirs):
        out, h_n = module(packed)
        out.data.mul_(2)  # PackedSequence.data, in place
        loss = (out.data * out.data.detach().sin()).sum() + h_n.sum()
        results.append((out.data, grads_of(loss, [packed.data, *module.parameters()])))
    torch.testing.assert_close(results[0], results[1])


def test_functional_rnn_output_is_its_own_tensor():
    torch.manual_seed(0)
    ours, _ = make_pair(3, 4)
    x = randn(5, 2, 3, requires_grad=True)
    scale = randn(5, 2, 4)  # a loss whose own backward reads none of the output
    out, _ = rnn_ext.rnn(x, None, ours._flat_weights)
    expected = grads_of((out * scale).sum(), [x])
    out2, _ = rnn_ext.rnn(x, None, ours._flat_weights)
    loss = (out2 * scale).sum()
    out2.data.zero_()  # the layer's backward reads its own copy of the states
    torch.testing.assert_close(grads_of(loss, [x]), expected)


# -- saved for backward: only what the requested gradients read -----------------------------------


def change_in_place(tensor):
    with torch.no_grad():
        tensor.mul_(0.5)


@pytest.mark.parametrize("changed", ["weight_ih_l0", "bias_ih_l0", "bias_hh_l0"])
def test_layer_weight_changed_after_forward_when_backward_does_not_read_it(changed):
    """Input without a gradient: backward never reads W_ih (nor ever the biases), as with nn.RNN."""
    torch.manual_seed(0)
    ours, theirs = make_pair(3, 4, num_layers=2, bidirectional=True)
    x = randn(5, 2, 3)
    results = []
    for module in (ours, theirs):
        out, h_n = module(x)
        change_in_place(getattr(module, changed))
        results.append(grads_of(out.sum() + h_n.sum(), list(module.parameters())))
    torch.testing.assert_close(results[0], results[1])


def test_layer_weight_backward_reads_still_refuses_a_change():
    torch.manual_seed(0)
    x = randn(5, 2, 3, requires_grad=True)
    for module in make_pair(3, 4):
        out, _ = module(x)
        change_in_place(module.weight_hh_l0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()
        out, _ = module(x)
        change_in_place(module.weight_ih_l0)  # the input's gradient reads it
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def test_layer_input_changed_after_forward_with_frozen_weights():
    torch.manual_seed(0)
    ours, theirs = make_pair(3, 4)
    hx, inputs = randn(1, 2, 4, requires_grad=True), [randn(5, 2, 3) for _ in range(2)]
    inputs[1].copy_(inputs[0])
    results = []
    for module, x in zip((ours, theirs), inputs):
        module.requires_grad_(False)
        out, _ = module(x, hx)
        change_in_place(x)
        results.append(grads_of(out.sum(), [hx]))
    torch.testing.assert_close(results[0], results[1])


def test_create_graph_refuses_a_weight_changed_after_forward():
    """create_graph=True differentiates the layer again from all its arguments: a change to one the
    first gradients do not read is refused there, loudly, not used."""
    torch.manual_seed(0)
    ours, _ = make_pair(3, 4)
    out, _ = ours(randn(5, 2, 3))
    change_in_place(ours.weight_ih_l0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation.*create_graph=True"):
        torch.autograd.grad(out.sum(), [ours.weight_hh_l0], create_graph=True)


def test_create_graph_without_changes_still_matches_nn_rnn():
    torch.manual_seed(0)
    ours, theirs = make_pair(3, 4)
    x = randn(5, 2, 3)
    results = []
    for module in (ours, theirs):
        out, _ = module(x)
        (grad,) = torch.autograd.grad(out.pow(2).sum(), [module.weight_hh_l0], create_graph=True)
        results.append(grads_of(grad.pow(2).sum(), [module.weight_ih_l0, module.weight_hh_l0]))
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize(
    "changed, needs",
    [("weight_hh", "input"), ("weight_ih", "hx"), ("bias_ih", "input"), ("bias_hh", "hx")],
)
def test_cell_weight_changed_after_forward_when_backward_does_not_read_it(changed, needs):
    torch.manual_seed(0)
    x, hx = randn(2, 3, requires_grad=needs == "input"), randn(2, 4, requires_grad=needs == "hx")
    results = []
    for module in cell_pair(3, 4):
        module.requires_grad_(False)
        h = module(x, hx)
        change_in_place(getattr(module, changed))
        results.append(grads_of(h.sum(), [x if needs == "input" else hx]))
    torch.testing.assert_close(results[0], results[1])


def test_cell_input_changed_after_forward_with_frozen_weights():
    torch.manual_seed(0)
    hx, inputs = randn(2, 4, requires_grad=True), [randn(2, 3) for _ in range(2)]
    inputs[1].copy_(inputs[0])
    results = []
    for module, x in zip(cell_pair(3, 4), inputs):
        module.requires_grad_(False)
        h = module(x, hx)
        change_in_place(x)
        results.append(grads_of(h.sum(), [hx]))
    torch.testing.assert_close(results[0], results[1])


def test_cell_weight_backward_reads_still_refuses_a_change():
    torch.manual_seed(0)
    for module in cell_pair(3, 4):
        h = module(randn(2, 3), randn(2, 4, requires_grad=True))
        change_in_place(module.weight_hh)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            h.sum().backward()


# -- _flat_weights, weight drop, deleted weights, old pickles ----------------------------------------


def test_flat_weights_is_an_assignable_list_kept_in_sync():
    ours, theirs = make_pair(3, 4, num_layers=2)
    for module in (ours, theirs):
        assert type(module._flat_weights) is list
        new = nn.Parameter(torch.zeros(4, 4, dtype=torch.float64))
        module.weight_hh_l1 = new
        assert module._flat_weights[module._flat_weights_names.index("weight_hh_l1")] is new
    x = randn(5, 2, 3)
    torch.testing.assert_close(ours(x), theirs(x))


def drop_connect(base):
    """A DropConnect subclass, as training code writes one: it assigns ``_flat_weights`` around
    ``super().forward()``."""

    class DropConnect(base):
        def forward(self, input, hx=None):
            kept = self._flat_weights
            torch.manual_seed(2)
            self._flat_weights = [F.dropout(w, 0.5, self.training) if "weight_hh" in name else w
                                  for name, w in zip(self._flat_weights_names, kept)]
            try:
                return super().forward(input, hx)
            finally:
                self._flat_weights = kept

    return DropConnect


def test_drop_connect_subclass_assigning_flat_weights():
    torch.manual_seed(0)
    ours = drop_connect(rnn_ext.RNN)(3, 4, num_layers=2, dtype=torch.float64)
    theirs = drop_connect(nn.RNN)(3, 4, num_layers=2, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    x = randn(5, 2, 3)
    results = []
    for module in (ours, theirs):
        out, h_n = module(x)
        results.append((out, h_n, grads_of(out.sum(), list(module.parameters()))))
    torch.testing.assert_close(results[0], results[1])
    with torch.no_grad():  # the dropped weights were used: not the plain forward
        assert not torch.allclose(results[0][0], rnn_ext.RNN.forward(ours, x)[0])


class WeightDrop(nn.Module):
    """The AWD-LSTM wrapper: the raw weight is the parameter, the module's weight a dropped copy set
    as a plain attribute before each forward."""

    def __init__(self, module, name="weight_hh_l0", p=0.5):
        super().__init__()
        self.module, self.name, self.p = module, name, p
        raw = getattr(module, name)
        del module._parameters[name]
        self.register_parameter(name + "_raw", nn.Parameter(raw.data))

    def forward(self, *args):
        torch.manual_seed(3)
        setattr(self.module, self.name, F.dropout(getattr(self, self.name + "_raw"), self.p, self.training))
        return self.module(*args)


def test_weight_drop_wrapper():
    torch.manual_seed(0)
    ours, theirs = (WeightDrop(m) for m in make_pair(3, 4))
    x = randn(5, 2, 3, requires_grad=True)
    results = []
    for model in (ours, theirs):
        out, h_n = model(x)
        results.append((out, grads_of(out.sum(), [x, *model.parameters()])))
    torch.testing.assert_close(results[0], results[1])


def orthogonal_hh(module):
    nn.utils.parametrizations.orthogonal(module, "weight_hh_l0")
    return module


def pruned_hh(module):
    prune.l1_unstructured(module, "weight_hh_l0", amount=0.5)
    return module


@pytest.mark.parametrize("change", [orthogonal_hh, pruned_hh], ids=["parametrized", "pruned"])
def test_weights_replaced_by_torch_utilities(change):
    """Parametrizations and pruning replace a weight without __setattr__ or through a pre-hook:
    forward picks the new one up, as nn.RNN's does."""
    torch.manual_seed(0)
    ours, theirs = make_pair(3, 4, num_layers=2)
    ours, theirs = change(ours), change(theirs)
    theirs.load_state_dict(ours.state_dict())
    x = randn(5, 2, 3, requires_grad=True)
    results = []
    for module in (ours, theirs):
        out, h_n = module(x)
        results.append((out, h_n, grads_of(out.pow(2).sum(), [x, *module.parameters()])))
    torch.testing.assert_close(results[0], results[1])


def test_functional_call_swaps_weights():
    torch.manual_seed(0)
    ours, theirs = make_pair(3, 4)
    params = {name: torch.randn_like(p) for name, p in ours.named_parameters()}
    x = randn(5, 2, 3)
    expected = torch.func.functional_call(theirs, params, (x,))
    torch.testing.assert_close(torch.func.functional_call(ours, params, (x,)), expected)
    torch.testing.assert_close(ours(x), theirs(x))  # and back to the module's own weights


def test_deleted_weight_raises_attribute_error_naming_it():
    for module in (rnn_ext.RNN(3, 4), rnn_ext.RNNCell(3, 4)):
        name = "bias_ih_l0" if isinstance(module, nn.RNN) else "bias_ih"
        delattr(module, name)
        with pytest.raises(AttributeError, match=f"'{name}'"):
            module(torch.randn(2, 3) if isinstance(module, nn.RNNCell) else torch.randn(5, 2, 3))


def test_old_format_state_sets_up_as_nn_rnn():
    """A module pickled before nn.RNN had _flat_weights_names: its __dict__ holds all_weights as tensors."""
    torch.manual_seed(0)
    ours, theirs = make_pair(3, 4, num_layers=2, bidirectional=True)
    x = randn(5, 2, 3)
    restored = []
    for module in (ours, theirs):
        state = copy.deepcopy(module).__dict__
        state["all_weights"] = [[state["_parameters"][name] for name in names] for names in state.pop("_all_weights")]
        for key in ("_flat_weights_names", "_flat_weights", "_flat_weight_refs"):
            state.pop(key)
        fresh = type(module).__new__(type(module))
        fresh.__setstate__(state)
        restored.append(fresh(x))
    torch.testing.assert_close(restored[0], restored[1])
    torch.testing.assert_close(restored[0], theirs(x))


# -- FX ----------------------------------------------------------------------------------------------


class Tagger(nn.Module):
    def __init__(self, recurrent):
        super().__init__()
        self.rnn = recurrent.RNN(3, 4, num_layers=2, bidirectional=True, batch_first=True, dtype=torch.float64)
        self.head = nn.Linear(8, 2, dtype=torch.float64)

    def forward(self, x, hx):
        out, h_n = self.rnn(x, hx)
        return self.head(torch.relu(out)), h_n.sum(0)


class CellLoop(nn.Module):
    def __init__(self, recurrent):
        super().__init__()
        self.cell = recurrent.RNNCell(3, 4, nonlinearity="relu", dtype=torch.float64)

    def forward(self, x):
        h = x.new_zeros((x.shape[1], 4))
        for t in range(4):
            h = self.cell(x[t], h)
        return h


@pytest.mark.parametrize("model_class, args", [(Tagger, ((2, 5, 3), (4, 2, 4))), (CellLoop, ((4, 2, 3),))])
def test_fx_symbolic_trace_records_a_call_of_the_module(model_class, args):
    torch.manual_seed(0)
    ours = model_class(rnn_ext)
    theirs = model_class(nn)
    theirs.load_state_dict(ours.state_dict())
    traced = torch.fx.symbolic_trace(ours)
    expected_calls = [n.target for n in torch.fx.symbolic_trace(theirs).graph.nodes if n.op == "call_module"]
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == expected_calls
    inputs = [randn(*shape, requires_grad=True) for shape in args]
    results = []
    for model in (traced, ours, theirs):
        result = model(*inputs)
        results.append((result, grads_of(sum(r.pow(2).sum() for r in torch.utils._pytree.tree_leaves(result)),
                                         [*inputs, *model.parameters()])))
    torch.testing.assert_close(results[0], results[1])
    torch.testing.assert_close(results[0], results[2])


def test_fx_symbolic_trace_of_the_module_itself_says_what_to_do():
    with pytest.raises(torch.fx.proxy.TraceError, match="trace a module that holds it"):
        torch.fx.symbolic_trace(rnn_ext.RNN(3, 4))


# -- FLOP counts ---------------------------------------------------------------------------------------


def flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def forward_and_backward_flops(run, loss_of):
    """FLOPs FlopCounterMode counts for run() and for the backward of loss_of(run())."""
    forward = flops(run)
    result = run()
    backward = flops(lambda: loss_of(result).backward())
    return forward, backward


def layer_loss(result):
    output, h_n = result
    return (output.data if isinstance(output, PackedSequence) else output).sum() + h_n.sum()


@pytest.mark.parametrize("layers, bidirectional", [(1, False), (2, True)])
@pytest.mark.parametrize("batch", ["dense", "packed"])
@pytest.mark.parametrize("grads", ["all", "weights", "input", "hx"])
def test_flop_counts_match_nn_rnn(layers, bidirectional, batch, grads):
    torch.manual_seed(0)
    counts = []
    for module in make_pair(3, 5, num_layers=layers, bidirectional=bidirectional):
        module.requires_grad_(grads in ("all", "weights"))
        x = randn(6, 4, 3, requires_grad=grads in ("all", "input"))
        if batch == "packed":
            _, x = packed_batch([6, 2, 5, 1], 3)
            x.data.requires_grad_(grads in ("all", "input"))
        hx = randn(layers * (2 if bidirectional else 1), 4, 5, requires_grad=grads in ("all", "hx"))
        counts.append(forward_and_backward_flops(lambda: module(x, hx), layer_loss))
    assert counts[0] == counts[1] and counts[0][0] > 0


def test_flop_counts_with_lengths_match_nn_rnn_on_the_packed_batch():
    torch.manual_seed(0)
    ours, theirs = make_pair(3, 5, num_layers=2, bidirectional=True)
    lengths = [6, 0, 5, 1]
    x = randn(6, 4, 3, requires_grad=True)
    ours_counts = forward_and_backward_flops(lambda: ours(x, lengths=torch.tensor(lengths)), layer_loss)
    real = [i for i, n in enumerate(lengths) if n > 0]  # nn.RNN cannot take a length of 0
    theirs_counts = forward_and_backward_flops(
        lambda: pipeline(theirs, x[:, real], None, [lengths[i] for i in real]), layer_loss)
    assert ours_counts == theirs_counts


@pytest.mark.parametrize("grads", ["all", "weights", "input", "hx"])
def test_cell_flop_counts_match_nn_rnn_cell(grads):
    torch.manual_seed(0)
    counts = []
    for module in cell_pair(3, 5):
        module.requires_grad_(grads in ("all", "weights"))
        x, hx = randn(4, 3, requires_grad=grads in ("all", "input")), randn(4, 5, requires_grad=grads in ("all", "hx"))
        counts.append(forward_and_backward_flops(lambda: module(x, hx), lambda h: h.sum()))
    assert counts[0] == counts[1] and counts[0][0] > 0


# -- TorchScript -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_class", [Tagger, CellLoop])
def test_torchscript_refuses_clearly_and_trace_works(model_class):
    torch.manual_seed(0)
    model = model_class(rnn_ext)
    with pytest.raises(RuntimeError, match="does not support TorchScript.*torch.export.export and torch.jit.trace"):
        torch.jit.script(model)
    inputs = (randn(2, 5, 3), randn(4, 2, 4)) if model_class is Tagger else (randn(4, 2, 3),)
    traced = torch.jit.trace(model, inputs, check_trace=False)
    torch.testing.assert_close(traced(*inputs), model(*inputs))
