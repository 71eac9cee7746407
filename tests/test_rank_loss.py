"""pyzsl.ops.lesa_rank_loss: the C++ kernel against the published pairwise form."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.library import opcheck

from pyzsl._backend import available_backends, cpp_built
from pyzsl.ops import _reference, lesa_rank_loss

from _inputs import make_inputs as shared_make_inputs

needs_cpp = pytest.mark.skipif(not cpp_built(), reason="pyzsl._C did not build")


def make_inputs(B, L, *, seed, dtype=torch.float64, tied=False):
    # tied: small integers with margin 1, so many pairs sit exactly on the hinge's kink
    return shared_make_inputs(B, L, seed=seed, dtype=dtype, tied=tied, p_unannotated=0.2, p_positive=0.3, levels=4)


def assert_matches_reference(scores, targets, margin, *, rtol, atol, backend="cpp"):
    ours_in = scores.clone().requires_grad_(True)
    ref_in = scores.clone().requires_grad_(True)
    ours = lesa_rank_loss(ours_in, targets, margin, backend=backend)
    ref = _reference.lesa_rank_loss(ref_in, targets, margin)
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol)
    if scores.numel():
        ours.backward()
        ref.backward()
        torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=rtol, atol=atol)


SHAPES = [(1, 1), (1, 2), (3, 1), (7, 13), (5, 37), (32, 101)]


@needs_cpp
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("margin", [0.0, 0.5, 1.0, 2.0])
def test_matches_pairwise_form_float64(margin, tied):
    for seed in range(3):
        for B, L in SHAPES:
            scores, targets = make_inputs(B, L, seed=seed, tied=tied)
            assert_matches_reference(scores, targets, margin, rtol=1e-12, atol=1e-12)


@needs_cpp
def test_matches_pairwise_form_float32():
    # The pairwise form sums in float32, the kernel in float64: agreement to float32 rounding.
    for seed in range(3):
        scores, targets = make_inputs(16, 257, seed=seed, dtype=torch.float32)
        assert_matches_reference(scores, targets, 1.0, rtol=1e-5, atol=1e-6)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_are_computed_in_float32(dtype):
    scores, targets = make_inputs(4, 30, seed=0, dtype=dtype)
    ours = lesa_rank_loss(scores, targets, backend="cpp")
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, _reference.lesa_rank_loss(scores.float(), targets), rtol=1e-5, atol=1e-6)


@needs_cpp
def test_images_without_pairs_give_zero_and_count_in_the_mean():
    scores = torch.tensor([[0.3, 0.1, 0.9], [0.5, 0.2, 0.4], [0.1, 0.7, 0.2], [0.0, 0.0, 0.0]], dtype=torch.float64)
    targets = torch.tensor([[1, 1, 1], [-1, -1, 0], [1, -1, 0], [0, 0, 0]], dtype=torch.int8)
    # Only image 2 has a pair: hinge 1 + 0.7 - 0.1 = 1.6 over one violating pair; the mean is over all 4 images.
    loss = lesa_rank_loss(scores, targets, backend="cpp")
    torch.testing.assert_close(loss, torch.tensor(1.6 / (1 + 1e-8) / 4, dtype=torch.float64))
    assert_matches_reference(scores, targets, 1.0, rtol=1e-12, atol=1e-12)


@needs_cpp
def test_empty_batch_is_nan_like_the_reference():
    scores, targets = torch.zeros(0, 5, dtype=torch.float64), torch.zeros(0, 5, dtype=torch.int8)
    assert torch.isnan(lesa_rank_loss(scores, targets, backend="cpp"))
    assert torch.isnan(_reference.lesa_rank_loss(scores, targets))


@needs_cpp
def test_gradcheck():
    for seed in range(3):
        scores, targets = make_inputs(3, 9, seed=seed)
        scores.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda s: torch.ops.pyzsl.lesa_rank_loss(s, targets, 1.0), (scores,))


@needs_cpp
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    scores, targets = make_inputs(4, 11, seed=0)
    opcheck(torch.ops.pyzsl.lesa_rank_loss.default, (scores.requires_grad_(requires_grad), targets, 1.0))
    opcheck(torch.ops.pyzsl._lesa_rank_loss_backward.default,
            (torch.tensor(1.0, dtype=torch.float64), scores.detach(), targets, 1.0))


@needs_cpp
@settings(max_examples=50, deadline=None)
@given(B=st.integers(1, 6), L=st.integers(1, 24), seed=st.integers(0, 10_000), tied=st.booleans(),
       margin=st.sampled_from([0.0, 0.25, 1.0, 3.0]))
def test_fuzz_against_pairwise_form(B, L, seed, tied, margin):
    scores, targets = make_inputs(B, L, seed=seed, tied=tied)
    assert_matches_reference(scores, targets, margin, rtol=1e-12, atol=1e-12)


needs_triton = pytest.mark.skipif("triton" not in available_backends("cpu"),
                                  reason="triton is not installed or TRITON_INTERPRET is not set")


@needs_triton
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("margin", [0.0, 1.0])
def test_triton_matches_pairwise_form(margin, tied):
    # Shapes cross the kernel's 32-label and 128-partner blocks.
    for B, L in [(1, 1), (2, 5), (3, 37), (2, 150)]:
        scores, targets = make_inputs(B, L, seed=B + L, tied=tied)
        assert_matches_reference(scores, targets, margin, rtol=1e-12, atol=1e-12, backend="triton")
    scores, targets = make_inputs(3, 40, seed=0, dtype=torch.float32)
    assert_matches_reference(scores, targets, 1.0, rtol=1e-5, atol=1e-6, backend="triton")


@needs_triton
def test_triton_gradcheck_and_opcheck():
    from pyzsl.ops._triton import lesa_rank_loss_triton

    scores, targets = make_inputs(3, 9, seed=1)
    scores.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: lesa_rank_loss_triton(s, targets, 1.0), (scores,))
    opcheck(torch.ops.pyzsl.lesa_rank_loss_triton.default, (scores, targets, 1.0))


def test_backend_without_a_kernel_is_named():
    scores, targets = make_inputs(2, 5, seed=0)
    with pytest.raises(ValueError, match="no 'cuda' kernel"):
        lesa_rank_loss(scores, targets, backend="cuda")


def test_bad_input_is_rejected():
    scores, targets = make_inputs(2, 5, seed=0)
    with pytest.raises(ValueError, match="targets must take values"):
        lesa_rank_loss(scores, targets * 2)
    with pytest.raises(ValueError, match="targets must have the shape"):
        lesa_rank_loss(scores, targets[:, :4])
    with pytest.raises(ValueError, match="2-D floating"):
        lesa_rank_loss(scores[0], targets[0])
    with pytest.raises(ValueError, match="backend"):
        lesa_rank_loss(scores, targets, backend="bogus")
