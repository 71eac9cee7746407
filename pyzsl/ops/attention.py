"""LESA's shared multi-attention: M attention heads over R region features shared by every label, each label scored
by its best head. Without the whole [B, M, L] score tensor, whose memory grows with the label set."""
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .._backend import cpp_built, resolve_backend
from .._checks import check_tensor
from . import _reference

_IMPLEMENTED = ("reference", "cpp", "triton")


class SharedAttention(NamedTuple):
    scores: Tensor            # [B, L] max over heads of f_m . c_l
    head: Tensor              # [B, L] int64, the arg-max head of each score
    attended: Tensor          # [B, M, D + 1] f_m = sum_r alpha_mr [F_r, 1]
    attention_logits: Tensor  # [B, M, R] before the softmax over regions (LESA's diversity loss uses them)


def head_max_scores(attended: Tensor, classifiers: Tensor, *, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """``scores[b, l] = max_m attended[b, m] . classifiers[l]`` and the arg-max head (ties: the lowest index).

    attended [B, M, D], classifiers [L, D], same floating dtype. Differentiable in both; the gradient of a score goes
    to its arg-max head only. The cpp and triton backends work in label blocks: memory O(B L + B M block), not
    O(B M L).
    """
    op = "head_max_scores"
    check_tensor(attended, "attended", op)
    check_tensor(classifiers, "classifiers", op)
    if attended.dim() != 3 or classifiers.dim() != 2 or attended.shape[2] != classifiers.shape[1]:
        raise ValueError(f"{op}: expected attended [B, M, D] and classifiers [L, D] with the same D, got "
                         f"{list(attended.shape)} and {list(classifiers.shape)}")
    if attended.shape[1] == 0:
        raise ValueError(f"{op}: attended needs at least one head, got M = 0")
    if attended.dtype != classifiers.dtype or not attended.dtype.is_floating_point:
        raise ValueError(f"{op}: attended and classifiers must share a floating dtype, got {attended.dtype} and "
                         f"{classifiers.dtype}")
    if attended.device != classifiers.device:
        raise ValueError(f"{op}: attended is on {attended.device} but classifiers on {classifiers.device}")
    backend = resolve_backend(backend, attended.device, op, implemented=_IMPLEMENTED)
    if backend == "reference":
        return _reference.head_max_scores(attended, classifiers)
    if backend == "triton":
        from ._triton import head_max_scores_triton
        return head_max_scores_triton(attended, classifiers)
    return torch.ops.pyzsl.head_max_scores(attended.contiguous(), classifiers.contiguous())


def shared_multi_attention(
    features: Tensor, w1: Tensor, w2: Tensor, classifiers: Tensor, *, backend: Optional[str] = None
) -> SharedAttention:
    """LESA's shared multi-attention head (``core/model_share_attention.py``).

    Args:
        features: [B, R, D] region features after the learned conv/BN/ReLU.
        w1: [D + 1, H] shared first layer (the +1 row is the bias of LESA's append-a-one trick).
        w2: [H + 1, M] attention logits of the M heads.
        classifiers: [L, D] label classifiers c_l = W v_l (LESA zero-augments them, so the bias feature never scores).

    ``alpha = softmax_r([tanh([F, 1] w1), 1] w2)``, ``f_m = sum_r alpha_mr [F_r, 1]``, ``s_l = max_m f_m[:D] . c_l``.
    """
    op = "shared_multi_attention"
    for name, value, dims in (("features", features, 3), ("w1", w1, 2), ("w2", w2, 2), ("classifiers", classifiers, 2)):
        check_tensor(value, name, op)
        if value.dim() != dims:
            raise ValueError(f"{op}: {name} must be {dims}-D, got shape {list(value.shape)}")
    B, R, D = features.shape
    if w1.shape[0] != D + 1 or w2.shape[0] != w1.shape[1] + 1 or classifiers.shape[1] != D:
        raise ValueError(f"{op}: expected w1 [{D + 1}, H], w2 [H + 1, M], classifiers [L, {D}] for features "
                         f"[B, R, {D}]; got w1 {list(w1.shape)}, w2 {list(w2.shape)}, classifiers "
                         f"{list(classifiers.shape)}")
    # The appended ones become bias rows (w1[D], w2[H]): GEMMs with K = D and H, not D + 1 and H + 1, which run
    # markedly faster, and no concatenated copies. The ones column of the attended features is the softmax's sum.
    H, M = w1.shape[1], w2.shape[1]
    hidden = torch.tanh(torch.addmm(w1[D], features.reshape(B * R, D), w1[:D]))       # [B R, H]
    attention_logits = torch.addmm(w2[H], hidden, w2[:H]).view(B, R, M).transpose(1, 2)  # [B, M, R]
    alpha = torch.softmax(attention_logits, dim=2)
    attended = torch.cat([alpha @ features, alpha.sum(2, keepdim=True)], dim=2)        # [B, M, D + 1]
    scores, head = head_max_scores(attended[:, :, :D], classifiers, backend=backend)
    return SharedAttention(scores, head, attended, attention_logits)


def head_max_autograd(backward_op):
    """(backward, setup_context) for a head-max op whose backward op takes (grad, head, attended, classifiers)."""

    def setup_context(ctx, inputs, output):
        attended, classifiers = inputs
        ctx.save_for_backward(attended, classifiers, output[1])
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad_scores, grad_head):
        attended, classifiers, head = ctx.saved_tensors
        return tuple(backward_op(grad_scores.contiguous(), head, attended, classifiers))

    return backward, setup_context


if cpp_built():

    @torch.library.register_fake("pyzsl::head_max_scores")
    def _head_max_scores_fake(attended, classifiers):
        B, L = attended.shape[0], classifiers.shape[0]
        return attended.new_empty(B, L), attended.new_empty(B, L, dtype=torch.int64)

    @torch.library.register_fake("pyzsl::_head_max_scores_backward")
    def _head_max_scores_backward_fake(grad_scores, head, attended, classifiers):
        return torch.empty_like(attended), torch.empty_like(classifiers)

    _backward, _setup_context = head_max_autograd(torch.ops.pyzsl._head_max_scores_backward)
    torch.library.register_autograd("pyzsl::head_max_scores", _backward, setup_context=_setup_context)
