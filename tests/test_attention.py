"""pyzsl.ops.head_max_scores and shared_multi_attention against their references and the formulas."""
import pytest
import torch
from torch.library import opcheck

from pyzsl._backend import available_backends, cpp_built
from pyzsl.ops import _reference, head_max_scores, shared_multi_attention

needs_cpp = pytest.mark.skipif(not cpp_built(), reason="pyzsl._C did not build")


def randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def grads(outputs, inputs, seed):
    weights = randn(*outputs.shape, seed=seed, dtype=outputs.dtype)
    return torch.autograd.grad((outputs * weights).sum(), inputs)


@needs_cpp
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 10, 7, 13), (2, 4, 5, 1030), (4, 1, 9, 600), (0, 3, 4, 5),
                                   (2, 3, 4, 0)])
def test_head_max_matches_reference(shape):
    B, M, D, L = shape
    for seed in range(2):
        attended = randn(B, M, D, seed=seed).requires_grad_(True)
        classifiers = randn(L, D, seed=seed + 10).requires_grad_(True)
        scores, head = head_max_scores(attended, classifiers, backend="cpp")
        ref_scores, ref_head = _reference.head_max_scores(attended, classifiers)
        torch.testing.assert_close(scores, ref_scores, rtol=1e-12, atol=1e-12)
        assert torch.equal(head, ref_head) and head.dtype == torch.int64
        if scores.numel():
            for ours, ref in zip(grads(scores, (attended, classifiers), seed), grads(ref_scores, (attended, classifiers), seed)):
                torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


@needs_cpp
def test_head_max_ties_go_to_the_lowest_head_and_take_the_whole_gradient():
    attended = randn(2, 1, 6, seed=0).repeat(1, 4, 1).requires_grad_(True)  # four identical heads
    classifiers = randn(5, 6, seed=1)
    scores, head = head_max_scores(attended, classifiers, backend="cpp")
    assert torch.equal(head, torch.zeros_like(head))
    scores.sum().backward()
    torch.testing.assert_close(attended.grad[:, 0], classifiers.sum(0).expand(2, 6))
    assert torch.count_nonzero(attended.grad[:, 1:]) == 0


@needs_cpp
def test_head_max_equals_the_loop_formula():
    attended, classifiers = randn(2, 3, 4, seed=2), randn(6, 4, seed=3)
    scores, head = head_max_scores(attended, classifiers, backend="cpp")
    for b in range(2):
        for l in range(6):
            per_head = [float(attended[b, m] @ classifiers[l]) for m in range(3)]
            assert scores[b, l].item() == pytest.approx(max(per_head), abs=1e-12)
            assert head[b, l].item() == per_head.index(max(per_head))


@needs_cpp
def test_head_max_gradcheck_and_opcheck():
    attended = randn(2, 3, 5, seed=4).requires_grad_(True)
    classifiers = randn(9, 5, seed=5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, c: torch.ops.pyzsl.head_max_scores(a, c)[0], (attended, classifiers))
    opcheck(torch.ops.pyzsl.head_max_scores.default, (attended, classifiers))
    opcheck(torch.ops.pyzsl.head_max_scores.default, (attended.detach().float(), classifiers.detach().float()))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shared_multi_attention_matches_reference_and_formula(dtype):
    B, R, D, H, M, L = 3, 196, 16, 12, 10, 700
    features = randn(B, R, D, seed=0, dtype=dtype).relu()
    params = [randn(D + 1, H, seed=1, dtype=dtype) * 0.2, randn(H + 1, M, seed=2, dtype=dtype),
              randn(L, D, seed=3, dtype=dtype)]
    inputs = [features.requires_grad_(True)] + [p.requires_grad_(True) for p in params]
    ours = shared_multi_attention(*inputs, backend="cpp")
    ref = shared_multi_attention(*inputs, backend="reference")
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.scores, ref.scores, **tol)
    assert torch.equal(ours.head, ref.head)
    for a, b in zip(grads(ours.scores, inputs, 7), grads(ref.scores, inputs, 7)):
        torch.testing.assert_close(a, b, **tol)
    # The formula, written out for one image and one label.
    b, l = 1, 5
    aug = torch.cat([features[b], torch.ones(R, 1, dtype=dtype)], 1)
    alpha = torch.softmax((torch.cat([torch.tanh(aug @ params[0]), torch.ones(R, 1, dtype=dtype)], 1) @ params[1]).T, 1)
    per_head = (alpha @ aug)[:, :D] @ params[2][l]
    torch.testing.assert_close(ours.scores[b, l], per_head.max(), **tol)
    assert ours.attended.shape == (B, M, D + 1) and ours.attention_logits.shape == (B, M, R)
    # The appended-one feature of f_m is sum_r alpha_mr = 1.
    torch.testing.assert_close(ours.attended[..., D].detach(), torch.ones(B, M, dtype=dtype), **tol)


needs_triton = pytest.mark.skipif("triton" not in available_backends("cpu"),
                                  reason="triton is not installed or TRITON_INTERPRET is not set")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_head_max_triton_matches_reference(dtype):
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for B, M, D, L in [(1, 1, 1, 1), (3, 10, 7, 13), (2, 4, 40, 70), (0, 3, 4, 5), (2, 3, 4, 0)]:
        attended = randn(B, M, D, seed=B + L, dtype=dtype).requires_grad_(True)
        classifiers = randn(L, D, seed=D, dtype=dtype).requires_grad_(True)
        scores, head = head_max_scores(attended, classifiers, backend="triton")
        ref_scores, ref_head = _reference.head_max_scores(attended, classifiers)
        torch.testing.assert_close(scores, ref_scores, **tol)
        assert torch.equal(head, ref_head)
        if scores.numel():
            for ours, ref in zip(grads(scores, (attended, classifiers), 0), grads(ref_scores, (attended, classifiers), 0)):
                torch.testing.assert_close(ours, ref, **tol)


@needs_triton
def test_head_max_triton_ties_gradcheck_opcheck():
    from pyzsl.ops._triton import head_max_scores_triton

    tied = randn(2, 1, 6, seed=0).repeat(1, 4, 1)
    _, head = head_max_scores(tied, randn(5, 6, seed=1), backend="triton")
    assert torch.equal(head, torch.zeros_like(head))
    attended = randn(2, 3, 5, seed=4).requires_grad_(True)
    classifiers = randn(9, 5, seed=5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, c: head_max_scores_triton(a, c)[0], (attended, classifiers))
    opcheck(torch.ops.pyzsl.head_max_scores_triton.default, (attended, classifiers))


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="same D"):
        head_max_scores(randn(2, 3, 4, seed=0), randn(5, 6, seed=0))
    with pytest.raises(ValueError, match="at least one head"):
        head_max_scores(randn(2, 0, 4, seed=0), randn(5, 4, seed=0))
    with pytest.raises(ValueError, match="floating dtype"):
        head_max_scores(randn(2, 3, 4, seed=0), randn(5, 4, seed=0, dtype=torch.float32))
    with pytest.raises(ValueError, match="w1"):
        shared_multi_attention(randn(2, 7, 4, seed=0), randn(4, 3, seed=0), randn(4, 2, seed=0), randn(5, 4, seed=0))
    with pytest.raises(ValueError, match="no 'cuda' kernel"):
        head_max_scores(randn(2, 3, 4, seed=0), randn(5, 4, seed=0), backend="cuda")
