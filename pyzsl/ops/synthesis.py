"""TF-VAEGAN's feature synthesis with feedback for a whole batch of (noise, attribute) rows in one call.

The published code (``generate_syn_feature``, reference/generative-gzsl-methods.md §1.6) runs one class at a time,
computes the generator twice (once without, once with feedback) and the decoder's attribute head it does not use.
Here every row of every class goes through one pass that computes the generator hidden layer once and reuses it:

    x1  = lrelu(gen_fc1([z, a]))                 # [N, H]   generator hidden (noise first, as Generator.forward)
    x0  = sigmoid(gen_fc3(x1))                   # [N, X]   generator output without feedback
    h   = lrelu(dec_fc1(x0))                     # [N, Hd]  semantic-decoder hidden, detached as published
    fb  = lrelu(fb_fc2(lrelu(fb_fc1(h))))        # [N, H]   feedback module F
    out = sigmoid(gen_fc3(x1 + alpha * fb))      # [N, X]

LeakyReLU slopes are 0.2. Rows are processed ``chunk_size`` at a time, so the intermediates take O(chunk * width)
memory at inference; training keeps the four activations the backward needs (x1, h, F's hidden, fb).
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._backend import cpp_built, resolve_backend
from .._checks import check_tensor

LRELU_SLOPE = 0.2
# Without a chunk_size, chunks are as large as this budget for the intermediates allows (~3,600 rows at the published
# widths in fp32). Large chunks pay: each chunk is 12 parallel regions, and on a loaded 2-core machine every region
# boundary waits for a descheduled thread; measured on CUB shapes, 3,072 rows under load average ~5: 384-row chunks
# 1.15x the bare GEMM time, 768 1.12x, 1,536 1.03x, one chunk 1.00x.
CHUNK_BUDGET_BYTES = 256 << 20
COMPUTE_DTYPES = (torch.bfloat16, torch.float16)

_IMPLEMENTED = ("reference", "cpp", "triton")
_WEIGHTS = ("gen_w1", "gen_b1", "gen_w3", "gen_b3", "dec_w1", "dec_b1", "fb_w1", "fb_b1", "fb_w2", "fb_b2")


def feedback_synthesis(
    noise: Tensor, attributes: Tensor,
    gen_w1: Tensor, gen_b1: Tensor, gen_w3: Tensor, gen_b3: Tensor,
    dec_w1: Tensor, dec_b1: Tensor,
    fb_w1: Tensor, fb_b1: Tensor, fb_w2: Tensor, fb_b2: Tensor,
    alpha: float, *, chunk_size: Optional[int] = None, compute_dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Synthesised features ``sigmoid(gen_fc3(x1 + alpha * F(Dec_hidden(G(z, a)))))`` for every row, [N, X].

    Args:
        noise: [N, nz] z, attributes: [N, na] class embeddings (one row per sample, the class's row repeated).
        gen_w1, gen_b1: the generator's fc1, [H, nz + na] and [H] (``nn.Linear`` layout: pass ``module.weight``).
        gen_w3, gen_b3: the generator's fc3, [X, H] and [X].
        dec_w1, dec_b1: the semantic decoder's fc1, [Hd, X] and [Hd].
        fb_w1, fb_b1, fb_w2, fb_b2: the feedback module's fc1 [Hf, Hd], [Hf] and fc2 [H, Hf], [H].
        alpha: the feedback weight (``a1`` in training, ``a2`` in synthesis).
        chunk_size: rows per chunk; bounds the memory of the intermediates (default: as many rows as fit in
            ``CHUNK_BUDGET_BYTES``, 256 MiB).
        compute_dtype: ``torch.bfloat16`` or ``torch.float16`` runs the GEMMs on that type (fp32 accumulation) and
            stores the activations in it; biases, activations functions and the output stay in the input dtype.
            ``None`` computes in the input dtype.
        backend: ``"auto"``, ``"reference"`` (plain PyTorch), ``"cpp"`` (C++ CPU) or ``"triton"``; None reads
            ``PYZSL_BACKEND`` (default ``"auto"``).

    All tensors share one dtype (float32 or float64) and device. Differentiable in noise, attributes, the generator
    and the feedback module; the decoder hidden state is detached, exactly as in the published code, so dec_w1 and
    dec_b1 receive no gradient through this op.
    """
    op = "feedback_synthesis"
    tensors = (noise, attributes, gen_w1, gen_b1, gen_w3, gen_b3, dec_w1, dec_b1, fb_w1, fb_b1, fb_w2, fb_b2)
    _check_inputs(tensors, op)
    alpha = _check_alpha(alpha, op)
    compute_dtype = _check_compute_dtype(compute_dtype, noise.dtype, op)
    if chunk_size is None:
        chunk_size = default_chunk_size(gen_w1.shape[0], gen_w3.shape[0], dec_w1.shape[0], fb_w1.shape[0],
                                        compute_dtype or noise.dtype)
    else:
        chunk_size = _check_chunk_size(chunk_size, op)
    backend = resolve_backend(backend, noise.device, op, implemented=_IMPLEMENTED)
    if backend == "reference":
        return feedback_synthesis_reference(*tensors, alpha, compute_dtype=compute_dtype)
    tensors = tuple(t.contiguous() for t in tensors)
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if backend == "triton":
        from ._synthesis_triton import feedback_synthesis_triton as forward_op
    else:
        forward_op = torch.ops.pyzsl.feedback_synthesis
    return forward_op(*tensors, alpha, chunk_size, compute_dtype, keep)[0]


