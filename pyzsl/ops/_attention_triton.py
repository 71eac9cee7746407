"""Triton kernels of ``pyzsl.ops.region_attention``: the same contract as the C++ op ``pyzsl::region_attention``.

Forward (rows = the B*R regions of the batch):
- ``_attention_gemm_kernel`` computes ``hidden = tanh(F w1[:D] + w1[D])`` with the bias and tanh in its epilogue, and
  the head logits ``hidden w2[:H] + w2[H]`` ([B R, M]);
- ``_softmax_attend_kernel``, one program per (image, block of features), takes the softmax over the regions in two
  sweeps (max and sum, then alpha) and accumulates ``attended = alpha F`` tile by tile; the programs of the first
  feature block also store the logits [B, M, R], alpha and the appended-one column ``sum_r alpha``.

Backward (saves only hidden and alpha):
- ``_softmax_grad_kernel``, one program per image: ``grad_alpha = gA[:, :D] F^T + gA[:, D]`` tile by tile, the
  softmax backward ``alpha (grad_alpha - sum_r alpha grad_alpha)`` plus the incoming logits gradient, stored [B R, M]
  (grad_alpha is recomputed in the second sweep rather than stored and re-read);
- ``_attend_grad_kernel``: ``grad_F = alpha^T gA[:, :D]`` per (image, region block, feature block);
- ``_attention_gemm_kernel`` again for ``d_pre = (grad_logits w2[:H]^T) (1 - hidden^2)`` (tanh derivative in the
  epilogue), ``grad_w2 = (grad_logits^T hidden)^T`` and ``grad_w1 = (d_pre^T F)^T`` written transposed through the
  output strides with the bias-row gradients as the row sums of the tiles it loads, and ``grad_F += d_pre w1[:D]^T``
  accumulated in place.

float32 products use IEEE precision (not TF32), float64 accumulates in float64. Under ``TRITON_INTERPRET=1`` the
kernels run on CPU tensors, which is how they are tested.
"""
from typing import Tuple

import torch
from torch import Tensor

from ..metrics._triton import TRITON_AVAILABLE, _define_op, _launches_kernels
from .attention import region_attention_autograd

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

_PLAIN, _BIAS, _TANH_BIAS, _TANH_GRAD = range(4)
_MAX_BLOCK_MN = 64
_MAX_BLOCK_K = 32
_BLOCK_REGIONS = 32
_BLOCK_FEATURES = 32

