"""LESA's 2x2 convolution with TF 'SAME' padding, on channels-last region maps."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._backend import cpp_built, resolve_backend
from .._checks import check_tensor


def conv2x2_same(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, backend: Optional[str] = None) -> Tensor:
    """``out[b, i, j] = bias + sum_{a, c in {0, 1}} weight[:, :, a, c] @ x[b, i + a, j + c]`` with x zero past its last
    row and column (TensorFlow's 'SAME' padding of a 2x2 kernel, as LESA's conv layer).

    x [B, h, w, C_in] channels-last (LESA's region features [B, R, C] viewed as the h x w grid), weight
    [C_out, C_in, 2, 2] (``nn.Conv2d``'s layout), bias [C_out] or None; returns [B, h, w, C_out]. Differentiable in
    all three.

    Backends: ``reference`` (``F.conv2d`` on the padded NCHW view, any floating dtype, any device) and ``cpp``
    (float32/float64): Winograd's F(2x2, 2x2), which needs 9/16 of the direct convolution's multiply-adds for the
    output and for the weight gradient (see csrc/cpu/conv2x2_cpu.cpp).
    """
    op = "conv2x2_same"
    check_tensor(x, "x", op)
    check_tensor(weight, "weight", op)
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D [B, h, w, C_in], got shape {list(x.shape)}")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{op}: x needs h, w >= 1, got shape {list(x.shape)}")
    if weight.dim() != 4 or tuple(weight.shape[1:]) != (x.shape[3], 2, 2):
        raise ValueError(f"{op}: weight must be [C_out, C_in, 2, 2] = [C_out, {x.shape[3]}, 2, 2] for x "
                         f"{list(x.shape)}, got {list(weight.shape)}")
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    check_tensor(bias, "bias", op)
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"{op}: bias must be [C_out] = [{weight.shape[0]}], got {list(bias.shape)}")
    if not (x.dtype == weight.dtype == bias.dtype) or not x.dtype.is_floating_point:
        raise ValueError(f"{op}: x, weight and bias must share a floating dtype, got {x.dtype}, {weight.dtype} and "
                         f"{bias.dtype}")
    if not (x.device == weight.device == bias.device):
        raise ValueError(f"{op}: x, weight and bias must be on one device, got {x.device}, {weight.device} and "
                         f"{bias.device}")
    backend = resolve_backend(backend, x.device, op, implemented=("reference", "cpp"))
    if backend == "reference":
        out = F.conv2d(F.pad(x.permute(0, 3, 1, 2), (0, 1, 0, 1)), weight, bias)
        return out.permute(0, 2, 3, 1)
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{op}: the cpp kernel takes float32 or float64, got {x.dtype}")
    return torch.ops.pyzsl.conv2x2_same(x, weight, bias)[0]


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(output[1], weight)
    ctx.x_needs_grad = ctx.needs_input_grad[0]
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_tiles):
    if grad_out is None:
        return None, None, None
    tiles, weight = ctx.saved_tensors
    return tuple(torch.ops.pyzsl._conv2x2_same_backward(grad_out.contiguous(), tiles, weight, ctx.x_needs_grad))


if cpp_built():

    @torch.library.register_fake("pyzsl::conv2x2_same")
    def _conv2x2_same_fake(x, weight, bias):
        B, h, w, C = x.shape
        tiles = B * ((h + 1) // 2) * ((w + 1) // 2)
        return x.new_empty(B, h, w, weight.shape[0]), x.new_empty(9, tiles, C)

    @torch.library.register_fake("pyzsl::_conv2x2_same_backward")
    def _conv2x2_same_backward_fake(grad_out, tiles, weight, x_needs_grad):
        B, h, w, _ = grad_out.shape
        grad_x = grad_out.new_empty(B, h, w, weight.shape[1]) if x_needs_grad else None
        return grad_x, torch.empty_like(weight), grad_out.new_empty(weight.shape[0])

    torch.library.register_autograd("pyzsl::conv2x2_same", _backward, setup_context=_setup_context)