def feedback_synthesis_reference(
    noise: Tensor, attributes: Tensor,
    gen_w1: Tensor, gen_b1: Tensor, gen_w3: Tensor, gen_b3: Tensor,
    dec_w1: Tensor, dec_b1: Tensor,
    fb_w1: Tensor, fb_b1: Tensor, fb_w2: Tensor, fb_b2: Tensor,
    alpha: float, *, compute_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """The synthesis path in plain PyTorch, whole batch at once: the oracle of the kernels and the fallback.

    With ``compute_dtype`` every GEMM takes its operands in that type; bias, activation and the residual are
    computed in the input dtype and each activation is rounded to ``compute_dtype`` where it is stored.
    """
    acc = noise.dtype
    low = compute_dtype or acc

    def linear(x, w, b):
        return F.linear(x.to(low), w.to(low)).to(acc) + b

    x1 = F.leaky_relu(linear(torch.cat([noise, attributes], dim=1), gen_w1, gen_b1), LRELU_SLOPE).to(low)
    x0 = torch.sigmoid(linear(x1, gen_w3, gen_b3)).to(low)
    h = F.leaky_relu(linear(x0, dec_w1, dec_b1), LRELU_SLOPE).to(low).detach()
    f1 = F.leaky_relu(linear(h, fb_w1, fb_b1), LRELU_SLOPE).to(low)
    fb = F.leaky_relu(linear(f1, fb_w2, fb_b2), LRELU_SLOPE).to(low)
    g = (x1.to(acc) + alpha * fb.to(acc)).to(low)
    return torch.sigmoid(linear(g, gen_w3, gen_b3))


def default_chunk_size(H: int, X: int, Hd: int, Hf: int, dtype: torch.dtype) -> int:
    """Rows whose per-chunk buffers (x1, x0, h, f1 and the residual: 2 H + X + Hd + Hf values a row) fit in
    ``CHUNK_BUDGET_BYTES``."""
    row_bytes = torch.tensor([], dtype=dtype).element_size() * (2 * H + X + Hd + Hf)
    return max(1, CHUNK_BUDGET_BYTES // max(row_bytes, 1))


def synthesis_flops(N: int, nz: int, na: int, H: int, X: int, Hd: int, Hf: int) -> int:
    """Multiply-adds x 2 of the six GEMMs of one forward pass (the elementwise epilogues are not counted)."""
    return 2 * N * ((nz + na) * H + H * X + X * Hd + Hd * Hf + Hf * H + H * X)


def _check_inputs(tensors: Sequence[Tensor], op: str) -> None:
    names = ("noise", "attributes") + _WEIGHTS
    for name, value in zip(names, tensors):
        check_tensor(value, name, op)
    noise, attributes, gen_w1, gen_b1, gen_w3, gen_b3, dec_w1, dec_b1, fb_w1, fb_b1, fb_w2, fb_b2 = tensors

    def expect(name, value, shape, meaning):
        if list(value.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {meaning} = {shape}, got {list(value.shape)}")

    if noise.dim() != 2:
        raise ValueError(f"{op}: noise must be 2-D [N, nz], got shape {list(noise.shape)}")
    N, nz = noise.shape
    if attributes.dim() != 2:
        raise ValueError(f"{op}: attributes must be 2-D [N, na], got shape {list(attributes.shape)}")
    na = attributes.shape[1]
    expect("attributes", attributes, [N, na], "[N, na] (N from noise)")
    # Weights in nn.Linear layout [out, in]: each layer's out size is read from its weight, its in size is known.
    layers = (("gen_w1", gen_w1, "H", "nz + na"), ("gen_w3", gen_w3, "X", "H"), ("dec_w1", dec_w1, "Hd", "X"),
              ("fb_w1", fb_w1, "Hf", "Hd"), ("fb_w2", fb_w2, "H", "Hf"))
    for name, weight, _, _ in layers:
        if weight.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D (nn.Linear layout [out, in]), got shape "
                             f"{list(weight.shape)}")
    sizes = {"nz + na": nz + na, "H": gen_w1.shape[0], "X": gen_w3.shape[0], "Hd": dec_w1.shape[0],
             "Hf": fb_w1.shape[0]}
    for name, weight, out, into in layers:
        expect(name, weight, [sizes[out], sizes[into]], f"[{out}, {into}]")
    for name, bias, width in (("gen_b1", gen_b1, "H"), ("gen_b3", gen_b3, "X"), ("dec_b1", dec_b1, "Hd"),
                              ("fb_b1", fb_b1, "Hf"), ("fb_b2", fb_b2, "H")):
        expect(name, bias, [sizes[width]], f"[{width}]")
    if noise.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{op}: noise must be float32 or float64 (compute_dtype gives bf16/fp16 GEMMs), got "
                         f"{noise.dtype}")
    for name, value in zip(names, tensors):
        if value.dtype != noise.dtype:
            raise ValueError(f"{op}: every tensor must have noise's dtype {noise.dtype}, but {name} is {value.dtype}")
        if value.device != noise.device:
            raise ValueError(f"{op}: every tensor must be on noise's device {noise.device}, but {name} is on "
                             f"{value.device}")


def _check_alpha(alpha, op: str) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{op}: alpha must be a Python float (the feedback weight a1 / a2), got "
                         f"{type(alpha).__name__}")
    if alpha != alpha or alpha in (float("inf"), float("-inf")):
        raise ValueError(f"{op}: alpha must be finite, got {alpha}")
    return float(alpha)


