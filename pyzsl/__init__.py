"""pyzsl: fast, exact zero-shot learning for images in PyTorch.

Subpackages: :mod:`pyzsl.metrics` (evaluation engine), :mod:`pyzsl.ops` (training kernels), :mod:`pyzsl.models`
(LESA, TF-VAEGAN), :mod:`pyzsl.train`, :mod:`pyzsl.data`. Every op takes ``backend="auto" | "reference" | "cpp" |
"triton" | "cuda"``; ``PYZSL_BACKEND`` sets the default and ``python -m pyzsl.info`` lists what is built.
"""
from ._backend import available_backends, extension_info

__version__ = "0.1.0"

extension_info()  # load pyzsl._C now so torch.ops.pyzsl.* exist; a failed load is reported, not raised

__all__ = ["__version__", "available_backends", "extension_info"]
