"""pyzsl.ops.feedback_synthesis: C++ and Triton kernels against the reference, the reference against the published
per-class computation, gradients, opcheck, reduced-precision compute, argument errors and backend dispatch."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.library import opcheck

from pyzsl._backend import available_backends, cpp_built
from pyzsl.ops import feedback_synthesis
from pyzsl.ops.synthesis import feedback_synthesis_reference

needs_cpp = pytest.mark.skipif(not cpp_built(), reason="pyzsl._C did not build")
needs_triton = pytest.mark.skipif("triton" not in available_backends("cpu"),
                                  reason="triton is not installed or TRITON_INTERPRET is not set")

NAMES = ("noise", "attributes", "gen_w1", "gen_b1", "gen_w3", "gen_b3", "dec_w1", "dec_b1", "fb_w1", "fb_b1",
         "fb_w2", "fb_b2")
DIFFERENTIABLE = [i for i, name in enumerate(NAMES) if not name.startswith("dec_")]
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}
# (N, nz, na, H, X, Hd, Hf): odd and prime widths, a feedback width Hf different from H, N = 0 and 1.
SHAPES = [(0, 3, 4, 8, 5, 6, 7), (1, 2, 3, 5, 4, 3, 6), (7, 3, 5, 11, 13, 9, 6), (37, 4, 4, 17, 10, 12, 17)]


def make_inputs(N, nz, na, H, X, Hd, Hf, *, seed, dtype=torch.float64):
    """Noise, attributes and layer parameters at the scale of trained TF-VAEGAN layers (pre-activations of order 1,
    so both sides of every LeakyReLU and the sigmoid's curved part are exercised)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    return [randn(N, nz), randn(N, na).abs(),
            randn(H, nz + na, scale=(nz + na) ** -0.5), randn(H, scale=0.3),
            randn(X, H, scale=H ** -0.5), randn(X, scale=0.3),
            randn(Hd, X, scale=X ** -0.5), randn(Hd, scale=0.3),
            randn(Hf, Hd, scale=Hd ** -0.5), randn(Hf, scale=0.3),
            randn(H, Hf, scale=Hf ** -0.5), randn(H, scale=0.3)]