def _check_chunk_size(chunk_size, op: str) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be None or an int >= 1, got {chunk_size!r}")
    return chunk_size


def _check_compute_dtype(compute_dtype, dtype: torch.dtype, op: str) -> Optional[torch.dtype]:
    if compute_dtype is None or compute_dtype == dtype:
        return None
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"{op}: compute_dtype must be None, the input dtype or one of {list(COMPUTE_DTYPES)}, got "
                         f"{compute_dtype}")
    if dtype != torch.float32:
        raise ValueError(f"{op}: compute_dtype={compute_dtype} needs float32 inputs, got {dtype}")
    return compute_dtype


def synthesis_autograd(forward_op, backward_op):
    """(backward, setup_context) for a synthesis op returning (out, x1, h, f1, fb) and a backward op taking
    (grad_out, out, x1, h, f1, fb, noise, attributes, gen_w1, gen_w3, fb_w1, fb_w2, alpha, chunk_size,
    compute_dtype)."""

    def setup_context(ctx, inputs, output):
        noise, attributes, gen_w1, gen_b1, gen_w3, gen_b3, dec_w1, dec_b1, fb_w1, fb_b1, fb_w2, fb_b2, alpha, \
            chunk_size, compute_dtype, keep = inputs
        ctx.mark_non_differentiable(*output[1:])
        ctx.alpha, ctx.chunk_size, ctx.compute_dtype, ctx.keep = alpha, chunk_size, compute_dtype, keep
        # Without kept activations (the op was called with keep_activations=False) the backward recomputes them.
        saved = (output[0],) + (tuple(output[1:]) if keep else ())
        ctx.save_for_backward(*inputs[:12], *saved)

    def backward(ctx, grad_out, *unused):
        saved = ctx.saved_tensors
        inputs = saved[:12]
        noise, attributes, gen_w1, _, gen_w3, _, _, _, fb_w1, _, fb_w2, _ = inputs
        if ctx.keep:
            activations = saved[13:]
        else:
            activations = forward_op(*inputs, ctx.alpha, ctx.chunk_size, ctx.compute_dtype, True)[1:]
        grads = backward_op(grad_out.contiguous(), saved[12], *activations, noise, attributes, gen_w1, gen_w3,
                            fb_w1, fb_w2, ctx.alpha, ctx.chunk_size, ctx.compute_dtype)
        grad_noise, grad_attributes, grad_gen_w1, grad_gen_b1, grad_gen_w3, grad_gen_b3, grad_fb_w1, grad_fb_b1, \
            grad_fb_w2, grad_fb_b2 = grads
        return (grad_noise, grad_attributes, grad_gen_w1, grad_gen_b1, grad_gen_w3, grad_gen_b3, None, None,
                grad_fb_w1, grad_fb_b1, grad_fb_w2, grad_fb_b2, None, None, None, None)

    return backward, setup_context


