"""The CUDA kernels of multilabel_ap / multilabel_topk_hits against the pure-PyTorch reference.

Needs a GPU and a build with the CUDA kernels (FORCE_CUDA=1 or TORCH_CUDA_ARCH_LIST at install time);
skipped otherwise.
"""
import pytest
import torch

import pyzsl._C  # noqa: F401  (registers torch.ops.pyzsl)
from pyzsl.metrics import _reference as ref


def _cuda_kernels_built():
    try:
        return "cuda=1" in torch.ops.pyzsl._build_info()
    except Exception:  # pragma: no cover - the op is missing only in a broken build
        return False


pytestmark = [
    pytest.mark.needs_cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not _cuda_kernels_built(),
        reason="needs a CUDA GPU and pyzsl built with its CUDA kernels (FORCE_CUDA=1 pip install -e .)",
    ),
]

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _inputs(N, L, dtype, *, ties, generator):
    if ties:  # few distinct values: many ties within a column and within a row
        scores = torch.randint(0, 5, (N, L), generator=generator).float() / 4
    else:
        scores = torch.randn(N, L, generator=generator)
    scores = scores.to(dtype)
    # {1, 0, -1}: positive, unannotated, negative
    targets = torch.randint(-1, 2, (N, L), generator=generator).to(torch.int8)
    return scores, targets


def _check_ap(scores, targets, row_mask, unannotated_is_negative):
    expected_ap, expected_pos = ref.multilabel_ap(scores, targets, row_mask, unannotated_is_negative)
    ap, pos = torch.ops.pyzsl.multilabel_ap(
        scores.cuda(), targets.cuda(), None if row_mask is None else row_mask.cuda(), unannotated_is_negative
    )
    assert ap.device.type == "cuda" and pos.device.type == "cuda"
    assert ap.dtype == torch.float64 and pos.dtype == torch.int64
    assert ap.shape == (scores.shape[1],) and pos.shape == (scores.shape[1],)
    torch.testing.assert_close(pos.cpu(), expected_pos, rtol=0, atol=0)
    torch.testing.assert_close(ap.cpu(), expected_ap, rtol=1e-12, atol=1e-12)


