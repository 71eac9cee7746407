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


class RegionAttention(NamedTuple):
    attended: Tensor          # [B, M, D + 1] f_m = sum_r alpha_mr [F_r, 1]
    attention_logits: Tensor  # [B, M, R] before the softmax over regions


def _check_region_inputs(op: str, features: Tensor, w1: Tensor, w2: Tensor, classifiers: Optional[Tensor] = None):
    """ValueErrors naming the argument and the shapes; returns (B, R, D, H, M)."""
    named = [("features", features, 3), ("w1", w1, 2), ("w2", w2, 2)]
    if classifiers is not None:
        named.append(("classifiers", classifiers, 2))
    for name, value, dims in named:
        check_tensor(value, name, op)
        if value.dim() != dims:
            raise ValueError(f"{op}: {name} must be {dims}-D, got shape {list(value.shape)}")
    B, R, D = features.shape
    if w1.shape[0] != D + 1:
        raise ValueError(f"{op}: w1 must be [D + 1, H] = [{D + 1}, H] for features {list(features.shape)}, got "
                         f"{list(w1.shape)}")
    H = w1.shape[1]
    if w2.shape[0] != H + 1:
        raise ValueError(f"{op}: w2 must be [H + 1, M] = [{H + 1}, M] for w1 {list(w1.shape)}, got {list(w2.shape)}")
    M = w2.shape[1]
    if M == 0:
        raise ValueError(f"{op}: w2 needs at least one head, got shape {list(w2.shape)} (M = 0)")
    if R == 0:
        raise ValueError(f"{op}: features needs at least one region, got shape {list(features.shape)} (R = 0)")
    if classifiers is not None and classifiers.shape[1] != D:
        raise ValueError(f"{op}: classifiers must be [L, D] = [L, {D}] for features {list(features.shape)}, got "
                         f"{list(classifiers.shape)}")
    for name, value, _ in named[1:]:
        if value.dtype != features.dtype:
            raise ValueError(f"{op}: {name} is {value.dtype} but features is {features.dtype}; they must share a "
                             f"dtype")
        if value.device != features.device:
            raise ValueError(f"{op}: {name} is on {value.device} but features on {features.device}")
    if not features.dtype.is_floating_point:
        raise ValueError(f"{op}: features must be floating point, got {features.dtype}")
    return B, R, D, H, M


def _attention_over_regions(features: Tensor, w1: Tensor, w2: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    """(attended, attention_logits) on a resolved backend; inputs already checked."""
    if backend == "reference":
        return _reference.region_attention(features, w1, w2)
    if features.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"region_attention: the {backend} kernel takes float32 or float64, got {features.dtype}; "
                         f"use backend='reference' for other dtypes")
    if backend == "triton":
        from ._attention_triton import region_attention_triton
        attended, logits, _, _ = region_attention_triton(features, w1, w2)
    else:
        attended, logits, _, _ = torch.ops.pyzsl.region_attention(features.contiguous(), w1.contiguous(),
                                                                  w2.contiguous())
    return attended, logits


def region_attention(features: Tensor, w1: Tensor, w2: Tensor, *, backend: Optional[str] = None) -> RegionAttention:
    """LESA's attention over regions: ``alpha = softmax_r([tanh([F, 1] w1), 1] w2)`` and the attended features.

    Args:
        features: [B, R, D] region features.
        w1: [D + 1, H] shared first layer (the +1 row is the bias of LESA's append-a-one trick).
        w2: [H + 1, M] attention logits of the M heads.

    Returns ``attended`` [B, M, D + 1] (``f_m = sum_r alpha_mr [F_r, 1]``; its last column is sum_r alpha = 1) and
    ``attention_logits`` [B, M, R] (before the softmax). Differentiable in all three inputs. The cpp and triton
    backends are one fused op (``pyzsl::region_attention``) with a hand-written backward that keeps only tanh's
    output and alpha; float32 and float64.
    """
    op = "region_attention"
    _check_region_inputs(op, features, w1, w2)
    backend = resolve_backend(backend, features.device, op, implemented=_IMPLEMENTED)
    return RegionAttention(*_attention_over_regions(features, w1, w2, backend))


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
    Backends: ``reference`` (plain PyTorch ops, the oracle), ``cpp`` (the fused C++ op ``pyzsl::region_attention``
    and the C++ head max), ``triton`` (the Triton versions of both). Memory O(B L + B M R + B R H); [B, M, L] is never
    formed by cpp or triton.
    """
    op = "shared_multi_attention"
    _, _, D, _, _ = _check_region_inputs(op, features, w1, w2, classifiers)
    backend = resolve_backend(backend, features.device, op, implemented=_IMPLEMENTED)
    attended, attention_logits = _attention_over_regions(features, w1, w2, backend)
    scores, head = head_max_scores(attended[:, :, :D], classifiers, backend=backend)
    return SharedAttention(scores, head, attended, attention_logits)


def region_attention_autograd(backward_op):
    """(backward, setup_context) for a region-attention op whose outputs are (attended, attention_logits, hidden,
    alpha) and whose backward op takes (grad_attended, grad_attention_logits, features, w1, w2, hidden, alpha,
    features_need_grad)."""

    def setup_context(ctx, inputs, output):
        features, w1, w2 = inputs
        _, _, hidden, alpha = output
        ctx.save_for_backward(features, w1, w2, hidden, alpha)
        ctx.mark_non_differentiable(hidden, alpha)
        # hidden and alpha never get gradients; materialising zeros for them would cost a [B, R, H] fill per step
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_attended, grad_logits, grad_hidden, grad_alpha):
        features, w1, w2, hidden, alpha = ctx.saved_tensors
        if grad_attended is None:
            grad_attended = features.new_zeros(features.shape[0], w2.shape[1], features.shape[2] + 1)
        if grad_logits is None:
            grad_logits = torch.zeros_like(alpha)
        grad_features, grad_w1, grad_w2 = backward_op(grad_attended.contiguous(), grad_logits.contiguous(), features,
                                                      w1, w2, hidden, alpha, ctx.needs_input_grad[0])
        return grad_features if ctx.needs_input_grad[0] else None, grad_w1, grad_w2

    return backward, setup_context


def region_attention_fake(features, w1, w2):
    (B, R, D), H, M = features.shape, w1.shape[1], w2.shape[1]
    return (features.new_empty(B, M, D + 1), features.new_empty(B, M, R), features.new_empty(B, R, H),
            features.new_empty(B, M, R))


def region_attention_backward_fake(grad_attended, grad_logits, features, w1, w2, hidden, alpha, features_need_grad):
    grad_features = torch.empty_like(features) if features_need_grad else None
    return grad_features, torch.empty_like(w1), torch.empty_like(w2)


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

    torch.library.register_fake("pyzsl::region_attention")(region_attention_fake)
    torch.library.register_fake("pyzsl::_region_attention_backward")(region_attention_backward_fake)
    _backward, _setup_context = region_attention_autograd(torch.ops.pyzsl._region_attention_backward)
    torch.library.register_autograd("pyzsl::region_attention", _backward, setup_context=_setup_context)
