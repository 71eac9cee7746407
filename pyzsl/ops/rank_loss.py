"""LESA's ranking loss over every (positive, negative) label pair, in O(L log L) per image."""
from typing import Optional

import torch
from torch import Tensor

from .._backend import cpp_built, resolve_backend
from .._checks import check_same_device, check_tensor, check_values_in
from . import _reference


def lesa_rank_loss(scores: Tensor, targets: Tensor, margin: float = 1.0, *, backend: Optional[str] = None) -> Tensor:
    """Mean over images of the hinge ``max(0, margin + s_n - s_p)`` summed over the image's (positive, negative)
    pairs and divided by its number of violating pairs (+1e-8), exactly as LESA trains.

    Args:
        scores: [B, L] label scores (float16/bfloat16 are computed in float32).
        targets: [B, L] integer, 1 = positive, -1 = negative, 0 = unannotated (ignored).
        margin: the hinge margin (LESA: 1.0).
        backend: ``"auto"``, ``"reference"`` (the published pairwise form, B x L x L memory), ``"cpp"``
            (sort + prefix sums, O(B L) memory) or ``"triton"`` (tiled pair counts, O(B L) memory).

    Differentiable in ``scores``; the violating-pair count is treated as a constant, as in the published code.
    """
    op = "lesa_rank_loss"
    check_tensor(scores, "scores", op)
    check_tensor(targets, "targets", op)
    if scores.dim() != 2 or not scores.dtype.is_floating_point:
        raise ValueError(f"{op}: scores must be a 2-D floating tensor [B, L], got {scores.dtype} of shape "
                         f"{list(scores.shape)}")
    if targets.shape != scores.shape:
        raise ValueError(f"{op}: targets must have the shape of scores {list(scores.shape)}, got "
                         f"{list(targets.shape)}")
    check_same_device(targets, scores, "targets", "scores", op)
    check_values_in(targets, (-1, 0, 1), "targets", op)
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()
    targets = targets if targets.dtype == torch.int8 else targets.to(torch.int8)
    backend = resolve_backend(backend, scores.device, op, implemented=("reference", "cpp", "triton"))
    if backend == "reference":
        return _reference.lesa_rank_loss(scores, targets, float(margin))
    if backend == "triton":
        from ._triton import lesa_rank_loss_triton
        return lesa_rank_loss_triton(scores, targets, float(margin))
    return torch.ops.pyzsl.lesa_rank_loss(scores, targets, float(margin))


def rank_loss_autograd(backward_op):
    """(backward, setup_context) for a rank-loss op whose backward op takes (grad, scores, targets, margin)."""

    def setup_context(ctx, inputs, output):
        scores, targets, margin = inputs
        ctx.save_for_backward(scores, targets)
        ctx.margin = margin

    def backward(ctx, grad):
        scores, targets = ctx.saved_tensors
        return backward_op(grad, scores, targets, ctx.margin), None, None

    return backward, setup_context


if cpp_built():

    @torch.library.register_fake("pyzsl::lesa_rank_loss")
    def _lesa_rank_loss_fake(scores, targets, margin):
        return scores.new_empty(())

    @torch.library.register_fake("pyzsl::_lesa_rank_loss_backward")
    def _lesa_rank_loss_backward_fake(grad, scores, targets, margin):
        return torch.empty_like(scores)

    _backward, _setup_context = rank_loss_autograd(torch.ops.pyzsl._lesa_rank_loss_backward)
    torch.library.register_autograd("pyzsl::lesa_rank_loss", _backward, setup_context=_setup_context)
