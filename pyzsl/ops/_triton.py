"""Triton kernels of pyzsl.ops: LESA's rank loss and the max over attention heads, same contracts as the C++ ops.

Rank loss (``pyzsl::lesa_rank_loss_triton``):

One program per (image, block of labels). For each label j of its block it sweeps the image's labels in tiles and
counts, without any pair tensor:
- j negative: the positives k it violates with (s_k < margin + s_j) and the sum of their hinges (margin + s_j - s_k);
- j positive: the negatives whose margin + s_n exceeds s_j.
The host adds the per-label partial sums in a fixed order (deterministic). The signed counts are the gradient up to
the factor grad / (B * (violating pairs of the image + 1e-8)), so the backward is one elementwise product.
O(L^2) comparisons per image, which suits a GPU; the C++ kernel is the O(L log L) one.

Head max (``pyzsl::head_max_scores_triton``): one program per (image, block of labels) accumulates the [M, block]
head scores over chunks of D and keeps only the max over heads and its (lowest) arg-max; [B, M, L] never exists. The
backward routes each gradient to its arg-max head with library GEMMs, label block by label block.
"""
from typing import Tuple

import torch
from torch import Tensor

from ..metrics._triton import TRITON_AVAILABLE, _define_op, _launches_kernels
from .attention import head_max_autograd
from .rank_loss import rank_loss_autograd

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

_BLOCK_LABELS = 32
_BLOCK_PARTNERS = 128
_EPS = 1e-8
_HEAD_BLOCK_LABELS = 32
_HEAD_BLOCK_FEATURES = 32
_HEAD_MAX_LABEL_BLOCK = 512  # labels per GEMM in the backward

if TRITON_AVAILABLE:

    @triton.jit
    def _rank_loss_counts_kernel(
        scores_ptr, targets_ptr, margin_ptr, signed_count_ptr, hinge_ptr, L, num_label_blocks,
        BLOCK_LABELS: tl.constexpr, BLOCK_PARTNERS: tl.constexpr,
    ):
        image = tl.program_id(0) // num_label_blocks
        block = tl.program_id(0) % num_label_blocks
        row = image.to(tl.int64) * L
        labels = block * BLOCK_LABELS + tl.arange(0, BLOCK_LABELS)
        in_range = labels < L
        margin = tl.load(margin_ptr)
        s = tl.load(scores_ptr + row + labels, mask=in_range, other=0)
        t = tl.load(targets_ptr + row + labels, mask=in_range, other=0)
        key = margin + s  # rounded in the score dtype, as the pairwise form rounds margin + s_n
        violated = tl.zeros([BLOCK_LABELS], dtype=tl.int32)   # j negative: positives below its key
        exceeded = tl.zeros([BLOCK_LABELS], dtype=tl.int32)   # j positive: negative keys above it
        hinge = tl.zeros([BLOCK_LABELS], dtype=tl.float64)
        for start in range(0, L, BLOCK_PARTNERS):
            partners = start + tl.arange(0, BLOCK_PARTNERS)
            p_in = partners < L
            sp = tl.load(scores_ptr + row + partners, mask=p_in, other=0)
            tp = tl.load(targets_ptr + row + partners, mask=p_in, other=0)
            partner_key = margin + sp
            # [labels, partners]: j negative and partner positive below j's key
            pair_jn = (t[:, None] == -1) & (tp[None, :] == 1) & (sp[None, :] < key[:, None])
            violated += tl.sum(pair_jn.to(tl.int32), axis=1)
            hinge += tl.sum(tl.where(pair_jn, (key[:, None] - sp[None, :]).to(tl.float64), 0.0), axis=1)
            # j positive and partner negative whose key is above s_j
            pair_jp = (t[:, None] == 1) & (tp[None, :] == -1) & (partner_key[None, :] > s[:, None])
            exceeded += tl.sum(pair_jp.to(tl.int32), axis=1)
        tl.store(signed_count_ptr + row + labels, violated - exceeded, mask=in_range)
        tl.store(hinge_ptr + row + labels, hinge, mask=in_range)


    @triton.jit
    def _head_max_kernel(
        attended_ptr, classifiers_ptr, scores_ptr, head_ptr, M, D, L, num_label_blocks,
        BLOCK_HEADS: tl.constexpr, BLOCK_LABELS: tl.constexpr, BLOCK_FEATURES: tl.constexpr,
    ):
        image = tl.program_id(0) // num_label_blocks
        block = tl.program_id(0) % num_label_blocks
        heads = tl.arange(0, BLOCK_HEADS)
        labels = block * BLOCK_LABELS + tl.arange(0, BLOCK_LABELS)
        head_in = heads < M
        label_in = labels < L
        f_base = attended_ptr + image.to(tl.int64) * M * D
        acc = tl.zeros([BLOCK_HEADS, BLOCK_LABELS], dtype=attended_ptr.dtype.element_ty)
        for start in range(0, D, BLOCK_FEATURES):
            features = start + tl.arange(0, BLOCK_FEATURES)
            feature_in = features < D
            f = tl.load(f_base + heads[:, None] * D + features[None, :],
                        mask=head_in[:, None] & feature_in[None, :], other=0)
            c = tl.load(classifiers_ptr + labels[:, None].to(tl.int64) * D + features[None, :],
                        mask=label_in[:, None] & feature_in[None, :], other=0)
            acc += tl.sum(f[:, None, :] * c[None, :, :], axis=2)
        acc = tl.where(head_in[:, None], acc, float("-inf"))
        best = tl.max(acc, axis=0)
        # the lowest head holding the max, as torch.max picks
        best_head = tl.min(tl.where(acc == best[None, :], heads[:, None], BLOCK_HEADS), axis=0)
        out = image.to(tl.int64) * L + labels
        tl.store(scores_ptr + out, best, mask=label_in)
        tl.store(head_ptr + out, best_head.to(tl.int64), mask=label_in)


