"""Property-based parity with nn.RNN over drawn configurations, dense and packed, on every device."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence

from reference import assert_parity, make_pair, randn


@st.composite
def configurations(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return dict(
        num_layers=draw(st.integers(1, 3)),
        bidirectional=draw(st.booleans()),
        nonlinearity=draw(st.sampled_from(["tanh", "relu"])),
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        input_size=draw(st.integers(1, 9)),
        hidden_size=draw(st.integers(1, 40)),
        batch=draw(st.integers(1, 6)),
        lengths_max=draw(st.integers(1, 64)),
        packed=draw(st.booleans()),
        enforce_sorted=draw(st.booleans()),
        with_hx=draw(st.booleans()),
        dtype=dtype,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# The device fixture is the same for every example of a test run, so it may be function-scoped.
@settings(suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture])
@given(configurations())
def test_parity_with_nn_rnn(device, config):
    torch.manual_seed(config["seed"])
    dtype, batch, seq_len = config["dtype"], config["batch"], config["lengths_max"]
    module_kwargs = {k: config[k] for k in ("num_layers", "bidirectional", "nonlinearity", "bias", "batch_first")}
    ours, theirs = make_pair(config["input_size"], config["hidden_size"], dtype=dtype, device=device, **module_kwargs)
    directions = 2 if config["bidirectional"] else 1
    state_shape = (config["num_layers"] * directions, batch, config["hidden_size"])
    hx = randn(*state_shape, dtype=dtype, device=device, requires_grad=True) if config["with_hx"] else None

    shape = (batch, seq_len, config["input_size"]) if config["batch_first"] else (seq_len, batch, config["input_size"])
    x = randn(*shape, dtype=dtype, device=device)
    if config["packed"]:
        lengths = torch.randint(1, seq_len + 1, (batch,))
        if config["enforce_sorted"]:
            lengths = lengths.sort(descending=True).values
        packed = pack_padded_sequence(x, lengths, batch_first=config["batch_first"],
                                      enforce_sorted=config["enforce_sorted"])
        x = type(packed)(packed.data.requires_grad_(), *packed[1:])
        out_shape = (x.data.shape[0], directions * config["hidden_size"])
    else:
        x.requires_grad_()
        out_shape = shape[:2] + (directions * config["hidden_size"],)
    grad_output = randn(*out_shape, dtype=dtype, device=device)
    grad_h_n = randn(*state_shape, dtype=dtype, device=device)

    assert_parity(ours, theirs, x, hx, grad_output, grad_h_n)

