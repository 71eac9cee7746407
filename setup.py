"""Builds pyzsl._C from csrc/: the C++ CPU kernels always, the CUDA kernels when they can be compiled.

Environment switches (printed at build time):
  FORCE_CUDA=1            build the CUDA kernels even when no GPU is visible
  FORCE_ONLY_CPU=1        never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST    CUDA architectures; setting it also asks for the CUDA kernels (default "8.0;9.0")
  CUDA_HOME               CUDA toolkit (default /usr/local/cuda when it exists)
  DEBUG=1                 -O0 -g instead of -O3
"""
import glob
import os
import sys

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _nvidia_include_dirs():
    """ATen's CUDA headers include cusparse.h and friends, which the pip wheels ship under nvidia/*/include."""
    dirs = []
    for entry in sys.path:
        dirs += glob.glob(os.path.join(entry, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(entry, "nvidia", "cusparse", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def _decide_cuda():
    """Returns (build_cuda, reason)."""
    if _flag("FORCE_ONLY_CPU"):
        return False, "FORCE_ONLY_CPU=1"
    if torch.version.cuda is None:
        return False, "the installed torch has no CUDA"
    asked = _flag("FORCE_CUDA") or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    if not (torch.cuda.is_available() or asked):
        return False, "no GPU visible and neither FORCE_CUDA nor TORCH_CUDA_ARCH_LIST is set"
    if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    # torch.utils.cpp_extension reads CUDA_HOME at import time, so set its module attribute too.
    cpp_extension.CUDA_HOME = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME
    if cpp_extension.CUDA_HOME is None or not os.path.isdir(cpp_extension.CUDA_HOME):
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # Without a GPU torch cannot guess the architecture and fails with an IndexError.
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    return True, "GPU visible" if torch.cuda.is_available() else "asked for (FORCE_CUDA / TORCH_CUDA_ARCH_LIST)"


def _uses_openmp():
    info = torch.__config__.parallel_info()
    return "backend: OpenMP" in info and "OpenMP not found" not in info and sys.platform != "darwin"


def make_extension():
    build_cuda, why = _decide_cuda()
    debug = _flag("DEBUG")
    openmp = _uses_openmp()
    sources = ["csrc/pyzsl.cpp", "csrc/python_module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-std=c++20"]
    define_macros = []
    if openmp:
        cxx += ["-fopenmp", "-DAT_PARALLEL_OPENMP"]
    extension = cpp_extension.CppExtension
    extra = {"cxx": cxx}
    include_dirs = [os.path.join(ROOT, "csrc")]
    archs = ""
    if build_cuda:
        extension = cpp_extension.CUDAExtension
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        arch_token = "_".join(a.replace(".", "").replace("+PTX", "ptx") for a in archs.replace(",", ";").replace(" ", ";").split(";") if a)
        define_macros += [("PYZSL_WITH_CUDA", None), ("PYZSL_CUDA_ARCHS_TOKEN", arch_token)]
        include_dirs += _nvidia_include_dirs()
        extra["nvcc"] = (["-O0", "-g", "-G"] if debug else ["-O3"]) + ["-std=c++20", "--expt-relaxed-constexpr"]
    print("pyzsl build configuration:")
    print(f"  torch            {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"  C++ CPU kernels  yes (OpenMP: {'yes' if openmp else 'no, at::parallel_for uses the native pool'})")
    print(f"  CUDA kernels     {'yes' if build_cuda else 'no'}: {why}")
    if build_cuda:
        print(f"  CUDA_HOME        {cpp_extension.CUDA_HOME}")
        print(f"  CUDA archs       {archs}")
    print(f"  debug            {debug}")
    return extension(
        name="pyzsl._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"] if openmp else [],
    )


setup(
    packages=find_packages(include=["pyzsl", "pyzsl.*"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
