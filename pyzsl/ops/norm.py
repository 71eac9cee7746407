"""Training-mode batch norm followed by ReLU as one op, for LESA's conv block (conv -> BN -> ReLU)."""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._backend import cpp_built, resolve_backend
from .._checks import check_tensor


class BatchNormReLU(NamedTuple):
    out: Tensor   # [N, C] max(0, batch_norm(x))
    mean: Tensor  # [C] float64 batch mean
    var: Tensor   # [C] float64 biased batch variance (what the normalisation divides by)


def batch_norm_relu(x: Tensor, weight: Tensor, bias: Tensor, eps: float, *, backend: Optional[str] = None
                    ) -> BatchNormReLU:
    """``max(0, (x - mean) / sqrt(var + eps) * weight + bias)`` with the batch's per-channel mean and biased variance,
    on channels-last rows x [N, C]; differentiable in x, weight and bias. The statistics are returned (float64) so
    that the caller updates its running statistics as ``nn.BatchNorm2d`` does.

    Backends: ``reference`` (``F.batch_norm`` in training mode, then ``F.relu``) and ``cpp`` (one op: two passes
    forward, two backward, statistics accumulated in float64), float32 and float64.
    """
    op = "batch_norm_relu"
    for name, value, dims in (("x", x, 2), ("weight", weight, 1), ("bias", bias, 1)):
        check_tensor(value, name, op)
        if value.dim() != dims:
            raise ValueError(f"{op}: {name} must be {dims}-D, got shape {list(value.shape)}")
    if weight.shape[0] != x.shape[1] or bias.shape != weight.shape:
        raise ValueError(f"{op}: weight and bias must be [C] = [{x.shape[1]}] for x {list(x.shape)}, got "
                         f"{list(weight.shape)} and {list(bias.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"{op}: batch statistics need at least 2 rows, got x {list(x.shape)}")
    backend = resolve_backend(backend, x.device, op, implemented=("reference", "cpp"))
    if backend == "reference":
        mean = x.detach().double().mean(0)
        var = x.detach().double().var(0, unbiased=False)
        return BatchNormReLU(F.relu(F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)), mean, var)
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{op}: the cpp kernel takes float32 or float64, got {x.dtype}")
    return BatchNormReLU(*torch.ops.pyzsl.batch_norm_relu(x, weight, bias, eps))


def _setup_context(ctx, inputs, output):
    x, weight, _, eps = inputs
    out, mean, var = output
    ctx.save_for_backward(out, x, weight, mean, var)
    ctx.eps = eps
    ctx.mark_non_differentiable(mean, var)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_mean, grad_var):
    out, x, weight, mean, var = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None
    grad_x, grad_weight, grad_bias = torch.ops.pyzsl._batch_norm_relu_backward(
        grad_out.contiguous(), out, x, weight, mean, var, ctx.eps)
    return grad_x, grad_weight, grad_bias, None


if cpp_built():

    @torch.library.register_fake("pyzsl::batch_norm_relu")
    def _batch_norm_relu_fake(x, weight, bias, eps):
        C = x.shape[1]
        return torch.empty_like(x), x.new_empty(C, dtype=torch.float64), x.new_empty(C, dtype=torch.float64)

    @torch.library.register_fake("pyzsl::_batch_norm_relu_backward")
    def _batch_norm_relu_backward_fake(grad_out, out, x, weight, mean, var, eps):
        return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)

    torch.library.register_autograd("pyzsl::batch_norm_relu", _backward, setup_context=_setup_context)
