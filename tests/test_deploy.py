"""Leaving Python: torch.jit.trace, torch.export with a dynamic batch and time, an AOTInductor
package run in a fresh process, and the C++ program of examples/cpp (ONNX is in test_onnx.py)."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import rnn_ext  # noqa: F401  (registers the ops)
from reference import eval_pair, subprocess_env

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "cpp"
INPUT, HIDDEN = 4, 5
CONFIG = dict(num_layers=2, bidirectional=True, batch_first=True)


def batch_first_inputs(batch, steps):
    """x [B, T, I] and hx for CONFIG's 2 layers x 2 directions."""
    return torch.randn(batch, steps, INPUT), torch.randn(4, batch, HIDDEN)


def test_jit_trace_save_load_runs_other_sizes(tmp_path):
    ours, reference = eval_pair(INPUT, HIDDEN, **CONFIG)
    traced = torch.jit.trace(ours, batch_first_inputs(3, 6))
    traced.save(str(tmp_path / "rnn.pt"))
    loaded = torch.jit.load(str(tmp_path / "rnn.pt"))
    for batch, steps in [(2, 9), (5, 4)]:
        x, hx = batch_first_inputs(batch, steps)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x, hx), reference(x, hx))


def test_export_dynamic_batch_and_time_runs_other_sizes():
    """The exported graph keeps one rnn_layer per layer and both axes symbolic (nn.RNN's
    decomposition unrolls time instead, fixing it to the example's length)."""
    ours, reference = eval_pair(INPUT, HIDDEN, **CONFIG)
    batch, time = torch.export.Dim("batch", min=1), torch.export.Dim("time", min=1)
    program = torch.export.export(ours, batch_first_inputs(3, 6), dynamic_shapes=({0: batch, 1: time}, {1: batch}))
    layer_calls = [n for n in program.graph.nodes if n.target == torch.ops.rnn_ext.rnn_layer.default]
    assert len(layer_calls) == 2
    for size in [(2, 9), (5, 1)]:
        x, hx = batch_first_inputs(*size)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x, hx), reference(x, hx))


def run_python(*args, cwd):
    """python ARGS in a fresh interpreter; fails the test with its stderr if it fails."""
    result = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                            env=subprocess_env())
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """examples/cpp/export_model.py run in its own process: rnn.pt2 (AOTInductor, batch and time
    dynamic), inputs.pt at other sizes, and expected.pt, the model's outputs on them in eager mode."""
    out = tmp_path_factory.mktemp("aoti")
    run_python(EXAMPLE / "export_model.py", out, cwd=out)
    return out


def test_aoti_package_runs_in_a_fresh_process(package):
    run_python(
        "-c",
        "import sys, torch, rnn_ext\n"
        "model = torch._inductor.aoti_load_package(sys.argv[1] + '/rnn.pt2')\n"
        "torch.save(tuple(model(*torch.load(sys.argv[1] + '/inputs.pt'))), sys.argv[1] + '/python-outputs.pt')\n",
        package, cwd=package,
    )
    outputs = torch.load(package / "python-outputs.pt")
    torch.testing.assert_close(outputs, tuple(torch.load(package / "expected.pt")))


def test_aoti_package_without_rnn_ext_names_the_missing_op(package):
    """The package calls the op by name: a process that has not imported rnn_ext says which."""
    result = subprocess.run(
        [sys.executable, "-c", "import sys, torch; torch._inductor.aoti_load_package(sys.argv[1])", package / "rnn.pt2"],
        capture_output=True, text=True, env=subprocess_env(),
    )
    assert result.returncode != 0 and "rnn_ext::rnn_layer" in result.stderr


def cmake_or_skip():
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("building the C++ example needs cmake (pip install cmake)")
    return cmake


def test_cpp_program_runs_the_package_without_python(package, tmp_path):
    """examples/cpp built with CMake against this torch, linking the plain op library it builds
    from csrc/ (no Python), runs the package; its outputs equal Python's."""
    cmake = cmake_or_skip()
    build = tmp_path / "build"
    args = run_python(EXAMPLE / "cmake_args.py", cwd=tmp_path).stdout.split()
    env = subprocess_env(MAKEFLAGS=f"-j{os.cpu_count() or 1}")
    for command in ([cmake, "-S", EXAMPLE, "-B", build, *args], [cmake, "--build", build]):
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    program = build / "run_rnn"
    assert "libpython" not in subprocess.run(["ldd", program], capture_output=True, text=True).stdout

    result = subprocess.run([program, package / "rnn.pt2", package / "inputs.pt", tmp_path / "outputs.pt"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "output 0: [3, 13, 3]" in result.stdout and "output 1: [4, 3, 16]" in result.stdout
    outputs = torch.load(tmp_path / "outputs.pt")
    torch.testing.assert_close(outputs, tuple(torch.load(package / "expected.pt")))
