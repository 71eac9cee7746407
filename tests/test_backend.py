"""Backend selection (pyzsl._backend) and ``python -m pyzsl.info``."""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import pyzsl
from pyzsl import _backend
from pyzsl._backend import BACKENDS, available_backends, default_backend, resolve_backend
from pyzsl.metrics import multilabel_average_precision

CPU = torch.device("cpu")
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def clean_env(monkeypatch):
    """No PYZSL_BACKEND, the Triton interpreter on (as conftest sets it), fresh caches before and after."""
    monkeypatch.delenv("PYZSL_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _backend._warn_fallback.cache_clear()
    yield monkeypatch
    _backend._warn_fallback.cache_clear()


@pytest.fixture
def without_extension(clean_env):
    """Pretends pyzsl._C failed to load."""
    clean_env.setattr(_backend, "extension_info", lambda: {"error": "libfoo.so: cannot open shared object file"})
    return clean_env


def test_extension_is_built_here():
    """The suite's other tests assume the C++ kernels; a broken build must fail loudly, not skip quietly."""
    info = pyzsl.extension_info()
    assert "error" not in info, info
    assert info["cpu"] == "1" and info["cuda"] in ("0", "1") and info["openmp"] in ("0", "1")
    assert hasattr(torch.ops.pyzsl, "multilabel_ap") and hasattr(torch.ops.pyzsl, "multilabel_topk_hits")


def test_available_backends(clean_env):
    assert BACKENDS == ("auto", "reference", "cpp", "triton", "cuda")
    cpu = available_backends("cpu")
    assert cpu[:2] == ["reference", "cpp"]
    assert ("triton" in cpu) == _backend.triton_importable()  # the interpreter runs Triton on CPU tensors
    assert "cuda" not in cpu and "auto" not in cpu
    assert available_backends(CPU) == cpu
    clean_env.setenv("TRITON_INTERPRET", "0")
    assert available_backends("cpu") == ["reference", "cpp"]
    clean_env.delenv("TRITON_INTERPRET")
    assert available_backends("cpu") == ["reference", "cpp"]
    # Only reference runs everywhere; cpp is CPU-only.
    assert "reference" in available_backends("cuda") and "cpp" not in available_backends("cuda")
    if not _backend.cuda_built():
        assert "cuda" not in available_backends("cuda")


def test_resolve_explicit_and_auto(clean_env):
    for backend in available_backends("cpu"):
        assert resolve_backend(backend, CPU, "op") == backend
    assert resolve_backend(None, CPU, "op") == "cpp"
    assert resolve_backend("auto", CPU, "op") == "cpp"
    assert default_backend() == "auto"


def test_resolve_unknown_backend(clean_env):
    with pytest.raises(ValueError, match=r"^myop: backend must be one of \('auto', 'reference', 'cpp', 'triton', "
                                         r"'cuda'\), got 'numpy'$"):
        resolve_backend("numpy", CPU, "myop")


def test_unavailable_backend_message_lists_what_is_available(clean_env):
    with pytest.raises(ValueError) as error:
        resolve_backend("cuda", CPU, "myop")
    message = str(error.value)
    assert message.startswith("myop: backend='cuda' cannot run here: ")
    assert message.endswith(f"Available for cpu tensors: {available_backends('cpu')}")
    if not _backend.cuda_built():
        assert "built without CUDA kernels" in message
    clean_env.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"triton runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1; "
                                         r"got cpu\. Available for cpu tensors: \['reference', 'cpp'\]"):
        resolve_backend("triton", CPU, "myop")


def test_cpp_backend_on_cuda_tensors_is_refused(clean_env):
    with pytest.raises(ValueError, match="the cpp backend runs on CPU tensors, not cuda"):
        resolve_backend("cpp", torch.device("cuda"), "myop")


def test_environment_variable_sets_the_default(clean_env):
    clean_env.setenv("PYZSL_BACKEND", "reference")
    assert default_backend() == "reference"
    assert resolve_backend(None, CPU, "op") == "reference"
    assert resolve_backend("cpp", CPU, "op") == "cpp"  # an explicit argument wins
    clean_env.setenv("PYZSL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend='cuda' cannot run here"):
        multilabel_average_precision(torch.randn(3, 2), torch.ones(3, 2, dtype=torch.int8))
    clean_env.setenv("PYZSL_BACKEND", "fortran")
    with pytest.raises(ValueError, match=r"PYZSL_BACKEND must be one of .*got 'fortran'"):
        resolve_backend(None, CPU, "op")
    assert resolve_backend("reference", CPU, "op") == "reference"  # the variable only matters when used


def test_environment_variable_reaches_the_kernels(clean_env):
    """PYZSL_BACKEND=reference really routes the public API away from the C++ op."""
    calls = []
    from pyzsl.metrics import functional

    real = functional._kernels

    def spy(backend):
        calls.append(backend)
        return real(backend)

    clean_env.setattr(functional, "_kernels", spy)
    scores, targets = torch.randn(4, 3), torch.ones(4, 3, dtype=torch.int8)
    multilabel_average_precision(scores, targets)
    clean_env.setenv("PYZSL_BACKEND", "reference")
    multilabel_average_precision(scores, targets)
    assert calls == ["cpp", "reference"]


def test_missing_extension(without_extension):
    assert not _backend.cpp_built()
    assert available_backends("cpu")[:1] == ["reference"] and "cpp" not in available_backends("cpu")
    with pytest.raises(ValueError, match=r"backend='cpp' cannot run here: the C\+\+ extension did not load "
                                         r"\(libfoo\.so: cannot open shared object file\)"):
        resolve_backend("cpp", CPU, "myop")
    with pytest.warns(UserWarning, match="no compiled kernel for cpu tensors .*using the slow reference backend"):
        assert resolve_backend("auto", CPU, "myop") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per (device, reason), not on every call
        assert resolve_backend(None, CPU, "myop") == "reference"


def _run_info(**env):
    environment = {**os.environ, **env}
    done = subprocess.run([sys.executable, "-m", "pyzsl.info"], capture_output=True, text=True, timeout=120,
                          cwd=REPO_ROOT, env=environment)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_info_module_runs():
    out = _run_info(PYZSL_BACKEND="reference", TRITON_INTERPRET="1")
    lines = out.splitlines()
    assert lines[0].split() == ["pyzsl", pyzsl.__version__]
    assert any(line.startswith("torch") and torch.__version__ in line for line in lines)
    kernel_line = next(line for line in lines if line.startswith("C++"))
    assert kernel_line.startswith("C++ CPU kernels yes (OpenMP: "), kernel_line
    assert any(line.startswith("CUDA kernels") for line in lines)
    backends = next(line for line in lines if line.startswith("backends"))
    assert "cpu: reference, cpp" in backends
    assert ("interpreter (TRITON_INTERPRET=1)" in out) == _backend.triton_importable()
    assert any(line.split() == ["PYZSL_BACKEND", "reference"] for line in lines)
    assert any(line.startswith("threads") and "intra-op" in line for line in lines)