def _check_topk(scores, targets, k):
    expected_hits, expected_rows = ref.multilabel_topk_hits(scores, targets, k)
    hits, rows = torch.ops.pyzsl.multilabel_topk_hits(scores.cuda(), targets.cuda(), k)
    assert hits.device.type == "cuda" and rows.device.type == "cuda"
    assert hits.dtype == torch.bool and rows.dtype == torch.int64
    assert hits.shape == (scores.shape[0], k) and rows.shape == (scores.shape[0],)
    assert torch.equal(hits.cpu(), expected_hits)
    assert torch.equal(rows.cpu(), expected_rows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("unannotated_is_negative", [False, True])
def test_ap_random(dtype, ties, masked, unannotated_is_negative):
    g = torch.Generator().manual_seed(DTYPES.index(dtype) * 8 + ties * 4 + masked * 2 + unannotated_is_negative)
    for N, L in [(37, 11), (300, 5), (5000, 3), (129, 70)]:
        scores, targets = _inputs(N, L, dtype, ties=ties, generator=g)
        row_mask = torch.rand(N, generator=g) > 0.3 if masked else None
        _check_ap(scores, targets, row_mask, unannotated_is_negative)


def test_ap_many_positives_spans_chunks_and_tiles():
    # More positives than one block's threads (256) and more rows than one shared-memory tile (2048).
    g = torch.Generator().manual_seed(1)
    N, L = 6000, 2
    scores = (torch.randint(0, 50, (N, L), generator=g).float() / 7).to(torch.float32)
    targets = (torch.rand(N, L, generator=g) < 0.6).to(torch.int8)
    targets[torch.rand(N, L, generator=g) < 0.1] = -1
    row_mask = torch.rand(N, generator=g) > 0.1
    for mask in (None, row_mask):
        for une in (False, True):
            _check_ap(scores, targets, mask, une)


def test_ap_many_labels():
    g = torch.Generator().manual_seed(2)
    scores, targets = _inputs(64, 1500, torch.float32, ties=True, generator=g)
    _check_ap(scores, targets, None, False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ap_edge_shapes(dtype):
    g = torch.Generator().manual_seed(3)
    for N, L in [(1, 1), (1, 9), (9, 1), (0, 4), (4, 0), (0, 0)]:
        scores, targets = _inputs(N, L, dtype, ties=True, generator=g)
        for une in (False, True):
            _check_ap(scores, targets, None, une)
            _check_ap(scores, targets, torch.rand(N, generator=g) > 0.5, une)


def test_ap_no_positives_and_all_rows_masked():
    scores = torch.randn(6, 3)
    targets = torch.tensor([[0, -1, 1]] * 6, dtype=torch.int8)
    _check_ap(scores, targets, None, False)  # labels 0 and 1 have no positive: AP 0
    _check_ap(scores, targets, torch.zeros(6, dtype=torch.bool), True)  # nothing kept
    _check_ap(scores, torch.zeros(6, 3, dtype=torch.int8), None, True)  # no positive anywhere


def test_ap_all_tied():
    scores = torch.full((40, 4), 0.5)
    g = torch.Generator().manual_seed(4)
    targets = torch.randint(-1, 2, (40, 4), generator=g).to(torch.int8)
    for une in (False, True):
        _check_ap(scores, targets, None, une)


def test_ap_non_contiguous_inputs():
    g = torch.Generator().manual_seed(5)
    scores, targets = _inputs(50, 30, torch.float32, ties=True, generator=g)
    _check_ap(scores.t().contiguous().t(), targets[:, ::1].t().contiguous().t(), None, False)
    _check_ap(scores[:, ::2], targets[:, ::2], None, True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
def test_topk_random(dtype, ties):
    g = torch.Generator().manual_seed(100 + DTYPES.index(dtype) * 2 + ties)
    for N, L in [(37, 11), (300, 100), (17, 1000)]:
        scores, targets = _inputs(N, L, dtype, ties=ties, generator=g)
        for k in (1, 3, 10, 64, L, L + 5):
            _check_topk(scores, targets, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_edge_shapes(dtype):
    g = torch.Generator().manual_seed(6)
    for N, L in [(1, 1), (1, 9), (9, 1), (0, 4), (4, 0), (0, 0), (33, 2)]:
        scores, targets = _inputs(N, L, dtype, ties=True, generator=g)
        for k in (1, 2, 5, 40):
            _check_topk(scores, targets, k)


def test_topk_infinite_scores_and_all_tied():
    scores = torch.tensor([[float("-inf"), 0.0, float("inf"), float("-inf")], [1.0, 1.0, 1.0, 1.0]])
    targets = torch.tensor([[1, 0, 1, -1], [0, 1, 0, 1]], dtype=torch.int8)
    for k in (1, 2, 4, 6):
        _check_topk(scores, targets, k)


def test_topk_rejects_bad_k():
    scores = torch.randn(3, 4, device="cuda")
    targets = torch.zeros(3, 4, dtype=torch.int8, device="cuda")
    with pytest.raises(ValueError):
        torch.ops.pyzsl.multilabel_topk_hits(scores, targets, 0)


def test_shape_and_device_checks():
    scores = torch.randn(3, 4, device="cuda")
    with pytest.raises(ValueError):
        torch.ops.pyzsl.multilabel_ap(scores, torch.zeros(3, 5, dtype=torch.int8, device="cuda"), None, False)
    with pytest.raises(ValueError):
        torch.ops.pyzsl.multilabel_ap(scores, torch.zeros(3, 4, dtype=torch.int64, device="cuda"), None, False)
    with pytest.raises(ValueError):
        torch.ops.pyzsl.multilabel_ap(
            scores, torch.zeros(3, 4, dtype=torch.int8, device="cuda"), torch.ones(2, dtype=torch.bool, device="cuda"), False
        )


def test_non_default_stream():
    g = torch.Generator().manual_seed(7)
    scores, targets = _inputs(200, 20, torch.float32, ties=True, generator=g)
    expected_ap, _ = ref.multilabel_ap(scores, targets, None, False)
    expected_hits, _ = ref.multilabel_topk_hits(scores, targets, 5)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        s, t = scores.cuda(non_blocking=True), targets.cuda(non_blocking=True)
        ap, _ = torch.ops.pyzsl.multilabel_ap(s, t, None, False)
        hits, _ = torch.ops.pyzsl.multilabel_topk_hits(s, t, 5)
    stream.synchronize()
    torch.testing.assert_close(ap.cpu(), expected_ap, rtol=1e-12, atol=1e-12)
    assert torch.equal(hits.cpu(), expected_hits)