def _rank_loss_counts(scores: Tensor, targets: Tensor, margin: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(loss per image [B] float64, signed counts [B, L] int32, violating pairs per image [B] float64)."""
    B, L = scores.shape
    signed_count = scores.new_zeros(B, L, dtype=torch.int32)
    hinge = scores.new_zeros(B, L, dtype=torch.float64)
    if B and L and _launches_kernels(scores):
        num_label_blocks = triton.cdiv(L, _BLOCK_LABELS)
        margin_t = torch.full((1,), margin, dtype=scores.dtype, device=scores.device)
        torch.library.wrap_triton(_rank_loss_counts_kernel)[(B * num_label_blocks,)](
            scores, targets, margin_t, signed_count, hinge, L, num_label_blocks,
            BLOCK_LABELS=_BLOCK_LABELS, BLOCK_PARTNERS=min(_BLOCK_PARTNERS, triton.next_power_of_2(L)),
        )
    violating = torch.where(targets == -1, signed_count, 0).sum(1, dtype=torch.float64)
    return hinge.sum(1) / (violating + _EPS), signed_count, violating


def lesa_rank_loss_triton(scores: Tensor, targets: Tensor, margin: float) -> Tensor:
    """LESA's rank loss on float32/float64 scores and int8 targets; see ``pyzsl.ops.lesa_rank_loss``."""
    per_image, _, _ = _rank_loss_counts(scores.contiguous(), targets.contiguous(), margin)
    return per_image.mean().to(scores.dtype)


def lesa_rank_loss_triton_backward(grad: Tensor, scores: Tensor, targets: Tensor, margin: float) -> Tensor:
    _, signed_count, violating = _rank_loss_counts(scores.contiguous(), targets.contiguous(), margin)
    weight = grad.double() / (scores.shape[0] * (violating + _EPS))
    return (signed_count.double() * weight[:, None]).to(scores.dtype)


def head_max_scores_triton(attended: Tensor, classifiers: Tensor) -> Tuple[Tensor, Tensor]:
    """scores[b, l] = max_m attended[b, m] . classifiers[l] and the arg-max head; see ``pyzsl.ops.head_max_scores``."""
    attended, classifiers = attended.contiguous(), classifiers.contiguous()
    (B, M, D), L = attended.shape, classifiers.shape[0]
    scores = attended.new_empty(B, L)
    head = attended.new_empty(B, L, dtype=torch.int64)
    if B and L and _launches_kernels(attended):
        num_label_blocks = triton.cdiv(L, _HEAD_BLOCK_LABELS)
        torch.library.wrap_triton(_head_max_kernel)[(B * num_label_blocks,)](
            attended, classifiers, scores, head, M, D, L, num_label_blocks,
            BLOCK_HEADS=triton.next_power_of_2(M), BLOCK_LABELS=_HEAD_BLOCK_LABELS,
            BLOCK_FEATURES=min(_HEAD_BLOCK_FEATURES, triton.next_power_of_2(max(D, 1))),
        )
    return scores, head


def head_max_scores_triton_backward(
    grad_scores: Tensor, head: Tensor, attended: Tensor, classifiers: Tensor
) -> Tuple[Tensor, Tensor]:
    (B, M, D), L = attended.shape, classifiers.shape[0]
    rows = attended.reshape(B * M, D)
    grad_attended = torch.zeros_like(rows)
    grad_classifiers = torch.empty_like(classifiers)
    for l0 in range(0, L, _HEAD_MAX_LABEL_BLOCK):
        width = min(_HEAD_MAX_LABEL_BLOCK, L - l0)
        routed = attended.new_zeros(B, M, width)
        routed.scatter_(1, head[:, None, l0 : l0 + width], grad_scores[:, None, l0 : l0 + width])
        routed = routed.reshape(B * M, width)
        grad_attended += routed @ classifiers[l0 : l0 + width]
        grad_classifiers[l0 : l0 + width] = routed.T @ rows
    return grad_attended.reshape(B, M, D), grad_classifiers


if TRITON_AVAILABLE:
    head_max_scores_triton = _define_op("pyzsl::head_max_scores_triton", head_max_scores_triton)
    head_max_scores_triton_backward = _define_op("pyzsl::_head_max_scores_triton_backward",
                                                 head_max_scores_triton_backward)
    _backward, _setup_context = head_max_autograd(head_max_scores_triton_backward)
    head_max_scores_triton.register_autograd(_backward, setup_context=_setup_context)

    lesa_rank_loss_triton = _define_op("pyzsl::lesa_rank_loss_triton", lesa_rank_loss_triton)
    lesa_rank_loss_triton_backward = _define_op("pyzsl::_lesa_rank_loss_triton_backward",
                                                lesa_rank_loss_triton_backward)
    _backward, _setup_context = rank_loss_autograd(lesa_rank_loss_triton_backward)
    lesa_rank_loss_triton.register_autograd(_backward, setup_context=_setup_context)