def outputs_and_grads(fn, inputs, seed):
    """fn's output and the gradients of a random projection of it with respect to every input (None: no path)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    grads = torch.autograd.grad((out * weights.to(out.dtype)).sum(), leaves, allow_unused=True)
    return out.detach(), grads


def assert_matches_reference(inputs, alpha, *, backend, chunk_size, seed, tol):
    ours, our_grads = outputs_and_grads(
        lambda *t: feedback_synthesis(*t, alpha, chunk_size=chunk_size, backend=backend), inputs, seed)
    ref, ref_grads = outputs_and_grads(lambda *t: feedback_synthesis_reference(*t, alpha), inputs, seed)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    torch.testing.assert_close(ours, ref, **tol)
    for name, mine, theirs in zip(NAMES, our_grads, ref_grads):
        if name.startswith("dec_"):  # behind the detached decoder hidden state, as published
            assert mine is None and theirs is None, name
        else:
            torch.testing.assert_close(mine, theirs, **tol, msg=lambda m: f"gradient of {name}: {m}")


@needs_cpp
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("chunk_size", [1, 3, 5, None])
def test_cpp_matches_reference_float64(shape, chunk_size):
    for seed in range(3):
        inputs = make_inputs(*shape, seed=seed)
        assert_matches_reference(inputs, 0.7, backend="cpp", chunk_size=chunk_size, seed=seed,
                                 tol=TOL[torch.float64])


@needs_cpp
@pytest.mark.parametrize("alpha", [0.0, 0.01, 1.0, -0.5])
def test_cpp_matches_reference_float32(alpha):
    for seed in range(2):
        inputs = make_inputs(45, 7, 6, 33, 20, 19, 25, seed=seed, dtype=torch.float32)
        assert_matches_reference(inputs, alpha, backend="cpp", chunk_size=16, seed=seed, tol=TOL[torch.float32])


@needs_cpp
@settings(max_examples=25, deadline=None)
@given(N=st.integers(0, 40), nz=st.integers(1, 6), na=st.integers(1, 6), H=st.integers(1, 24),
       X=st.integers(1, 24), Hd=st.integers(1, 24), Hf=st.integers(1, 24), chunk=st.integers(1, 45),
       alpha=st.floats(-2, 2), seed=st.integers(0, 10_000))
def test_cpp_fuzz_against_reference(N, nz, na, H, X, Hd, Hf, chunk, alpha, seed):
    inputs = make_inputs(N, nz, na, H, X, Hd, Hf, seed=seed)
    assert_matches_reference(inputs, alpha, backend="cpp", chunk_size=chunk, seed=seed, tol=TOL[torch.float64])


class PublishedGenerator(nn.Module):
    """TF-VAEGAN's Generator (networks/TFVAEGAN_model.py): fc1 on cat(z, a), LeakyReLU, fc3, sigmoid; with
    feedback the hidden layer becomes x1 + a1 * feedback_layers."""

    def __init__(self, nz, na, H, X):
        super().__init__()
        self.fc1, self.fc3 = nn.Linear(nz + na, H), nn.Linear(H, X)

    def forward(self, noise, att, feedback_layers=None, a1=None):
        x1 = nn.functional.leaky_relu(self.fc1(torch.cat((noise, att), dim=-1)), 0.2)
        if feedback_layers is not None:
            x1 = x1 + a1 * feedback_layers
        return torch.sigmoid(self.fc3(x1))


def test_reference_equals_the_published_per_class_loop():
    """generate_syn_feature: per class, G(z, a), Dec(fake) for its hidden layer, F of that, G again with feedback."""
    torch.manual_seed(0)
    nz = na = 6
    H, X, Hd, num_per_class, alpha = 16, 12, 10, 5, 0.3
    netG = PublishedGenerator(nz, na, H, X).double()
    dec_fc1 = nn.Linear(X, Hd).double()
    feedback = nn.Sequential(nn.Linear(Hd, H), nn.LeakyReLU(0.2), nn.Linear(H, H), nn.LeakyReLU(0.2)).double()
    class_attributes = torch.rand(4, na, dtype=torch.float64)
    noise = torch.randn(4 * num_per_class, nz, dtype=torch.float64)
    with torch.no_grad():
        expected = []
        for c in range(4):
            z = noise[c * num_per_class:(c + 1) * num_per_class]
            a = class_attributes[c].repeat(num_per_class, 1)
            hidden = nn.functional.leaky_relu(dec_fc1(netG(z, a)), 0.2)
            expected.append(netG(z, a, feedback_layers=feedback(hidden), a1=alpha))
        expected = torch.cat(expected)
        attributes = class_attributes.repeat_interleave(num_per_class, dim=0)
        params = [netG.fc1.weight, netG.fc1.bias, netG.fc3.weight, netG.fc3.bias, dec_fc1.weight, dec_fc1.bias,
                  feedback[0].weight, feedback[0].bias, feedback[2].weight, feedback[2].bias]
        torch.testing.assert_close(feedback_synthesis_reference(noise, attributes, *params, alpha), expected,
                                   rtol=1e-12, atol=1e-12)
        if cpp_built():
            torch.testing.assert_close(feedback_synthesis(noise, attributes, *params, alpha, backend="cpp"),
                                       expected, rtol=1e-12, atol=1e-12)


@needs_cpp
def test_chunking_does_not_change_the_result():
    inputs = make_inputs(50, 5, 5, 20, 16, 18, 20, seed=3)
    whole = feedback_synthesis(*inputs, 0.5, chunk_size=50, backend="cpp")
    for chunk in (1, 7, 49):
        torch.testing.assert_close(feedback_synthesis(*inputs, 0.5, chunk_size=chunk, backend="cpp"), whole,
                                   rtol=1e-13, atol=1e-13)


@needs_cpp
def test_activations_are_kept_only_for_the_backward():
    inputs = make_inputs(9, 3, 3, 8, 6, 5, 7, seed=0)
    _, x1, h, f1, fb = torch.ops.pyzsl.feedback_synthesis(*inputs, 0.5, 4, None, False)
    assert x1.numel() == h.numel() == f1.numel() == fb.numel() == 0
    _, x1, h, f1, fb = torch.ops.pyzsl.feedback_synthesis(*inputs, 0.5, 4, None, True)
    assert [list(t.shape) for t in (x1, h, f1, fb)] == [[9, 8], [9, 5], [9, 7], [9, 8]]


@needs_cpp
def test_backward_recomputes_activations_that_were_not_kept():
    """Called with keep_activations=False on inputs that need gradients, the backward still gets them right."""
    inputs = make_inputs(10, 3, 4, 9, 7, 6, 8, seed=1)
    ours, our_grads = outputs_and_grads(
        lambda *t: torch.ops.pyzsl.feedback_synthesis(*t, 0.4, 3, None, False)[0], inputs, seed=1)
    ref, ref_grads = outputs_and_grads(lambda *t: feedback_synthesis_reference(*t, 0.4), inputs, seed=1)
    torch.testing.assert_close(ours, ref, **TOL[torch.float64])
    for i in DIFFERENTIABLE:
        torch.testing.assert_close(our_grads[i], ref_grads[i], **TOL[torch.float64])


def _differentiable_call(op, inputs, alpha, chunk_size, names):
    """A function of the inputs ``names`` only (gradcheck perturbs every tensor it is given) and those leaves."""
    positions = [NAMES.index(name) for name in names]

    def fn(*leaves):
        args = list(inputs)
        for i, leaf in zip(positions, leaves):
            args[i] = leaf
        return op(*args, alpha, chunk_size, None, True)[0]

    return fn, [inputs[i].detach().clone().requires_grad_(True) for i in positions]


def gradcheck_synthesis(op, seed, chunk, fast_mode=False):
    """The op's gradient treats the decoder hidden h as a constant (as published), while finite differences see
    every path. So: all differentiable inputs with dec_w1 = 0, where h = lrelu(dec_b1) really is constant; and the
    feedback weights, which do not reach h, with a real decoder."""
    inputs = make_inputs(5, 2, 3, 6, 4, 5, 3, seed=seed)
    frozen = list(inputs)
    frozen[NAMES.index("dec_w1")] = torch.zeros_like(inputs[NAMES.index("dec_w1")])
    fn, leaves = _differentiable_call(op, frozen, 0.6, chunk, [NAMES[i] for i in DIFFERENTIABLE])
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=fast_mode)
    fn, leaves = _differentiable_call(op, inputs, 0.6, chunk, ["fb_w1", "fb_b1", "fb_w2", "fb_b2"])
    assert torch.autograd.gradcheck(fn, leaves, fast_mode=fast_mode)


@needs_cpp
def test_gradcheck():
    for seed, chunk in ((0, 2), (1, 10)):
        gradcheck_synthesis(torch.ops.pyzsl.feedback_synthesis, seed, chunk)


@needs_cpp
@pytest.mark.slow
def test_opcheck():
    inputs = make_inputs(6, 2, 3, 5, 4, 3, 6, seed=0)
    with_grad = [t.requires_grad_(i in DIFFERENTIABLE) for i, t in enumerate(inputs)]
    opcheck(torch.ops.pyzsl.feedback_synthesis.default, (*with_grad, 0.5, 4, None, True))
    plain = [t.detach() for t in inputs]
    opcheck(torch.ops.pyzsl.feedback_synthesis.default, (*plain, 0.5, 4, None, False))
    low = [t.float() for t in plain]
    opcheck(torch.ops.pyzsl.feedback_synthesis.default, (*low, 0.5, 4, torch.bfloat16, False))
    out, *activations = torch.ops.pyzsl.feedback_synthesis(*plain, 0.5, 4, None, True)
    args = (torch.randn_like(out), out, *activations, plain[0], plain[1], plain[2], plain[4], plain[8], plain[10],
            0.5, 4, None)
    opcheck(torch.ops.pyzsl._feedback_synthesis_backward.default, args)


def _leaky_grad(x):
    return torch.where(x > 0, 1.0, 0.2).double()


def backward_oracle(grad_out, out, x1, h, f1, fb, inputs, alpha):
    """The op's gradients in float64, written from the chain rule, given the forward's output and activations."""
    noise, attributes, w1, _, w3, _, _, _, _, _, wf2, _ = (t.double() for t in inputs)
    grad_out, out, x1, h, f1, fb = (t.double() for t in (grad_out, out, x1, h, f1, fb))
    za = torch.cat([noise, attributes], dim=1)
    dp = grad_out * out * (1 - out)                    # through the final sigmoid
    dg = dp @ w3                                       # d(x1 + alpha fb)
    dx1, dpf2 = dg * _leaky_grad(x1), alpha * dg * _leaky_grad(fb)
    df1 = (dpf2 @ wf2) * _leaky_grad(f1)
    dza = dx1 @ w1
    nz = noise.shape[1]
    return [dza[:, :nz], dza[:, nz:], dx1.T @ za, dx1.sum(0), dp.T @ (x1 + alpha * fb), dp.sum(0), df1.T @ h,
            df1.sum(0), dpf2.T @ f1, dpf2.sum(0)]


def check_low_precision(forward_op, backward_op, backend, compute_dtype, seed):
    """bf16/fp16 compute, forward and backward.

    Output: its error against the float64 oracle is at most twice the reference's at the same compute dtype, plus
    one rounding unit (the kernel may round in another order, not less accurately).
    Gradients: end-to-end comparisons are dominated by LeakyReLU masks that flip where a rounded pre-activation
    crosses zero, so the backward is checked on the forward's own activations against the float64 chain rule:
    every GEMM operand is rounded once to the compute type, which bounds the norm-wise relative error by a few
    units of its epsilon (measured: below 0.8 eps), and 2 eps is asserted.
    """
    unit = torch.finfo(compute_dtype).eps
    alpha = 0.5
    inputs = make_inputs(64, 12, 12, 48, 40, 36, 44, seed=seed, dtype=torch.float32)
    oracle = feedback_synthesis_reference(*[t.double() for t in inputs], alpha)
    ours = feedback_synthesis(*inputs, alpha, chunk_size=24, compute_dtype=compute_dtype, backend=backend)
    ref = feedback_synthesis_reference(*inputs, alpha, compute_dtype=compute_dtype)
    assert ours.dtype == torch.float32
    ours_error, ref_error = ((x.double() - oracle).abs().max().item() for x in (ours, ref))
    assert 0 < ours_error <= 2 * ref_error + unit, (ours_error, ref_error)  # > 0: it really computed narrow

    out, *activations = forward_op(*inputs, alpha, 24, compute_dtype, True)
    assert all(t.dtype == compute_dtype for t in activations)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    grads = backward_op(grad_out, out, *activations, inputs[0], inputs[1], inputs[2], inputs[4], inputs[8],
                        inputs[10], alpha, 24, compute_dtype)
    for name, grad, expected in zip([NAMES[i] for i in DIFFERENTIABLE], grads,
                                    backward_oracle(grad_out, out, *activations, inputs, alpha)):
        assert grad.dtype == torch.float32
        relative = ((grad.double() - expected).norm() / expected.norm()).item()
        assert relative <= 2 * unit, f"gradient of {name}: relative error {relative:.2e} > 2 eps = {2 * unit:.2e}"


@needs_cpp
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16])
def test_cpp_low_precision_compute(compute_dtype):
    for seed in range(3):
        check_low_precision(torch.ops.pyzsl.feedback_synthesis, torch.ops.pyzsl._feedback_synthesis_backward, "cpp",
                            compute_dtype, seed)


def test_compute_dtype_equal_to_the_input_dtype_is_plain_compute():
    inputs = make_inputs(8, 3, 3, 7, 5, 6, 4, seed=0, dtype=torch.float32)
    plain = feedback_synthesis(*inputs, 0.5, backend="reference")
    same = feedback_synthesis(*inputs, 0.5, compute_dtype=torch.float32, backend="reference")
    assert torch.equal(plain, same)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_matches_reference(dtype):
    # Shapes and chunks cross the kernel's 16..64-wide tiles and leave partial tiles in every dimension.
    for seed, (shape, chunk) in enumerate([((0, 3, 4, 8, 5, 6, 7), 4), ((1, 2, 3, 5, 4, 3, 6), 5),
                                           ((7, 3, 5, 11, 13, 9, 6), 3), ((70, 5, 4, 67, 20, 18, 33), 40)]):
        inputs = make_inputs(*shape, seed=seed, dtype=dtype)
        assert_matches_reference(inputs, 0.7, backend="triton", chunk_size=chunk, seed=seed, tol=TOL[dtype])


@needs_triton
def test_triton_half_compute():
    # float16, not bfloat16: bf16 arithmetic is wrong in the Triton interpreter (GUIDE §2).
    from pyzsl.ops._synthesis_triton import feedback_synthesis_triton, feedback_synthesis_triton_backward

    check_low_precision(feedback_synthesis_triton, feedback_synthesis_triton_backward, "triton", torch.float16, 0)


@needs_triton
@pytest.mark.slow
def test_triton_gradcheck_and_opcheck():
    from pyzsl.ops._synthesis_triton import feedback_synthesis_triton

    # fast mode (random projections of the Jacobian): each column of the full check is 6 interpreted launches
    gradcheck_synthesis(feedback_synthesis_triton, seed=2, chunk=3, fast_mode=True)
    inputs = make_inputs(5, 2, 3, 6, 4, 5, 3, seed=2)
    with_grad = [t.requires_grad_(i in DIFFERENTIABLE) for i, t in enumerate(inputs)]
    opcheck(torch.ops.pyzsl.feedback_synthesis_triton.default, (*with_grad, 0.5, 4, None, True))


def test_backends_without_a_kernel_or_unavailable_are_named(monkeypatch):
    inputs = make_inputs(3, 2, 2, 4, 3, 3, 3, seed=0)
    with pytest.raises(ValueError, match="no 'cuda' kernel"):
        feedback_synthesis(*inputs, 0.5, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        feedback_synthesis(*inputs, 0.5, backend="bogus")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' cannot run here"):
        feedback_synthesis(*inputs, 0.5, backend="triton")


@needs_cpp
def test_auto_picks_the_cpp_kernel_on_cpu(monkeypatch):
    monkeypatch.delenv("PYZSL_BACKEND", raising=False)
    calls = []
    real = torch.ops.pyzsl.feedback_synthesis

    class Spy:
        def __call__(self, *args):
            calls.append(args)
            return real(*args)

    monkeypatch.setattr(torch.ops.pyzsl, "feedback_synthesis", Spy())
    inputs = make_inputs(3, 2, 2, 4, 3, 3, 3, seed=0)
    feedback_synthesis(*inputs, 0.5)
    assert len(calls) == 1


@pytest.mark.parametrize("index, bad, message", [
    (0, torch.zeros(3), r"noise must be 2-D \[N, nz\], got shape \[3\]"),
    (1, torch.zeros(4, 2), r"attributes must have shape \[N, na\] \(N from noise\) = \[3, 2\], got \[4, 2\]"),
    (2, torch.zeros(4, 5), r"gen_w1 must have shape \[H, nz \+ na\] = \[4, 4\], got \[4, 5\]"),
    (3, torch.zeros(5), r"gen_b1 must have shape \[H\] = \[4\], got \[5\]"),
    (4, torch.zeros(3, 5), r"gen_w3 must have shape \[X, H\] = \[3, 4\], got \[3, 5\]"),
    (6, torch.zeros(3), r"dec_w1 must be 2-D \(nn.Linear layout \[out, in\]\), got shape \[3\]"),
    (8, torch.zeros(3, 2), r"fb_w1 must have shape \[Hf, Hd\] = \[3, 3\], got \[3, 2\]"),
    (10, torch.zeros(4, 4), r"fb_w2 must have shape \[H, Hf\] = \[4, 3\], got \[4, 4\]"),
    (11, torch.zeros(3), r"fb_b2 must have shape \[H\] = \[4\], got \[3\]"),
    (5, torch.zeros(3, dtype=torch.float64), r"gen_b3 is torch.float64"),
    (7, "bias", r"dec_b1 must be a torch.Tensor, got str"),
])
def test_bad_shapes_and_types_are_named(index, bad, message):
    inputs = make_inputs(3, 2, 2, 4, 3, 3, 3, seed=0, dtype=torch.float32)
    inputs[index] = bad
    with pytest.raises((ValueError, TypeError), match=message):
        feedback_synthesis(*inputs, 0.5, backend="reference")


def test_bad_options_are_named():
    inputs = make_inputs(3, 2, 2, 4, 3, 3, 3, seed=0, dtype=torch.float32)
    with pytest.raises(ValueError, match="alpha must be a Python float"):
        feedback_synthesis(*inputs, torch.tensor(0.5))
    with pytest.raises(ValueError, match="alpha must be finite, got nan"):
        feedback_synthesis(*inputs, float("nan"))
    with pytest.raises(ValueError, match="chunk_size must be None or an int >= 1, got 0"):
        feedback_synthesis(*inputs, 0.5, chunk_size=0)
    with pytest.raises(ValueError, match="compute_dtype must be None, the input dtype or one of"):
        feedback_synthesis(*inputs, 0.5, compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="needs float32 inputs, got torch.float64"):
        feedback_synthesis(*[t.double() for t in inputs], 0.5, compute_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="noise must be float32 or float64"):
        feedback_synthesis(*[t.half() for t in inputs], 0.5)


@needs_cpp
def test_cpp_op_checks_shapes_itself():
    """Called directly (bypassing the Python checks), the C++ op still refuses mismatched shapes with a message."""
    inputs = make_inputs(3, 2, 2, 4, 3, 3, 3, seed=0)
    inputs[10] = torch.zeros(4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"fb_w2 must be \[4, 3\]"):
        torch.ops.pyzsl.feedback_synthesis(*inputs, 0.5, 2, None, False)
