"""pyzsl.ops.region_attention (the fused attention over regions) and shared_multi_attention on every backend, against
the plain-PyTorch reference (pyzsl.ops._reference.region_attention) and the formula written out."""
import pytest
import torch
from torch.library import opcheck

from pyzsl._backend import available_backends, cpp_built
from pyzsl.ops import _reference, region_attention, shared_multi_attention

needs_cpp = pytest.mark.skipif(not cpp_built(), reason="pyzsl._C did not build")
needs_triton = pytest.mark.skipif("triton" not in available_backends("cpu"),
                                  reason="triton is not installed or TRITON_INTERPRET is not set")
BACKENDS = [pytest.param("cpp", marks=needs_cpp), pytest.param("triton", marks=needs_triton)]

# (B, R, D, H, M, L): LESA-like, then the awkward ones: one image, one region, one head, one label, D and H not
# multiples of 8 or 16, R larger than a Triton region block and not a multiple of it.
SHAPES = [(3, 49, 16, 12, 10, 70), (1, 5, 7, 9, 3, 1), (2, 1, 5, 3, 4, 6), (2, 6, 13, 11, 1, 9),
          (1, 1, 1, 1, 1, 1), (2, 37, 19, 23, 17, 33)]
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def make(B, R, D, H, M, L, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(B, R, D, generator=g, dtype=dtype).relu()
    w1 = torch.randn(D + 1, H, generator=g, dtype=dtype) * (D + 1) ** -0.5
    w2 = torch.randn(H + 1, M, generator=g, dtype=dtype) * 2 * (H + 1) ** -0.5
    classifiers = torch.randn(L, D, generator=g, dtype=dtype) * D ** -0.5
    return [t.requires_grad_(True) for t in (features, w1, w2, classifiers)]


def weights_like(t, seed):
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(seed), dtype=t.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_region_attention_matches_reference(backend, dtype, shape):
    for seed in range(3):
        features, w1, w2, _ = make(*shape, seed=seed, dtype=dtype)
        ours = region_attention(features, w1, w2, backend=backend)
        ref = _reference.region_attention(features, w1, w2)
        B, R, D, H, M, _ = shape
        assert ours.attended.shape == (B, M, D + 1) and ours.attention_logits.shape == (B, M, R)
        assert ours.attended.dtype == dtype and ours.attention_logits.dtype == dtype
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, **TOL[dtype])
        # gradients through both outputs, with random weights on each
        g_att, g_log = weights_like(ref[0], seed + 100), weights_like(ref[1], seed + 200)
        grads = torch.autograd.grad((ours[0] * g_att).sum() + (ours[1] * g_log).sum(), (features, w1, w2))
        ref_grads = torch.autograd.grad((ref[0] * g_att).sum() + (ref[1] * g_log).sum(), (features, w1, w2))
        for name, a, b in zip(("features", "w1", "w2"), grads, ref_grads):
            torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_shared_multi_attention_matches_reference(backend, dtype):
    for shape in SHAPES:
        for seed in range(2):
            inputs = make(*shape, seed=seed, dtype=dtype)
            ours = shared_multi_attention(*inputs, backend=backend)
            ref = shared_multi_attention(*inputs, backend="reference")
            torch.testing.assert_close(ours.scores, ref.scores, **TOL[dtype])
            torch.testing.assert_close(ours.attended, ref.attended, **TOL[dtype])
            torch.testing.assert_close(ours.attention_logits, ref.attention_logits, **TOL[dtype])
            # Exact or near ties between heads (R = 1 makes every head the same) may go to either head: compare the
            # arg-max and the gradients elsewhere only.
            D = shape[2]
            all_heads = torch.einsum("bmd,ld->bml", ref.attended[:, :, :D], inputs[3]).detach()
            top2 = all_heads.topk(min(2, shape[4]), dim=1).values
            clear = (top2[:, 0] - top2[:, -1] > 1e-6) | (shape[4] == 1)
            assert torch.equal(ours.head[clear], ref.head[clear])
            if dtype == torch.float64:
                loss = lambda out: (out.scores * weights_like(out.scores, seed) * clear).sum() + \
                    (out.attention_logits * weights_like(out.attention_logits, seed + 1)).sum()
                for a, b in zip(torch.autograd.grad(loss(ours), inputs), torch.autograd.grad(loss(ref), inputs)):
                    torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_region_attention_equals_the_formula(backend):
    """The published form, with the ones appended to the features and the hidden layer, for one image."""
    features, w1, w2, _ = make(2, 11, 6, 5, 3, 1, seed=4, dtype=torch.float64)
    out = region_attention(features, w1, w2, backend=backend)
    b = 1
    aug = torch.cat([features[b], torch.ones(11, 1, dtype=torch.float64)], 1)
    hidden = torch.cat([torch.tanh(aug @ w1), torch.ones(11, 1, dtype=torch.float64)], 1)
    logits = (hidden @ w2).T
    alpha = torch.softmax(logits, 1)
    torch.testing.assert_close(out.attention_logits[b], logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.attended[b], alpha @ aug, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.attended[..., -1].detach(), torch.ones(2, 3, dtype=torch.float64), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_region_attention_gradcheck(backend):
    for shape in [(2, 5, 4, 3, 2, 1), (1, 1, 3, 2, 1, 1), (2, 7, 5, 6, 3, 1)]:
        features, w1, w2, _ = make(*shape, seed=sum(shape), dtype=torch.float64)

        def both(f, a, b):
            out = region_attention(f, a, b, backend=backend)
            return out.attended, out.attention_logits

        assert torch.autograd.gradcheck(both, (features, w1, w2))
        # only the weights need a gradient (the features do not: that backward path skips two GEMMs)
        assert torch.autograd.gradcheck(lambda a, b: both(features.detach(), a, b), (w1, w2))


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_shared_multi_attention_gradcheck(backend):
    features, w1, w2, classifiers = make(2, 6, 4, 3, 3, 5, seed=9, dtype=torch.float64)

    def scores(*inputs):
        out = shared_multi_attention(*inputs, backend=backend)
        return out.scores, out.attention_logits

    assert torch.autograd.gradcheck(scores, (features, w1, w2, classifiers))


@needs_cpp
def test_region_attention_cpp_opcheck():
    for dtype in (torch.float64, torch.float32):
        features, w1, w2, _ = make(2, 7, 5, 6, 3, 1, seed=1, dtype=dtype)
        opcheck(torch.ops.pyzsl.region_attention.default, (features, w1, w2))
        out = torch.ops.pyzsl.region_attention(features.detach(), w1.detach(), w2.detach())
        grads = (weights_like(out[0], 0), weights_like(out[1], 1))
        for need in (True, False):
            opcheck(torch.ops.pyzsl._region_attention_backward.default,
                    grads + (features.detach(), w1.detach(), w2.detach(), out[2], out[3], need))


@needs_triton
def test_region_attention_triton_opcheck():
    import pyzsl.ops._attention_triton  # noqa: F401  (defines the ops; shared_multi_attention imports it lazily)

    features, w1, w2, _ = make(2, 7, 5, 6, 3, 1, seed=1, dtype=torch.float64)
    opcheck(torch.ops.pyzsl.region_attention_triton.default, (features, w1, w2))
    out = torch.ops.pyzsl.region_attention_triton(features.detach(), w1.detach(), w2.detach())
    grads = (weights_like(out[0], 0), weights_like(out[1], 1))
    for need in (True, False):
        opcheck(torch.ops.pyzsl._region_attention_triton_backward.default,
                grads + (features.detach(), w1.detach(), w2.detach(), out[2], out[3], need))


@needs_cpp
def test_backward_skips_the_feature_gradient_only_when_unneeded():
    features, w1, w2, _ = make(2, 7, 5, 6, 3, 1, seed=2, dtype=torch.float64)
    out = torch.ops.pyzsl.region_attention(features.detach(), w1.detach(), w2.detach())
    args = (weights_like(out[0], 0), weights_like(out[1], 1), features.detach(), w1.detach(), w2.detach(), out[2],
            out[3])
    with_features = torch.ops.pyzsl._region_attention_backward(*args, True)
    without = torch.ops.pyzsl._region_attention_backward(*args, False)
    assert without[0] is None and with_features[0].shape == features.shape
    torch.testing.assert_close(with_features[1], without[1], rtol=0, atol=0)
    torch.testing.assert_close(with_features[2], without[2], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_bad_shapes_name_the_argument(backend):
    f, w1, w2, c = (t.detach() for t in make(2, 7, 4, 3, 2, 5, seed=0, dtype=torch.float64))
    cases = [
        ((f[0], w1, w2), r"features must be 3-D, got shape \[7, 4\]"),
        ((f, w1[:-1], w2), r"w1 must be \[D \+ 1, H\] = \[5, H\] for features \[2, 7, 4\], got \[4, 3\]"),
        ((f, w1, w2[:-1]), r"w2 must be \[H \+ 1, M\] = \[4, M\] for w1 \[5, 3\], got \[3, 2\]"),
        ((f, w1, w2[:, :0]), r"w2 needs at least one head, got shape \[4, 0\]"),
        ((f[:, :0], w1, w2), r"features needs at least one region, got shape \[2, 0, 4\]"),
        ((f, w1.float(), w2), r"w1 is torch.float32 but features is torch.float64"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            region_attention(*args, backend=backend)
        with pytest.raises(ValueError, match=message):
            shared_multi_attention(*args, c, backend=backend)
    with pytest.raises(ValueError, match=r"classifiers must be \[L, D\] = \[L, 4\] for features \[2, 7, 4\], got "
                                         r"\[5, 3\]"):
        shared_multi_attention(f, w1, w2, c[:, :3], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_backends_reject_other_dtypes(backend):
    f, w1, w2, _ = (t.detach().half() for t in make(2, 7, 4, 3, 2, 5, seed=0, dtype=torch.float32))
    with pytest.raises(ValueError, match="float32 or float64, got torch.float16"):
        region_attention(f, w1, w2, backend=backend)


@needs_cpp
def test_cpp_kernel_checks_shapes_itself():
    f, w1, w2, _ = (t.detach() for t in make(2, 7, 4, 3, 2, 5, seed=0, dtype=torch.float64))
    with pytest.raises(ValueError, match="w1 must be"):
        torch.ops.pyzsl.region_attention(f, w1[:-1], w2)
    with pytest.raises(ValueError, match="w2 must be"):
        torch.ops.pyzsl.region_attention(f, w1, w2[:-1])


@needs_cpp
def test_memory_does_not_grow_with_the_label_set():
    """The fused path never forms [B, M, L]: the largest tensor it allocates is independent of L."""
    from torch.profiler import profile

    def largest_allocation(L):
        features, w1, w2, classifiers = make(4, 9, 4, 6, 8, L, seed=0, dtype=torch.float32)
        with profile(profile_memory=True) as prof:
            out = shared_multi_attention(features, w1, w2, classifiers, backend="cpp")
            (out.scores.sum() + out.attention_logits.sum()).backward()
        return max(e.cpu_memory_usage for e in prof.events())

    L = 20_000
    # [B, M, L] float32 would be 4 * 8 * L * 4 bytes; the [B, L] scores and int64 heads, [L, D] gradients and the
    # label-block GEMMs are far smaller
    assert largest_allocation(L) < 4 * 8 * L * 4 / 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_is_as_accurate_as_the_reference(backend):
    """Against float64 truth, each float32 output and gradient is within 2x the float32 reference's error (plus a
    few ulp): the fused kernels may round differently, but not worse (e.g. region sums accumulate in double)."""
    shape = (3, 196, 16, 12, 10, 1)

    def run(dtype, which):
        features, w1, w2, _ = (t.detach().to(dtype).requires_grad_(True)
                               for t in make(*shape, seed=5, dtype=torch.float64))
        fn = _reference.region_attention if which == "reference" else \
            lambda *a: tuple(region_attention(*a, backend=which))
        attended, logits = fn(features, w1, w2)
        g_att = weights_like(attended.double(), 1).to(dtype)
        g_log = weights_like(logits.double(), 2).to(dtype)
        grads = torch.autograd.grad((attended * g_att).sum() + (logits * g_log).sum(), (features, w1, w2))
        return [attended, logits, *grads]

    truth = [t.detach() for t in run(torch.float64, "reference")]
    errors = lambda outs: [float((o.detach().double() - t).abs().max()) for o, t in zip(outs, truth)]
    for name, ours, ref, t in zip(("attended", "logits", "grad features", "grad w1", "grad w2"),
                                  errors(run(torch.float32, backend)), errors(run(torch.float32, "reference")), truth):
        assert ours <= 2 * ref + 4 * torch.finfo(torch.float32).eps * float(t.abs().max()), name
