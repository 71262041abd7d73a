import torch

import rnn_ext


def pytest_report_header(config):
    return [
        f"rnn_ext {rnn_ext.__version__} from {rnn_ext.__file__}",
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"CPU kernels: {rnn_ext.cpu_isa()}, CUDA kernels built: {rnn_ext.cuda_kernels_built()}, GPU visible: {torch.cuda.is_available()}",
    ]


# Hypothesis profiles: "ci" (default, a few minutes at most) and "long" (run by hand:
# pytest tests/test_property.py --hypothesis-profile=long).
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("long", max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")
