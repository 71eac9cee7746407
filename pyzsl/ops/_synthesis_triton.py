"""Triton kernels of ``pyzsl.ops.feedback_synthesis``: the same contract as the C++ op ``pyzsl::feedback_synthesis``.

One tiled GEMM kernel, ``_gemm_kernel``, does every matrix product of the forward and the backward; what differs
between the products is fused into its loads and its epilogue instead of running as separate passes:

- forward: ``act(a @ w.T + bias)`` with act = LeakyReLU(0.2) or sigmoid, and for F's last layer
  ``x1 + alpha * lrelu(a @ w.T + bias)`` (the feedback residual) while also storing fb for the backward;
- backward: the sigmoid derivative ``grad * out * (1 - out)`` is formed while loading the left operand; the product
  ``d(x1 + alpha fb)`` is split in its epilogue into the two LeakyReLU-masked branches dx1 and alpha * dfb; bias
  gradients are the row sums of the tiles the weight-gradient programs load anyway.

Operands are read in the compute dtype (the input dtype, or bf16/fp16) and accumulated in float32 (float64 for
float64 inputs); float32/float64 products use IEEE precision, not TF32. Rows go ``chunk_size`` at a time as in the
C++ kernel; weight gradients accumulate across chunks in the output. Under ``TRITON_INTERPRET=1`` the kernels run on
CPU tensors, which is how they are tested (bf16 arithmetic is wrong in the interpreter, so tests use fp16).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..metrics._triton import TRITON_AVAILABLE, _define_op, _launches_kernels
from .synthesis import synthesis_autograd

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

# Epilogues of _gemm_kernel.
_PLAIN, _LRELU, _SIGMOID, _FEEDBACK, _MASK, _SPLIT = range(6)
_MAX_BLOCK_MN = 64
_MAX_BLOCK_K = 32

if TRITON_AVAILABLE:

    @triton.jit
    def _times_leaky_grad(d, x):
        """d * lrelu'(x) in d's type (a 0.2 tensor would be float32, even next to float64 gradients)."""
        return tl.where(x > 0, d, d * 0.2)

    @triton.jit
    def _gemm_kernel(
        a_ptr, a2_ptr, b_ptr, bias_ptr, res_ptr, aux_ptr, c_ptr, c2_ptr, dbias_ptr,
        alpha_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
        EPILOGUE: tl.constexpr, A_SIGMOID_GRAD: tl.constexpr, STORE_C2: tl.constexpr, BIAS_GRAD: tl.constexpr,
        ACCUMULATE: tl.constexpr, ACC_FP64: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """c[m, n] = epilogue(sum_k A[m, k] B[k, n]) with A, B addressed by strides and c, c2, res, aux contiguous
        [M, N]. alpha is read from a one-element tensor of the accumulation type (a scalar argument would be
        rounded to float32).

        A_SIGMOID_GRAD: A = a * a2 * (1 - a2) (incoming gradient times the sigmoid's derivative from its output).
        BIAS_GRAD: dbias[m] (+)= sum_k A[m, k], written by the programs of the first column of tiles.
        Epilogues: _PLAIN c = acc (ACCUMULATE: c += acc); _LRELU / _SIGMOID c = act(acc + bias);
        _FEEDBACK fb = lrelu(acc + bias) rounded to c2's type, c = res + alpha * fb (and c2 = fb when STORE_C2);
        _MASK c = acc * lrelu'(res); _SPLIT c = acc * lrelu'(res), c2 = alpha * acc * lrelu'(aux).
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
            a_offsets = rm64[:, None] * stride_am + rk64[None, :] * stride_ak
            a_mask = m_in[:, None] & k_in[None, :]
            a = tl.load(a_ptr + a_offsets, mask=a_mask, other=0)
            if A_SIGMOID_GRAD:
                y = tl.load(a2_ptr + a_offsets, mask=a_mask, other=0)
                a = a * y * (1 - y)
            if BIAS_GRAD:
                row_sums += tl.sum(a.to(row_sums.dtype), axis=1)
            b = tl.load(b_ptr + rk64[:, None] * stride_bk + rn64[None, :] * stride_bn,
                        mask=k_in[:, None] & n_in[None, :], other=0)
            a = a.to(b.dtype)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        c_offsets = rm64[:, None] * N + rn64[None, :]
        c_mask = m_in[:, None] & n_in[None, :]
        alpha = tl.load(alpha_ptr).to(acc.dtype)
        if EPILOGUE == 0:  # _PLAIN
            if ACCUMULATE:
                acc += tl.load(c_ptr + c_offsets, mask=c_mask, other=0).to(acc.dtype)
            tl.store(c_ptr + c_offsets, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
        elif EPILOGUE == 1:  # _LRELU
            v = acc + tl.load(bias_ptr + rn, mask=n_in, other=0).to(acc.dtype)[None, :]
            tl.store(c_ptr + c_offsets, tl.where(v > 0, v, v * 0.2).to(c_ptr.dtype.element_ty), mask=c_mask)
        elif EPILOGUE == 2:  # _SIGMOID
            v = acc + tl.load(bias_ptr + rn, mask=n_in, other=0).to(acc.dtype)[None, :]
            tl.store(c_ptr + c_offsets, (1 / (1 + tl.exp(-v))).to(c_ptr.dtype.element_ty), mask=c_mask)
        elif EPILOGUE == 3:  # _FEEDBACK
            v = acc + tl.load(bias_ptr + rn, mask=n_in, other=0).to(acc.dtype)[None, :]
            fb = tl.where(v > 0, v, v * 0.2).to(c_ptr.dtype.element_ty)
            if STORE_C2:
                tl.store(c2_ptr + c_offsets, fb, mask=c_mask)
            x1 = tl.load(res_ptr + c_offsets, mask=c_mask, other=0).to(acc.dtype)
            tl.store(c_ptr + c_offsets, (x1 + alpha * fb.to(acc.dtype)).to(c_ptr.dtype.element_ty), mask=c_mask)
        elif EPILOGUE == 4:  # _MASK
            act = tl.load(res_ptr + c_offsets, mask=c_mask, other=0)
            tl.store(c_ptr + c_offsets, _times_leaky_grad(acc, act).to(c_ptr.dtype.element_ty), mask=c_mask)
        else:  # _SPLIT
            x1 = tl.load(res_ptr + c_offsets, mask=c_mask, other=0)
            fb = tl.load(aux_ptr + c_offsets, mask=c_mask, other=0)
            tl.store(c_ptr + c_offsets, _times_leaky_grad(acc, x1).to(c_ptr.dtype.element_ty), mask=c_mask)
            dpf2 = _times_leaky_grad(alpha * acc, fb)
            tl.store(c2_ptr + c_offsets, dpf2.to(c2_ptr.dtype.element_ty), mask=c_mask)
        if BIAS_GRAD:
            if pid_n == 0:
                if ACCUMULATE:
                    row_sums += tl.load(dbias_ptr + rm64, mask=m_in, other=0).to(row_sums.dtype)
                tl.store(dbias_ptr + rm64, row_sums.to(dbias_ptr.dtype.element_ty), mask=m_in)


def _block(size: int, limit: int) -> int:
    return max(16, min(limit, triton.next_power_of_2(max(size, 1))))


def _gemm(a, b, c, *, M, N, K, a_strides, b_strides, epilogue=_PLAIN, a2=None, bias=None, res=None, aux=None,
          c2=None, dbias=None, alpha=0.0, accumulate=False, acc_fp64=False, store_c2=False):
    """Launches _gemm_kernel for c [M, N] = epilogue(A [M, K] @ B [K, N]); unused pointers get ``c``."""
    if M == 0 or N == 0 or not _launches_kernels(c):
        return
    block_m, block_n, block_k = _block(M, _MAX_BLOCK_MN), _block(N, _MAX_BLOCK_MN), _block(K, _MAX_BLOCK_K)
    ieee = b.dtype in (torch.float32, torch.float64)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    torch.library.wrap_triton(_gemm_kernel)[grid](
        a, c if a2 is None else a2, b, c if bias is None else bias, c if res is None else res,
        c if aux is None else aux, c, c if c2 is None else c2, c if dbias is None else dbias,
        torch.full((1,), alpha, dtype=torch.float64 if acc_fp64 else torch.float32, device=c.device),
        M, N, K, a_strides[0], a_strides[1], b_strides[0], b_strides[1],
        EPILOGUE=epilogue, A_SIGMOID_GRAD=a2 is not None, STORE_C2=store_c2, BIAS_GRAD=dbias is not None,
        ACCUMULATE=accumulate, ACC_FP64=acc_fp64, IEEE=ieee, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )


def _linear(x, w, c, epilogue, bias, **kwargs):
    """c = epilogue(x @ w.T + bias) for x [M, K] and w [N, K] in nn.Linear layout, both contiguous."""
    (M, K), N = x.shape, w.shape[0]
    _gemm(x, w, c, M=M, N=N, K=K, a_strides=(K, 1), b_strides=(1, K), epilogue=epilogue, bias=bias, **kwargs)


def feedback_synthesis_triton(
    noise: Tensor, attributes: Tensor, gen_w1: Tensor, gen_b1: Tensor, gen_w3: Tensor, gen_b3: Tensor,
    dec_w1: Tensor, dec_b1: Tensor, fb_w1: Tensor, fb_b1: Tensor, fb_w2: Tensor, fb_b2: Tensor,
    alpha: float, chunk_size: int, compute_dtype: Optional[torch.dtype], keep_activations: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, x1, h, f1, fb) as ``pyzsl::feedback_synthesis`` returns them; see ``pyzsl.ops.feedback_synthesis``."""
    if chunk_size < 1:
        raise ValueError(f"feedback_synthesis: chunk_size must be >= 1, got {chunk_size}")
    acc, low = noise.dtype, compute_dtype or noise.dtype
    N, H, X, Hd, Hf = noise.shape[0], gen_w1.shape[0], gen_w3.shape[0], dec_w1.shape[0], fb_w1.shape[0]
    fp64 = acc == torch.float64
    za = torch.cat([noise, attributes], dim=1).to(low).contiguous()
    w1, w3, wd, wf1, wf2 = (w.to(low).contiguous() for w in (gen_w1, gen_w3, dec_w1, fb_w1, fb_w2))
    out = noise.new_empty(N, X)
    rows = N if keep_activations else min(chunk_size, N)
    x1_all, h_all, f1_all = (noise.new_empty(rows, width, dtype=low) for width in (H, Hd, Hf))
    fb_all = noise.new_empty(N, H, dtype=low) if keep_activations else None
    buffer_rows = min(chunk_size, N)
    x0, g = noise.new_empty(buffer_rows, X, dtype=low), noise.new_empty(buffer_rows, H, dtype=low)
    for r0 in range(0, N, chunk_size):
        c = min(chunk_size, N - r0)
        k0 = r0 if keep_activations else 0
        x1, h, f1 = (t[k0:k0 + c] for t in (x1_all, h_all, f1_all))
        fb = fb_all[r0:r0 + c] if keep_activations else None
        common = dict(acc_fp64=fp64)
        _linear(za[r0:r0 + c], w1, x1, _LRELU, gen_b1, **common)
        _linear(x1, w3, x0[:c], _SIGMOID, gen_b3, **common)
        _linear(x0[:c], wd, h, _LRELU, dec_b1, **common)
        _linear(h, wf1, f1, _LRELU, fb_b1, **common)
        _linear(f1, wf2, g[:c], _FEEDBACK, fb_b2, res=x1, c2=fb, store_c2=keep_activations, alpha=alpha, **common)
        _linear(g[:c], w3, out[r0:r0 + c], _SIGMOID, gen_b3, **common)
    if not keep_activations:
        return (out,) + tuple(noise.new_empty(0, dtype=low) for _ in range(4))
    return out, x1_all, h_all, f1_all, fb_all


def feedback_synthesis_triton_backward(
    grad_out: Tensor, out: Tensor, x1: Tensor, h: Tensor, f1: Tensor, fb: Tensor, noise: Tensor, attributes: Tensor,
    gen_w1: Tensor, gen_w3: Tensor, fb_w1: Tensor, fb_w2: Tensor, alpha: float, chunk_size: int,
    compute_dtype: Optional[torch.dtype],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``feedback_synthesis_triton`` for noise, attributes, gen_w1, gen_b1, gen_w3, gen_b3, fb_w1,
    fb_b1, fb_w2, fb_b2 (the decoder hidden state h is detached)."""
    if chunk_size < 1:
        raise ValueError(f"feedback_synthesis_backward: chunk_size must be >= 1, got {chunk_size}")
    acc, low = noise.dtype, compute_dtype or noise.dtype
    N, X, H, Hd, Hf = out.shape[0], out.shape[1], gen_w1.shape[0], fb_w1.shape[1], fb_w1.shape[0]
    K1 = gen_w1.shape[1]
    fp64 = acc == torch.float64
    grad_out, out = grad_out.contiguous(), out.contiguous()
    x1, h, f1, fb = (t.contiguous() for t in (x1, h, f1, fb))
    za = torch.cat([noise, attributes], dim=1).to(low).contiguous()
    w1, w3, wf2 = (w.to(low).contiguous() for w in (gen_w1, gen_w3, fb_w2))
    grad_za = noise.new_empty(N, K1)
    grad_w1, grad_w3 = noise.new_zeros(H, K1), noise.new_zeros(X, H)
    grad_wf1, grad_wf2 = noise.new_zeros(Hf, Hd), noise.new_zeros(H, Hf)
    grad_b1, grad_b3, grad_bf1, grad_bf2 = (noise.new_zeros(n) for n in (H, X, Hf, H))
    buffer_rows = min(chunk_size, N)
    dx1, dpf2 = noise.new_empty(buffer_rows, H, dtype=low), noise.new_empty(buffer_rows, H, dtype=low)
    df1 = noise.new_empty(buffer_rows, Hf, dtype=low)
    for r0 in range(0, N, chunk_size):
        c = min(chunk_size, N - r0)
        rows = slice(r0, r0 + c)
        common = dict(acc_fp64=fp64)
        weight_grad = dict(accumulate=r0 > 0, **common)
        g = (x1[rows].to(acc) + alpha * fb[rows].to(acc)).to(low)
        # gen_fc3: dp = grad * out * (1 - out) formed on load; dW3 = dp^T g, db3 = column sums of dp
        _gemm(grad_out[rows], g, grad_w3, M=X, N=H, K=c, a_strides=(1, X), b_strides=(H, 1), a2=out[rows],
              dbias=grad_b3, **weight_grad)
        # d(x1 + alpha fb) = dp W3, split into dx1 and dpf2 = alpha * d(fb pre-activation)
        _gemm(grad_out[rows], w3, dx1[:c], M=c, N=H, K=X, a_strides=(X, 1), b_strides=(H, 1), a2=out[rows],
              epilogue=_SPLIT, res=x1[rows], aux=fb[rows], c2=dpf2[:c], alpha=alpha, **common)
        # fb_fc2
        _gemm(dpf2[:c], f1[rows], grad_wf2, M=H, N=Hf, K=c, a_strides=(1, H), b_strides=(Hf, 1), dbias=grad_bf2,
              **weight_grad)
        _gemm(dpf2[:c], wf2, df1[:c], M=c, N=Hf, K=H, a_strides=(H, 1), b_strides=(Hf, 1), epilogue=_MASK,
              res=f1[rows], **common)
        # fb_fc1 (its input h is detached: no gradient further)
        _gemm(df1[:c], h[rows], grad_wf1, M=Hf, N=Hd, K=c, a_strides=(1, Hf), b_strides=(Hd, 1), dbias=grad_bf1,
              **weight_grad)
        # gen_fc1 and its input [z, a]
        _gemm(dx1[:c], za[rows], grad_w1, M=H, N=K1, K=c, a_strides=(1, H), b_strides=(K1, 1), dbias=grad_b1,
              **weight_grad)
        _gemm(dx1[:c], w1, grad_za[rows], M=c, N=K1, K=H, a_strides=(H, 1), b_strides=(K1, 1), **common)
    nz = noise.shape[1]
    # clones: the two halves of one buffer would alias each other
    return (grad_za[:, :nz].clone(memory_format=torch.contiguous_format),
            grad_za[:, nz:].clone(memory_format=torch.contiguous_format), grad_w1, grad_b1, grad_w3, grad_b3,
            grad_wf1, grad_bf1, grad_wf2, grad_bf2)


if TRITON_AVAILABLE:
    feedback_synthesis_triton = _define_op("pyzsl::feedback_synthesis_triton", feedback_synthesis_triton)
    feedback_synthesis_triton_backward = _define_op("pyzsl::_feedback_synthesis_triton_backward",
                                                    feedback_synthesis_triton_backward)
    _backward, _setup_context = synthesis_autograd(feedback_synthesis_triton, feedback_synthesis_triton_backward)
    feedback_synthesis_triton.register_autograd(_backward, setup_context=_setup_context)
