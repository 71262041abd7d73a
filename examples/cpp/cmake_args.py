"""Print the arguments CMake needs to find this Python's torch: ``cmake -S examples/cpp -B build/cpp $(python examples/cpp/cmake_args.py)``.

Always ``-DCMAKE_PREFIX_PATH`` (torch.utils.cmake_prefix_path, for find_package(Torch)). For a
CUDA build of torch, TorchConfig.cmake also looks for the CUDA toolkit and libnvrtc; pip's wheels
keep libnvrtc under site-packages/nvidia, where CMake does not look, so its path is given, along
with the toolkit at CUDA_HOME (nvcc), which such a build needs to configure at all.
"""
import glob
import os

import torch
import torch.utils


def cmake_args():
    args = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if torch.version.cuda is None:
        return args
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    if not os.path.exists(nvcc):
        raise SystemExit(
            f"torch {torch.__version__} is a CUDA build: find_package(Torch) needs the CUDA toolkit, "
            f"and there is no {nvcc}; set CUDA_HOME, or use a CPU-only torch"
        )
    args += [f"-DCUDAToolkit_ROOT={cuda_home}", f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}", f"-DCMAKE_CUDA_COMPILER={nvcc}"]
    site_packages = os.path.dirname(os.path.dirname(torch.__file__))
    nvrtc = sorted(glob.glob(os.path.join(site_packages, "nvidia", "*", "lib", "libnvrtc.so*")))
    if nvrtc:
        args.append(f"-DCUDA_NVRTC_LIB={nvrtc[0]}")
    return args


if __name__ == "__main__":
    print(" ".join(cmake_args()))