def synthesis_fake(noise, attributes, gen_w1, gen_b1, gen_w3, gen_b3, dec_w1, dec_b1, fb_w1, fb_b1, fb_w2, fb_b2,
                   alpha, chunk_size, compute_dtype, keep_activations) -> Tuple[Tensor, ...]:
    """Shapes and dtypes of (out, x1, h, f1, fb); the activations are empty unless kept for the backward."""
    N = noise.shape[0]
    low = compute_dtype or noise.dtype

    def activation(width):
        return noise.new_empty((N, width) if keep_activations else (0,), dtype=low)

    return (noise.new_empty(N, gen_w3.shape[0]), activation(gen_w1.shape[0]), activation(dec_w1.shape[0]),
            activation(fb_w1.shape[0]), activation(gen_w1.shape[0]))


def synthesis_backward_fake(grad_out, out, x1, h, f1, fb, noise, attributes, gen_w1, gen_w3, fb_w1, fb_w2, alpha,
                            chunk_size, compute_dtype) -> Tuple[Tensor, ...]:
    return (torch.empty_like(noise), torch.empty_like(attributes), torch.empty_like(gen_w1),
            noise.new_empty(gen_w1.shape[0]), torch.empty_like(gen_w3), noise.new_empty(gen_w3.shape[0]),
            torch.empty_like(fb_w1), noise.new_empty(fb_w1.shape[0]), torch.empty_like(fb_w2),
            noise.new_empty(fb_w2.shape[0]))


if cpp_built() and hasattr(torch.ops.pyzsl, "feedback_synthesis"):
    torch.library.register_fake("pyzsl::feedback_synthesis")(synthesis_fake)
    torch.library.register_fake("pyzsl::_feedback_synthesis_backward")(synthesis_backward_fake)
    _backward, _setup_context = synthesis_autograd(torch.ops.pyzsl.feedback_synthesis,
                                                   torch.ops.pyzsl._feedback_synthesis_backward)
    torch.library.register_autograd("pyzsl::feedback_synthesis", _backward, setup_context=_setup_context)
