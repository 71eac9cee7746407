"""Backend selection shared by every public op.

A backend is one implementation of an op: ``reference`` (pure PyTorch, always there), ``cpp`` (C++ CPU kernels in
``pyzsl._C``), ``cuda`` (CUDA C++ kernels in ``pyzsl._C``, when built with CUDA) and ``triton`` (Triton kernels; on
CPU tensors only under the interpreter, ``TRITON_INTERPRET=1``). ``auto`` picks cuda, then triton, for GPU tensors
and cpp for CPU tensors. ``PYZSL_BACKEND`` sets the default.
"""
import functools
import os
import warnings
from typing import Dict, List, Optional, Sequence

import torch

BACKENDS = ("auto", "reference", "cpp", "triton", "cuda")


@functools.lru_cache(maxsize=None)
def extension_info() -> Dict[str, str]:
    """What the compiled extension was built with; ``{"error": ...}`` when it does not load."""
    try:
        import pyzsl._C  # noqa: F401  (registers the torch.ops.pyzsl kernels)
    except ImportError as error:
        return {"error": str(error)}
    return dict(item.split("=", 1) for item in torch.ops.pyzsl._build_info().split(";"))


def cpp_built() -> bool:
    return "error" not in extension_info()


def cuda_built() -> bool:
    return extension_info().get("cuda") == "1"


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on tensors of ``device``; None when it can."""
    if backend == "reference":
        return None
    if backend == "cpp":
        if not cpp_built():
            return f"the C++ extension did not load ({extension_info()['error']})"
        return None if device.type == "cpu" else f"the cpp backend runs on CPU tensors, not {device.type}"
    if backend == "cuda":
        if not cuda_built():
            return "pyzsl._C was built without CUDA kernels (rebuild with FORCE_CUDA=1 on a CUDA machine)"
        return None if device.type == "cuda" else f"the cuda backend runs on CUDA tensors, not {device.type}"
    if backend == "triton":
        if not triton_importable():
            return "triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
            return None
        return f"triton runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1; got {device.type}"
    raise AssertionError(backend)


def available_backends(device="cpu") -> List[str]:
    device = torch.device(device)
    return [b for b in BACKENDS[1:] if _unavailable_reason(b, device) is None]


def default_backend() -> str:
    backend = os.environ.get("PYZSL_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"PYZSL_BACKEND must be one of {BACKENDS}, got {backend!r}")
    return backend


@functools.lru_cache(maxsize=None)
def _warn_fallback(device_type: str, reason: str) -> None:
    warnings.warn(f"pyzsl: no compiled kernel for {device_type} tensors ({reason}); using the slow reference backend")


def resolve_backend(
    backend: Optional[str], device: torch.device, op: str, implemented: Sequence[str] = BACKENDS[1:]
) -> str:
    """Turns a ``backend=`` argument into a concrete backend for tensors on ``device``, or raises ValueError.

    ``implemented`` lists the backends that have a kernel for ``op``.
    """
    backend = default_backend() if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        candidates = [b for b in (("cuda", "triton") if device.type == "cuda" else ("cpp",)) if b in implemented]
        for candidate in candidates:
            if _unavailable_reason(candidate, device) is None:
                return candidate
        reason = _unavailable_reason(candidates[0], device) if candidates else "no compiled kernel for this op"
        _warn_fallback(device.type, reason)
        return "reference"
    if backend not in implemented:
        raise ValueError(f"{op}: has no {backend!r} kernel; its backends are {list(implemented)}")
    reason = _unavailable_reason(backend, device)
    if reason is not None:
        available = [b for b in available_backends(device) if b in implemented]
        raise ValueError(
            f"{op}: backend={backend!r} cannot run here: {reason}. Available for {device.type} tensors: {available}"
        )
    return backend
