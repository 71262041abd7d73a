"""PyTorch's own test inputs for nn.RNN (module_db in torch.testing._internal.common_modules)
through rnn_ext.RNN: each check of tests/module_db_check.py in a process of its own, since
importing PyTorch's test helpers changes process-wide state."""
import os
import subprocess
import sys

import pytest

from reference import subprocess_env

CHECK = os.path.join(os.path.dirname(__file__), "module_db_check.py")


@pytest.mark.parametrize("check", ["samples", "gradcheck", "errors"])
def test_pytorch_module_db_inputs(check, device):
    pytest.importorskip("expecttest", reason="PyTorch's test helpers need expecttest: pip install expecttest")
    done = subprocess.run([sys.executable, CHECK, check, device], capture_output=True, text=True, timeout=600,
                          env=subprocess_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
