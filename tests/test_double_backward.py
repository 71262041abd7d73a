"""Gradients of gradients (create_graph=True): double backward, gradient penalties. nn.RNN has
them on the CPU (autograd through its per-step ops) but not with cuDNN; rnn_ext differentiates a
step-by-step rebuild of the layer when a graph of the gradients is asked for. On CUDA, nn.RNN is
compared with cuDNN turned off, where it too runs per-step ops."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from reference import make_pair, packed_batch, randn

CONFIGS = [
    dict(),
    dict(num_layers=2, bidirectional=True, nonlinearity="relu"),
    dict(bias=False, bidirectional=True, batch_first=True),
    dict(num_layers=2, bidirectional=True, batch_first=True),
    dict(num_layers=3, nonlinearity="tanh"),
]


def gradient_penalty_and_its_grads(module, x, hx):
    """loss = |d(sum output^2 + sum h_n) / d(input, hx)|^2 and the gradients of that loss."""
    output, h_n = module(x, hx)
    is_packed = isinstance(output, torch.nn.utils.rnn.PackedSequence)
    output, inputs = (output.data, x.data) if is_packed else (output, x)
    first = torch.autograd.grad(output.pow(2).sum() + h_n.sum(), [inputs, hx], create_graph=True)
    penalty = sum(g.pow(2).sum() for g in first)
    return [penalty, *first, *torch.autograd.grad(penalty, [inputs, hx, *module.parameters()])]


def make_hx(config, batch, hidden, device):
    directions = 2 if config.get("bidirectional") else 1
    return randn(config.get("num_layers", 1) * directions, batch, hidden, device=device, requires_grad=True)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_gradient_penalty_matches_nn_rnn(config, packed, device):
    torch.manual_seed(0)
    ours, theirs = make_pair(3, 4, device=device, **config)
    if packed:
        _, x = packed_batch([5, 2, 4], 3, batch_first=config.get("batch_first", False), device=device)
    else:
        shape = (3, 5, 3) if config.get("batch_first") else (5, 3, 3)
        x = randn(*shape, device=device, requires_grad=True)
    hx = make_hx(config, 3, 4, device)
    ours_result = gradient_penalty_and_its_grads(ours, x, hx)
    with torch.backends.cudnn.flags(enabled=False):  # cuDNN's nn.RNN has no double backward
        theirs_result = gradient_penalty_and_its_grads(theirs, x, hx)
    torch.testing.assert_close(ours_result, theirs_result)


def test_create_graph_gives_the_same_first_order_gradients(device):
    torch.manual_seed(0)
    ours, _ = make_pair(3, 5, device=device, num_layers=2, bidirectional=True)
    x = randn(6, 2, 3, device=device, requires_grad=True)
    output, h_n = ours(x)
    wrt = [x, *ours.parameters()]
    plain = torch.autograd.grad(output.sum() + h_n.sum(), wrt, retain_graph=True)
    with_graph = torch.autograd.grad(output.sum() + h_n.sum(), wrt, create_graph=True)
    torch.testing.assert_close(with_graph, plain)
    assert all(g.requires_grad for g in with_graph)


@pytest.mark.parametrize("config", CONFIGS[:4], ids=str)
def test_gradgradcheck_through_the_module(config, device):
    torch.manual_seed(0)
    ours, _ = make_pair(2, 3, device=device, **config)
    shape = (2, 3, 2) if config.get("batch_first") else (3, 2, 2)
    x = randn(*shape, device=device, requires_grad=True)
    hx = make_hx(config, 2, 3, device)
    params = list(ours.parameters())

    def run(x, hx, *weights):
        output, h_n = torch.func.functional_call(ours, dict(zip([n for n, _ in ours.named_parameters()], weights)), (x, hx))
        return output, h_n

    assert gradcheck(run, (x, hx, *params))
    assert gradgradcheck(run, (x, hx, *params))


def test_gradgradcheck_packed_bidirectional(device):
    torch.manual_seed(0)
    ours, _ = make_pair(2, 3, device=device, bidirectional=True)
    _, packed = packed_batch([3, 1, 2], 2, device=device)
    hx = make_hx(dict(bidirectional=True), 3, 3, device)
    names = [n for n, _ in ours.named_parameters()]

    def run(data, hx, *weights):
        x = type(packed)(data, *packed[1:])
        output, h_n = torch.func.functional_call(ours, dict(zip(names, weights)), (x, hx))
        return output.data, h_n

    assert gradgradcheck(run, (packed.data, hx, *ours.parameters()))
