"""Builds rnn_ext._C: the CPU kernels always, the CUDA kernels when FORCE_CUDA=1 or a GPU is visible.

Environment:
  FORCE_CUDA=1            build the CUDA kernels even without a visible GPU (CI, build boxes)
  TORCH_CUDA_ARCH_LIST    GPU architectures to compile for, e.g. "8.0;9.0" (needed without a GPU)
  CUDA_HOME               CUDA toolkit root (e.g. /usr/local/cuda)
  DEBUG=1                 -O0 -g instead of -O3
  SANITIZE=1              AddressSanitizer + UndefinedBehaviorSanitizer (CPU sources; use with DEBUG=1)
  MAX_JOBS                parallel compile jobs (honoured by torch's ninja build)
  RNN_EXT_ALLOW_UNTESTED_TORCH=1   build on a torch older than MIN_TORCH anyway (untested)
"""
import glob
import os
import site
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

# The oldest torch built and tested in CI (.ci/run's oldest stage); pyproject.toml's dependency
# says the same.
MIN_TORCH = "2.11"

# The C++ standard the sources are written in, named for both compilers. torch's cpp_extension
# adds its own default only where no -std= flag is given, and that default differs by release
# (-std=c++17 on 2.11, -std=c++20 on 2.14), so the build must not lean on it.
CXX_STANDARD = "-std=c++20"


def check_torch_version():
    """Refuses a torch below the tested floor, unless RNN_EXT_ALLOW_UNTESTED_TORCH=1 (to try an
    older one, at the user's risk)."""
    if torch.__version__ >= MIN_TORCH:
        return
    message = f"rnn_ext needs torch>={MIN_TORCH}; this environment has torch {torch.__version__}"
    if not env_flag("RNN_EXT_ALLOW_UNTESTED_TORCH"):
        sys.exit(f"{message} (RNN_EXT_ALLOW_UNTESTED_TORCH=1 builds anyway, untested)")
    print(f"warning: {message}; building anyway (RNN_EXT_ALLOW_UNTESTED_TORCH=1)", file=sys.stderr)


def env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def want_cuda():
    if env_flag("FORCE_CUDA"):
        if torch.version.cuda is None:
            sys.exit("FORCE_CUDA=1 needs a CUDA build of torch; this torch is CPU-only")
        return True
    return torch.cuda.is_available() and torch.version.cuda is not None


def pip_cuda_include_dirs():
    """Headers of pip-installed CUDA libraries (cublas_v2.h, cusparse.h, ...), which
    ATen/cuda/CUDAContext.h includes but a bare toolkit may lack."""
    roots = site.getsitepackages() + [site.getusersitepackages()]
    roots.append(os.path.dirname(os.path.dirname(torch.__file__)))
    found = []
    for root in roots:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            for path in sorted(glob.glob(os.path.join(root, pattern))):
                if os.path.isdir(path) and path not in found:
                    found.append(path)
    return found


def cublas_link_args():
    """Links cuBLAS, which the CUDA kernels call directly: libtorch_cuda does not export ATen's
    at::cuda::blas::gemm to extensions. Takes the copy torch loads (pip's nvidia/*/lib) before the
    toolkit's; either records the soname libcublas.so.N, already loaded once torch is imported."""
    dirs = [os.path.join(os.path.dirname(inc), "lib") for inc in pip_cuda_include_dirs()]
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    dirs += [os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")]
    for path in dirs:
        libs = sorted(glob.glob(os.path.join(path, "libcublas.so*")), key=len)
        if libs:
            return ["-L" + path, "-l:" + os.path.basename(libs[0])]
    sys.exit("FORCE_CUDA build: no libcublas.so* found under pip's nvidia/*/lib or $CUDA_HOME/lib64")


def extension():
    debug = env_flag("DEBUG")
    sanitize = env_flag("SANITIZE")
    cxx_flags = [CXX_STANDARD] + (["-O0", "-g"] if debug else ["-O3"])
    # -fopenmp: at::parallel_for is an inline template whose `#pragma omp parallel` is compiled
    # into this extension; without the flag it silently runs on one thread.
    cxx_flags += ["-ffp-contract=fast", "-fvisibility=hidden", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if sanitize:
        cxx_flags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
        link_flags += ["-fsanitize=address,undefined"]

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    kwargs = dict(
        name="rnn_ext._C",
        sources=sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
        py_limited_api=False,
    )
    if not want_cuda():
        return CppExtension(**kwargs)

    kwargs["sources"] += sorted(glob.glob("csrc/cuda/*.cu"))
    kwargs["extra_compile_args"]["nvcc"] = [CXX_STANDARD] + (["-O0", "-g"] if debug else ["-O3"])
    kwargs["include_dirs"] = pip_cuda_include_dirs()
    kwargs["define_macros"] = [("RNN_EXT_WITH_CUDA", "1")]
    kwargs["extra_link_args"] = link_flags + cublas_link_args()
    return CUDAExtension(**kwargs)


check_torch_version()
setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
