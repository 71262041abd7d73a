"""The package as a user meets it after `pip install`: imported from the repository root (where an
unbuilt source tree shadows the installed package), the console command the install adds, and
the torch version it claims."""
import importlib
import importlib.machinery
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

import rnn_ext
from rnn_ext.bench import timing
from reference import subprocess_env

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(rnn_ext.__file__).resolve().parent  # the built package this process imported


def pyproject():
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


@pytest.fixture
def unbuilt_source_tree(tmp_path):
    """A copy of the package's Python files without the compiled extension, as in a fresh clone."""
    source = tmp_path / "checkout"
    for path in PACKAGE_DIR.rglob("*.py"):
        copy = source / "rnn_ext" / path.relative_to(PACKAGE_DIR)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, copy)
    return source


def run_python(args, cwd):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env=subprocess_env())


def test_unbuilt_source_tree_on_the_path_loads_the_built_package_instead(unbuilt_source_tree):
    # `python -c` and `python -m` put the current directory first on sys.path.
    script = ("import rnn_ext, torch; out, h = rnn_ext.RNN(2, 3)(torch.randn(4, 1, 2)); "
              "print(rnn_ext.__file__, tuple(out.shape), rnn_ext.ops.__file__)")
    result = run_python(["-c", script], cwd=unbuilt_source_tree)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.split()[0]).resolve() == PACKAGE_DIR / "__init__.py"
    assert "(4, 1, 3)" in result.stdout
    assert str(PACKAGE_DIR / "ops.py") in result.stdout  # the built copy's modules, not a mix


def test_benchmark_module_runs_from_an_unbuilt_source_tree(unbuilt_source_tree):
    result = run_python(["-m", "rnn_ext.benchmark", "--help"], cwd=unbuilt_source_tree)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: rnn-ext-benchmark")


def test_benchmark_module_runs_from_the_repository_root():
    # The README's commands run from the repository root: built in place there, or not.
    result = run_python(["-m", "rnn_ext.benchmark", "--help"], cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert "--markdown FILE" in result.stdout


def test_unbuilt_source_tree_with_no_built_copy_elsewhere_says_how_to_build(unbuilt_source_tree):
    # Hide every other copy: the search for one (an explicit path list) finds nothing.
    script = (
        "import importlib.machinery as machinery, torch\n"
        "find = machinery.PathFinder.find_spec\n"
        "def only_here(name, path=None, target=None):\n"
        "    return None if name == 'rnn_ext' and path is not None else find(name, path, target)\n"
        "machinery.PathFinder.find_spec = only_here\n"
        "import rnn_ext\n"
    )
    result = run_python(["-c", script], cwd=unbuilt_source_tree)
    assert result.returncode != 0
    assert "ImportError: rnn_ext's compiled extension rnn_ext._C is missing" in result.stderr
    assert "pip install --no-build-isolation ." in result.stderr and "build_ext --inplace" in result.stderr


def test_a_built_extension_that_does_not_load_says_so_not_that_it_is_missing(unbuilt_source_tree):
    # As after an upgrade of torch: the binary is there, but built against another torch (torch
    # 2.10 fails so on an undefined symbol of its C++ autograd API).
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    (unbuilt_source_tree / "rnn_ext" / f"_C{suffix}").write_bytes(b"not a shared library")
    result = run_python(["-c", "import rnn_ext"], cwd=unbuilt_source_tree)
    assert result.returncode != 0
    assert f"_C{suffix} does not load with torch {torch.__version__}" in result.stderr
    assert "rebuild it against this one" in result.stderr and "is missing" not in result.stderr


def test_console_command_is_the_benchmark(monkeypatch, capsys):
    target = pyproject()["project"]["scripts"]["rnn-ext-benchmark"]
    module_name, function_name = target.split(":")
    command = getattr(importlib.import_module(module_name), function_name)
    monkeypatch.setattr(timing, "PEAK_SIZE", 64)
    monkeypatch.setattr(sys, "argv", ["rnn-ext-benchmark", "--shapes", "2,3,4,5", "--rounds", "1", "--min-time", "0"])
    assert command() is None  # a console script's return value becomes its exit status
    assert "2,3,4,5,1,no" in capsys.readouterr().out


def setup_floor():
    (floor,) = re.findall(r'^MIN_TORCH = "(.+)"$', (REPO_ROOT / "setup.py").read_text(), re.M)
    return floor


def run_setup_py(snippet, **env):
    """setup.py run as pip runs it, after `snippet`, with setuptools.setup printing the
    extension's compile flags as JSON instead of building."""
    script = (
        "import json, runpy, setuptools, sys, torch\n"
        + snippet
        + "\nsetuptools.setup = lambda **kw: print(json.dumps(kw['ext_modules'][0].extra_compile_args))"
        "\nrunpy.run_path('setup.py', run_name='__main__')"
    )
    return subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=dict(os.environ, **env),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("allowed", [False, True], ids=["refused", "allowed"])
def test_setup_refuses_a_torch_below_the_floor_unless_told(allowed):
    major, minor = map(int, setup_floor().split("."))
    below = f"{major}.{minor - 1}.0"
    done = run_setup_py(f"torch.__version__ = torch.torch_version.TorchVersion('{below}')",
                        FORCE_CUDA="0", RNN_EXT_ALLOW_UNTESTED_TORCH="1" if allowed else "0")
    assert f"this environment has torch {below}" in done.stderr
    assert (done.returncode == 0) == allowed, done.stderr


def test_the_gpu_machines_torch_builds_without_the_override():
    # Its torch: 2.11.0+cu130 (the device tool's page). CI's oldest stage builds on that release.
    assert torch.torch_version.TorchVersion("2.11.0+cu130") >= setup_floor()
    assert "RNN_EXT_ALLOW_UNTESTED_TORCH" not in (REPO_ROOT / "scripts" / "gpu_check.sh").read_text()


@pytest.mark.parametrize("compiler", ["cxx", "nvcc"])
def test_build_names_its_cxx_standard_for_both_compilers(compiler):
    """torch's cpp_extension adds its own -std= only where none is given, and its default is
    C++17 before 2.13: the sources need C++20 on every torch."""
    if compiler == "nvcc" and (torch.version.cuda is None or cpp_extension.CUDA_HOME is None):
        pytest.skip("the CUDA kernels' flags need a CUDA build of torch and a CUDA toolkit")
    done = run_setup_py("", FORCE_CUDA="1" if compiler == "nvcc" else "0")
    assert done.returncode == 0, done.stderr
    flags = json.loads(done.stdout.strip().splitlines()[-1])[compiler]
    assert [f for f in flags if f.startswith("-std=")] == ["-std=c++20"]


def test_claimed_torch_floor_is_the_one_setup_checks_ci_tests_and_this_torch_meets_it():
    (dependency,) = [d for d in pyproject()["project"]["dependencies"] if d.startswith("torch")]
    floor = dependency.removeprefix("torch>=")
    assert floor == setup_floor()
    assert torch.__version__ >= floor
    oldest = (REPO_ROOT / ".ci" / "requirements-oldest.txt").read_text()
    assert re.search(rf"^torch=={re.escape(floor)}\.0$", oldest, re.M)  # CI tests the floor itself
    assert "requirements-oldest.txt" in (REPO_ROOT / ".ci" / "run").read_text()
