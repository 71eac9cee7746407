"""``python -m pyzsl.info``: versions, built backends and threads, for bug reports and benchmark logs."""
import os
import platform

import torch

import pyzsl
from pyzsl._backend import available_backends, extension_info, triton_importable


def report() -> str:
    ext = extension_info()
    lines = [
        f"pyzsl           {pyzsl.__version__}",
        f"python          {platform.python_version()} ({platform.machine()})",
        f"torch           {torch.__version__} (CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()})",
    ]
    if "error" in ext:
        lines.append(f"C++ extension   NOT LOADED: {ext['error']}")
    else:
        lines.append(f"C++ CPU kernels yes (OpenMP: {'yes' if ext.get('openmp') == '1' else 'no'})")
        archs = ext.get("cuda_archs", "").replace("_", " ")
        lines.append(f"CUDA kernels    {'yes, archs ' + archs if ext.get('cuda') == '1' else 'not built'}")
    if triton_importable():
        import triton
        mode = "interpreter (TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1" else "compiled"
        lines.append(f"Triton          {triton.__version__}, {mode}")
    else:
        lines.append("Triton          not installed")
    lines += [
        f"threads         {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op",
        f"backends        cpu: {', '.join(available_backends('cpu'))}"
        + (f"; cuda: {', '.join(available_backends('cuda'))}" if torch.cuda.is_available() else ""),
        f"PYZSL_BACKEND   {os.environ.get('PYZSL_BACKEND', 'auto (unset)')}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
