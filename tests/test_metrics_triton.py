"""The Triton evaluation kernels against the pure-PyTorch reference, run in the Triton interpreter on CPU.

Inputs are fresh random tensors over several seeds, with awkward shapes, heavy ties, masked rows, unannotated
entries, and labels/rows without positives. Block-size constants are shrunk in some tests so that small inputs
still cross every loop and chunk boundary of the kernels.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates the kernels

import pytest
import torch

from pyzsl.metrics import _reference, _triton

pytestmark = pytest.mark.skipif(not _triton.TRITON_AVAILABLE, reason="triton is not installed")

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SHAPES = [(1, 1), (1, 7), (6, 1), (37, 13), (150, 40)]


def make_inputs(N, L, dtype, seed, tied=False, fully_annotated=False):
    """Scores [N, L] (integers 0..3 when ``tied``), targets in {1, 0, -1} (no 0 when ``fully_annotated``), row mask."""
    generator = torch.Generator().manual_seed(seed)
    if tied:
        scores = torch.randint(0, 4, (N, L), generator=generator).to(dtype)
    else:
        scores = torch.randn(N, L, generator=generator).to(dtype)
    low = -1 if fully_annotated else -2  # -2 and -1 both map to -1 below, so -1 is as common as 0 and 1 together
    targets = torch.randint(low, 2, (N, L), generator=generator).clamp(min=-1).to(torch.int8)
    if fully_annotated:
        targets[targets == 0] = -1
    row_mask = torch.rand(N, generator=generator) > 0.3
    return scores, targets, row_mask


def assert_ap_matches(scores, targets, row_mask, unannotated_is_negative):
    ap, num_positives = _triton.multilabel_ap_triton(scores, targets, row_mask, unannotated_is_negative)
    expected_ap, expected_positives = _reference.multilabel_ap(scores, targets, row_mask, unannotated_is_negative)
    assert ap.dtype == torch.float64 and num_positives.dtype == torch.int64
    torch.testing.assert_close(ap, expected_ap, atol=1e-12, rtol=0)
    assert torch.equal(num_positives, expected_positives)


def assert_topk_matches(scores, targets, k):
    hits, row_positives = _triton.multilabel_topk_hits_triton(scores, targets, k)
    expected_hits, expected_positives = _reference.multilabel_topk_hits(scores, targets, k)
    assert hits.dtype == torch.bool and row_positives.dtype == torch.int64
    assert torch.equal(hits, expected_hits)
    assert torch.equal(row_positives, expected_positives)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ap_matches_reference(dtype, shape):
    for seed in range(2):
        scores, targets, row_mask = make_inputs(*shape, dtype, seed)
        for mask in (None, row_mask):
            for unannotated_is_negative in (False, True):
                assert_ap_matches(scores, targets, mask, unannotated_is_negative)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_ap_with_many_ties(dtype, seed):
    scores, targets, row_mask = make_inputs(97, 11, dtype, seed, tied=True)
    for mask in (None, row_mask):
        for unannotated_is_negative in (False, True):
            assert_ap_matches(scores, targets, mask, unannotated_is_negative)


def test_ap_fully_annotated_ignores_the_switch():
    scores, targets, row_mask = make_inputs(64, 9, torch.float32, 0, fully_annotated=True)
    assert_ap_matches(scores, targets, row_mask, False)
    assert torch.equal(
        _triton.multilabel_ap_triton(scores, targets, row_mask, False)[0],
        _triton.multilabel_ap_triton(scores, targets, row_mask, True)[0],
    )


def test_ap_labels_without_positives_and_masked_rows():
    scores, targets, _ = make_inputs(50, 8, torch.float32, 1, tied=True)
    targets[:, 0] = -1  # no positive: AP 0
    targets[:, 1] = 0  # nothing annotated
    targets[:, 2] = 1  # every row positive: AP 1
    targets[:, 3] = torch.where(torch.arange(50) < 25, 1, 0).to(torch.int8)  # positives only in the masked-out rows
    row_mask = torch.arange(50) >= 25
    for unannotated_is_negative in (False, True):
        assert_ap_matches(scores, targets, row_mask, unannotated_is_negative)
        ap, num_positives = _triton.multilabel_ap_triton(scores, targets, row_mask, unannotated_is_negative)
        assert ap[0] == 0 and ap[1] == 0 and ap[3] == 0 and num_positives[3] == 0
        assert ap[2] == 1
    nothing_kept = torch.zeros(50, dtype=torch.bool)
    ap, num_positives = _triton.multilabel_ap_triton(scores, targets, nothing_kept, False)
    assert not ap.any() and not num_positives.any()


def test_ap_small_blocks_cross_every_boundary(monkeypatch):
    monkeypatch.setattr(_triton, "_AP_BLOCK_POSITIVES", 4)
    monkeypatch.setattr(_triton, "_AP_BLOCK_ROWS", 16)
    for seed, tied in ((0, False), (1, True)):
        scores, targets, row_mask = make_inputs(53, 7, torch.float32, seed, tied=tied)
        for mask in (None, row_mask):
            assert_ap_matches(scores, targets, mask, unannotated_is_negative=False)
            assert_ap_matches(scores, targets, mask, unannotated_is_negative=True)


@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (0, 0)])
def test_ap_empty(shape):
    scores, targets = torch.randn(shape), torch.ones(shape, dtype=torch.int8)
    ap, num_positives = _triton.multilabel_ap_triton(scores, targets, None, False)
    assert ap.shape == (shape[1],) and ap.dtype == torch.float64 and not ap.any()
    assert num_positives.shape == (shape[1],) and num_positives.dtype == torch.int64 and not num_positives.any()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_matches_reference(dtype, shape):
    L = shape[1]
    for seed in range(2):
        scores, targets, _ = make_inputs(*shape, dtype, seed)
        for k in sorted({1, 3, L, L + 4}):
            assert_topk_matches(scores, targets, k)


@pytest.mark.parametrize("seed", range(3))
def test_topk_with_many_ties(seed):
    scores, targets, _ = make_inputs(97, 23, torch.float32, seed, tied=True)
    targets[:5] = -1  # rows without a positive
    for k in (1, 5, 23, 30):
        assert_topk_matches(scores, targets, k)


def test_topk_small_chunks_cross_every_boundary(monkeypatch):
    monkeypatch.setattr(_triton, "_TOPK_MAX_CHUNK", 8)
    monkeypatch.setattr(_triton, "_TOPK_TILE_ELEMENTS", 32)
    for seed, tied in ((0, False), (1, True), (2, True)):
        scores, targets, _ = make_inputs(11, 37, torch.float16, seed, tied=tied)
        for k in (1, 9, 40):
            assert_topk_matches(scores, targets, k)


def test_topk_infinite_scores():
    scores = torch.tensor([[float("-inf"), 1.0, float("inf"), float("-inf")], [float("-inf")] * 4])
    targets = torch.tensor([[1, -1, 0, 1], [0, 1, 0, 1]], dtype=torch.int8)
    assert_topk_matches(scores, targets, 4)


@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (0, 0)])
def test_topk_empty(shape):
    scores, targets = torch.randn(shape), torch.ones(shape, dtype=torch.int8)
    hits, row_positives = _triton.multilabel_topk_hits_triton(scores, targets, 3)
    assert hits.shape == (shape[0], 3) and hits.dtype == torch.bool and not hits.any()
    assert row_positives.shape == (shape[0],) and row_positives.dtype == torch.int64 and not row_positives.any()


def test_invalid_inputs_raise_value_error():
    scores, targets, _ = make_inputs(4, 3, torch.float32, 0)
    with pytest.raises(ValueError, match="k must be >= 1"):
        _triton.multilabel_topk_hits_triton(scores, targets, 0)
    with pytest.raises(ValueError, match="targets must be int8"):
        _triton.multilabel_ap_triton(scores, targets.long(), None, False)
    with pytest.raises(ValueError, match="differs from scores shape"):
        _triton.multilabel_topk_hits_triton(scores, targets[:, :2], 1)
    with pytest.raises(ValueError, match="floating point"):
        _triton.multilabel_ap_triton(targets, targets, None, False)
    with pytest.raises(ValueError, match="row_mask must be bool"):
        _triton.multilabel_ap_triton(scores, targets, torch.ones(5, dtype=torch.bool), False)


def test_opcheck():
    scores, targets, row_mask = make_inputs(9, 5, torch.float32, 0)
    for args in ((scores, targets, None, False), (scores, targets, row_mask, True)):
        torch.library.opcheck(torch.ops.pyzsl.multilabel_ap_triton.default, args)
    torch.library.opcheck(torch.ops.pyzsl.multilabel_topk_hits_triton.default, (scores, targets, 3))
