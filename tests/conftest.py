import torch

import rnn_ext


def pytest_report_header(config):
    return [
        f"rnn_ext {rnn_ext.__version__} from {rnn_ext.__file__}",
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"CUDA kernels built: {rnn_ext.cuda_kernels_built()}, GPU visible: {torch.cuda.is_available()}",
    ]