if TRITON_AVAILABLE:

    @triton.jit
    def _tanh(x):
        """tanh through exp of a non-positive argument (no overflow)."""
        t = tl.exp(-2.0 * tl.abs(x))
        y = (1.0 - t) / (1.0 + t)
        return tl.where(x < 0, -y, y)

    @triton.jit
    def _attention_gemm_kernel(
        a_ptr, b_ptr, bias_ptr, aux_ptr, c_ptr, dbias_ptr, M, N, K,
        stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
        EPILOGUE: tl.constexpr, BIAS_GRAD: tl.constexpr, ACCUMULATE: tl.constexpr, ACC_FP64: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """c[m, n] = epilogue(sum_k A[m, k] B[k, n]); A, B and c addressed by strides, aux contiguous [M, N].

        Epilogues: _PLAIN c = acc (ACCUMULATE: c += acc); _BIAS c = acc + bias[n]; _TANH_BIAS c = tanh(acc + bias[n]);
        _TANH_GRAD c = acc * (1 - aux^2). BIAS_GRAD: dbias[m] = sum_k A[m, k], written by the first column of tiles.
        """
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_in = rm < M
        n_in = rn < N
        rm64 = rm.to(tl.int64)
        rn64 = rn.to(tl.int64)
        if ACC_FP64:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
            row_sums = tl.zeros([BLOCK_M], dtype=tl.float64)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            row_sums = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_in = rk < K
            rk64 = rk.to(tl.int64)
            a = tl.load(a_ptr + rm64[:, None] * stride_am + rk64[None, :] * stride_ak,
                        mask=m_in[:, None] & k_in[None, :], other=0)
            if BIAS_GRAD:
                row_sums += tl.sum(a.to(row_sums.dtype), axis=1)
            b = tl.load(b_ptr + rk64[:, None] * stride_bk + rn64[None, :] * stride_bn,
                        mask=k_in[:, None] & n_in[None, :], other=0)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        c_offsets = rm64[:, None] * stride_cm + rn64[None, :] * stride_cn
        c_mask = m_in[:, None] & n_in[None, :]
        if EPILOGUE == 0:  # _PLAIN
            if ACCUMULATE:
                acc += tl.load(c_ptr + c_offsets, mask=c_mask, other=0).to(acc.dtype)
            out = acc
        elif EPILOGUE == 1:  # _BIAS
            out = acc + tl.load(bias_ptr + rn64, mask=n_in, other=0).to(acc.dtype)[None, :]
        elif EPILOGUE == 2:  # _TANH_BIAS
            out = _tanh(acc + tl.load(bias_ptr + rn64, mask=n_in, other=0).to(acc.dtype)[None, :])
        else:  # _TANH_GRAD
            t = tl.load(aux_ptr + rm64[:, None] * N + rn64[None, :], mask=c_mask, other=0).to(acc.dtype)
            out = acc * (1 - t * t)
        tl.store(c_ptr + c_offsets, out.to(c_ptr.dtype.element_ty), mask=c_mask)
        if BIAS_GRAD:
            if pid_n == 0:
                tl.store(dbias_ptr + rm64, row_sums.to(dbias_ptr.dtype.element_ty), mask=m_in)

    @triton.jit
    def _softmax_attend_kernel(
        logits_t_ptr, features_ptr, logits_ptr, alpha_ptr, attended_ptr, R, D, M, num_feature_blocks,
        BLOCK_HEADS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Program (b, feature block): alpha = softmax over r of logits_t[b R + r, m] and attended[b, m, block]."""
        image = tl.program_id(0) // num_feature_blocks
        block = tl.program_id(0) % num_feature_blocks
        heads = tl.arange(0, BLOCK_HEADS)
        head_in = heads < M
        dd = block * BLOCK_D + tl.arange(0, BLOCK_D)
        d_in = dd < D
        row0 = image.to(tl.int64) * R
        top = tl.full([BLOCK_HEADS], float("-inf"), dtype=logits_t_ptr.dtype.element_ty)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            mask = head_in[:, None] & (rr < R)[None, :]
            logit = tl.load(logits_t_ptr + (row0 + rr)[None, :] * M + heads[:, None], mask=mask, other=float("-inf"))
            top = tl.maximum(top, tl.max(logit, axis=1))
        top = tl.where(head_in, top, 0)
        total = tl.zeros([BLOCK_HEADS], dtype=top.dtype)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            mask = head_in[:, None] & (rr < R)[None, :]
            logit = tl.load(logits_t_ptr + (row0 + rr)[None, :] * M + heads[:, None], mask=mask, other=float("-inf"))
            total += tl.sum(tl.exp(logit - top[:, None]), axis=1)
        total = tl.where(head_in, total, 1)
        acc = tl.zeros([BLOCK_HEADS, BLOCK_D], dtype=top.dtype)
        alpha_sum = tl.zeros([BLOCK_HEADS], dtype=top.dtype)
        out_rows = (image.to(tl.int64) * M + heads) * R  # [B, M, R] row starts
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_in = rr < R
            mask = head_in[:, None] & r_in[None, :]
            logit = tl.load(logits_t_ptr + (row0 + rr)[None, :] * M + heads[:, None], mask=mask, other=float("-inf"))
            alpha = tl.where(mask, tl.exp(logit - top[:, None]) / total[:, None], 0)
            if block == 0:
                tl.store(logits_ptr + out_rows[:, None] + rr[None, :], logit, mask=mask)
                tl.store(alpha_ptr + out_rows[:, None] + rr[None, :], alpha, mask=mask)
            f = tl.load(features_ptr + (row0 + rr)[:, None] * D + dd[None, :], mask=r_in[:, None] & d_in[None, :],
                        other=0)
            acc = tl.dot(alpha, f, acc, input_precision="ieee")
            alpha_sum += tl.sum(alpha, axis=1)
        out = (image.to(tl.int64) * M + heads) * (D + 1)
        tl.store(attended_ptr + out[:, None] + dd[None, :], acc, mask=head_in[:, None] & d_in[None, :])
        if block == 0:
            tl.store(attended_ptr + out + D, alpha_sum, mask=head_in)

    @triton.jit
    def _grad_alpha_tile(grad_attended_ptr, features_ptr, image, heads, head_in, rr, r_in, R, D, M,
                         BLOCK_HEADS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """grad_alpha[m, r] = gA[b, m, :D] . F[b, r] + gA[b, m, D] for one block of regions."""
        g_rows = (image.to(tl.int64) * M + heads) * (D + 1)
        f_rows = image.to(tl.int64) * R + rr
        ga = tl.zeros([BLOCK_HEADS, BLOCK_R], dtype=grad_attended_ptr.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_in = dd < D
            g = tl.load(grad_attended_ptr + g_rows[:, None] + dd[None, :], mask=head_in[:, None] & d_in[None, :],
                        other=0)
            f_t = tl.load(features_ptr + f_rows[None, :] * D + dd[:, None], mask=d_in[:, None] & r_in[None, :],
                          other=0)
            ga = tl.dot(g, f_t, ga, input_precision="ieee")
        ones = tl.load(grad_attended_ptr + g_rows + D, mask=head_in, other=0)
        return ga + ones[:, None]

    @triton.jit
    def _softmax_grad_kernel(
        grad_attended_ptr, grad_logits_ptr, features_ptr, alpha_ptr, glt_ptr, R, D, M,
        BLOCK_HEADS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Program b: glt[b R + r, m] = alpha (grad_alpha - sum_r alpha grad_alpha) + grad_logits[b, m, r]."""
        image = tl.program_id(0)
        heads = tl.arange(0, BLOCK_HEADS)
        head_in = heads < M
        rows = (image.to(tl.int64) * M + heads) * R
        dot = tl.zeros([BLOCK_HEADS], dtype=grad_attended_ptr.dtype.element_ty)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_in = rr < R
            mask = head_in[:, None] & r_in[None, :]
            ga = _grad_alpha_tile(grad_attended_ptr, features_ptr, image, heads, head_in, rr, r_in, R, D, M,
                                  BLOCK_HEADS, BLOCK_R, BLOCK_D)
            alpha = tl.load(alpha_ptr + rows[:, None] + rr[None, :], mask=mask, other=0)
            dot += tl.sum(alpha * ga, axis=1)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_in = rr < R
            mask = head_in[:, None] & r_in[None, :]
            ga = _grad_alpha_tile(grad_attended_ptr, features_ptr, image, heads, head_in, rr, r_in, R, D, M,
                                  BLOCK_HEADS, BLOCK_R, BLOCK_D)
            alpha = tl.load(alpha_ptr + rows[:, None] + rr[None, :], mask=mask, other=0)
            incoming = tl.load(grad_logits_ptr + rows[:, None] + rr[None, :], mask=mask, other=0)
            g = alpha * (ga - dot[:, None]) + incoming
            tl.store(glt_ptr + (image.to(tl.int64) * R + rr)[None, :] * M + heads[:, None], g, mask=mask)

    @triton.jit
    def _attend_grad_kernel(
        alpha_ptr, grad_attended_ptr, grad_features_ptr, R, D, M, num_region_blocks, num_feature_blocks,
        BLOCK_HEADS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Program (b, region block, feature block): grad_F[b, r, d] = sum_m alpha[b, m, r] gA[b, m, d]."""
        pid = tl.program_id(0)
        per_image = num_region_blocks * num_feature_blocks
        image = pid // per_image
        rb = (pid % per_image) // num_feature_blocks
        fb = pid % num_feature_blocks
        heads = tl.arange(0, BLOCK_HEADS)
        head_in = heads < M
        rr = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        r_in = rr < R
        dd = fb * BLOCK_D + tl.arange(0, BLOCK_D)
        d_in = dd < D
        head_rows = image.to(tl.int64) * M + heads
        alpha_t = tl.load(alpha_ptr + head_rows[None, :] * R + rr[:, None], mask=r_in[:, None] & head_in[None, :],
                          other=0)
        g = tl.load(grad_attended_ptr + head_rows[:, None] * (D + 1) + dd[None, :],
                    mask=head_in[:, None] & d_in[None, :], other=0)
        out = tl.dot(alpha_t, g, input_precision="ieee")
        tl.store(grad_features_ptr + (image.to(tl.int64) * R + rr)[:, None] * D + dd[None, :], out,
                 mask=r_in[:, None] & d_in[None, :])


def _block(size: int, limit: int) -> int:
    return max(16, min(limit, triton.next_power_of_2(max(size, 1))))


def _gemm(a, b, c, *, M, N, K, a_strides, b_strides, c_strides, epilogue=_PLAIN, bias=None, aux=None, dbias=None,
          accumulate=False):
    """Launches _attention_gemm_kernel for c [M, N] = epilogue(A [M, K] @ B [K, N]); unused pointers get ``c``."""
    if M == 0 or N == 0:
        return
    block_m, block_n, block_k = _block(M, _MAX_BLOCK_MN), _block(N, _MAX_BLOCK_MN), _block(K, _MAX_BLOCK_K)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    torch.library.wrap_triton(_attention_gemm_kernel)[grid](
        a, b, c if bias is None else bias, c if aux is None else aux, c, c if dbias is None else dbias, M, N, K,
        a_strides[0], a_strides[1], b_strides[0], b_strides[1], c_strides[0], c_strides[1],
        EPILOGUE=epilogue, BIAS_GRAD=dbias is not None, ACCUMULATE=accumulate, ACC_FP64=c.dtype == torch.float64,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )


def _check_dtype(features: Tensor) -> None:
    if features.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"region_attention: the triton kernels take float32 or float64, got {features.dtype}")


def region_attention_triton(features: Tensor, w1: Tensor, w2: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(attended [B, M, D + 1], attention_logits [B, M, R], hidden [B, R, H], alpha [B, M, R]) as
    ``pyzsl::region_attention`` returns them; see ``pyzsl.ops.region_attention``."""
    _check_dtype(features)
    features, w1, w2 = features.contiguous(), w1.contiguous(), w2.contiguous()
    (B, R, D), H, M = features.shape, w1.shape[1], w2.shape[1]
    hidden = features.new_empty(B, R, H)
    logits_t = features.new_empty(B * R, M)
    logits = features.new_empty(B, M, R)
    alpha = features.new_empty(B, M, R)
    attended = features.new_empty(B, M, D + 1)
    if B == 0 or not _launches_kernels(features):
        return attended, logits, hidden, alpha
    rows = B * R
    _gemm(features, w1, hidden, M=rows, N=H, K=D, a_strides=(D, 1), b_strides=(H, 1), c_strides=(H, 1),
          epilogue=_TANH_BIAS, bias=w1[D])
    _gemm(hidden, w2, logits_t, M=rows, N=M, K=H, a_strides=(H, 1), b_strides=(M, 1), c_strides=(M, 1),
          epilogue=_BIAS, bias=w2[H])
    block_d = _block(D, _BLOCK_FEATURES)
    num_feature_blocks = max(1, triton.cdiv(D, block_d))
    torch.library.wrap_triton(_softmax_attend_kernel)[(B * num_feature_blocks,)](
        logits_t, features, logits, alpha, attended, R, D, M, num_feature_blocks,
        BLOCK_HEADS=_block(M, 1 << 30), BLOCK_R=_block(R, _BLOCK_REGIONS), BLOCK_D=block_d,
    )
    return attended, logits, hidden, alpha


def region_attention_triton_backward(
    grad_attended: Tensor, grad_attention_logits: Tensor, features: Tensor, w1: Tensor, w2: Tensor, hidden: Tensor,
    alpha: Tensor, features_need_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_features, grad_w1, grad_w2); grad_features is an empty tensor when features_need_grad is false."""
    _check_dtype(features)
    grad_attended, grad_attention_logits = grad_attended.contiguous(), grad_attention_logits.contiguous()
    features, w1, w2 = features.contiguous(), w1.contiguous(), w2.contiguous()
    hidden, alpha = hidden.contiguous(), alpha.contiguous()
    (B, R, D), H, M = features.shape, w1.shape[1], w2.shape[1]
    grad_features = torch.empty_like(features) if features_need_grad else features.new_empty(0)
    grad_w1 = torch.empty_like(w1)
    grad_w2 = torch.empty_like(w2)
    if B == 0:
        grad_features.zero_()
        grad_w1.zero_()
        grad_w2.zero_()
        return grad_features, grad_w1, grad_w2
    if not _launches_kernels(features):
        return grad_features, grad_w1, grad_w2
    rows = B * R
    block_heads, block_r, block_d = _block(M, 1 << 30), _block(R, _BLOCK_REGIONS), _block(D, _BLOCK_FEATURES)
    glt = features.new_empty(rows, M)  # gradient of the logits, [B R, M]
    torch.library.wrap_triton(_softmax_grad_kernel)[(B,)](
        grad_attended, grad_attention_logits, features, alpha, glt, R, D, M,
        BLOCK_HEADS=block_heads, BLOCK_R=block_r, BLOCK_D=block_d,
    )
    d_pre = features.new_empty(rows, H)
    _gemm(glt, w2, d_pre, M=rows, N=H, K=M, a_strides=(M, 1), b_strides=(1, M), c_strides=(H, 1),
          epilogue=_TANH_GRAD, aux=hidden)
    # grad_w2[:H] = (glt^T hidden)^T and grad_w2[H] = column sums of glt (the row sums of glt^T)
    _gemm(glt, hidden, grad_w2, M=M, N=H, K=rows, a_strides=(1, M), b_strides=(H, 1), c_strides=(1, M),
          dbias=grad_w2[H])
    # grad_w1[:D] = (d_pre^T F)^T and grad_w1[D] = column sums of d_pre
    _gemm(d_pre, features, grad_w1, M=H, N=D, K=rows, a_strides=(1, H), b_strides=(D, 1), c_strides=(1, H),
          dbias=grad_w1[D])
    if H == 0:  # no tiles ran, so no row sums either
        grad_w2[H].copy_(glt.sum(0))
    if D == 0:
        grad_w1[D].copy_(d_pre.sum(0))
    if features_need_grad:
        num_region_blocks, num_feature_blocks = triton.cdiv(R, block_r), max(1, triton.cdiv(D, block_d))
        torch.library.wrap_triton(_attend_grad_kernel)[(B * num_region_blocks * num_feature_blocks,)](
            alpha, grad_attended, grad_features, R, D, M, num_region_blocks, num_feature_blocks,
            BLOCK_HEADS=block_heads, BLOCK_R=block_r, BLOCK_D=block_d,
        )
        _gemm(d_pre, w1, grad_features, M=rows, N=D, K=H, a_strides=(H, 1), b_strides=(1, H), c_strides=(D, 1),
              accumulate=True)
    return grad_features, grad_w1, grad_w2


if TRITON_AVAILABLE:
    region_attention_triton = _define_op("pyzsl::region_attention_triton", region_attention_triton)
    region_attention_triton_backward = _define_op("pyzsl::_region_attention_triton_backward",
                                                  region_attention_triton_backward)
    _backward, _setup_context = region_attention_autograd(region_attention_triton_backward)
    region_attention_triton.register_autograd(_backward, setup_context=_setup_context)
