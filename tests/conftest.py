import pytest
import torch

import rnn_ext


def pytest_report_header(config):
    return [
        f"rnn_ext {rnn_ext.__version__} from {rnn_ext.__file__}",
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"CPU kernels: {rnn_ext.cpu_isa()}, CUDA kernels built: {rnn_ext.cuda_kernels_built()}, GPU visible: {torch.cuda.is_available()}",
    ]


# Every device the kernels run on. A test of a shared suite takes the `device` fixture and runs
# once per device (ids [cpu], [cuda]); without a GPU the cuda variants are collected and skipped.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
    ),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 parity is with IEEE float32 on both sides: TF32 off for cuBLAS and cuDNN (nn.RNN on
    CUDA runs cuDNN) in every test, and the flags restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# Hypothesis profiles: "ci" (default, a few minutes at most) and "long" (run by hand:
# pytest tests/test_property.py --hypothesis-profile=long).
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("long", max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")
