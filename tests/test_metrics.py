"""The functional evaluation API (pyzsl.metrics.functional) against independent oracles.

Oracles: ``sklearn.metrics.average_precision_score`` applied per label following GUIDE §4 (which rows and which
entries each protocol keeps), a loop-based Python top-K written from the formula, a per-class loop and
``sklearn.metrics.balanced_accuracy_score`` for the single-label accuracies. The C++ backend is also checked
against the pure-PyTorch reference on awkward shapes, every score dtype, non-contiguous inputs, and by Hypothesis.
"""
import math
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, balanced_accuracy_score

from pyzsl._backend import available_backends
from pyzsl.metrics import (empty_cache, gzsl_accuracy, multilabel_average_precision, multilabel_evaluation,
                           multilabel_topk, zsl_accuracy)
from pyzsl.metrics import _reference

from _inputs import make_inputs

BACKENDS = ["reference", "cpp"]
PROTOCOL_NAMES = ["lesa", "sdl", "biam"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DROPS_IMAGES_WITHOUT_POSITIVE = {"lesa": False, "sdl": True, "biam": True}

needs_cpp = pytest.mark.skipif("cpp" not in available_backends("cpu"), reason="the C++ extension is not built")
needs_triton = pytest.mark.skipif("triton" not in available_backends("cpu"),
                                  reason="triton is not installed or TRITON_INTERPRET is not 1")


# ----------------------------------------------------------------------------------------------------------- inputs


def add_awkward_columns_and_rows(targets):
    """Makes label 0 all-negative, label 1 all-unannotated, row 0 all-negative and row 1 positive-free (0s and -1s)."""
    targets = targets.clone()
    N, L = targets.shape
    if L >= 3:
        targets[:, 0] = -1
        targets[:, 1] = 0
    if N >= 3:
        targets[0] = -1
        targets[1] = torch.where(torch.arange(L) % 2 == 0, 0, -1).to(torch.int8)
    return targets


# ---------------------------------------------------------------------------------------------------------- oracles

def sklearn_ap(scores, targets, protocol):
    """Per-label AP from sklearn, rows and entries chosen as GUIDE §4 says; NaN marks a label left out (biam)."""
    s = scores.double().numpy()
    t = targets.numpy()
    if DROPS_IMAGES_WITHOUT_POSITIVE[protocol]:
        keep = (t == 1).any(axis=1)
        s, t = s[keep], t[keep]
    L = s.shape[1]
    ap = np.zeros(L)
    for j in range(L):
        entries = np.ones(len(t), dtype=bool) if protocol == "sdl" else t[:, j] != 0
        y_true = t[entries, j] == 1
        if not y_true.any():
            ap[j] = np.nan if protocol == "biam" else 0.0
        else:
            ap[j] = average_precision_score(y_true, s[entries, j])
    return ap


def oracle_mean(ap, protocol):
    if protocol == "biam":
        kept = ap[~np.isnan(ap)]
        return float(kept.mean()) if kept.size else math.nan
    return float(ap.mean()) if ap.size else math.nan


def loop_topk(scores, targets, k, protocol):
    """P, R, F1 from the formula, with Python loops: the K best labels per image, ties to the lower label index."""
    s = scores.double().tolist()
    t = targets.tolist()
    L = scores.shape[1]
    rows = [i for i in range(len(t)) if not DROPS_IMAGES_WITHOUT_POSITIVE[protocol] or 1 in t[i]]
    tp = positives = 0
    for i in rows:
        best = sorted(range(L), key=lambda j: (-s[i][j], j))[:k]
        tp += sum(1 for j in best if t[i][j] == 1)
        positives += sum(1 for v in t[i] if v == 1)
    precision = tp / (len(rows) * k) if rows else math.nan
    recall = tp / positives if positives else math.nan
    if math.isnan(precision) or math.isnan(recall):
        f1 = math.nan
    else:
        f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return precision, recall, f1


def assert_float(actual, expected, atol):
    actual = float(actual)
    if math.isnan(expected):
        assert math.isnan(actual), f"expected NaN, got {actual}"
    else:
        assert actual == pytest.approx(expected, abs=atol, rel=0), (actual, expected)


def assert_vector(actual, expected, atol):
    assert actual.dtype == torch.float64 and actual.shape == (len(expected),)
    np.testing.assert_allclose(actual.numpy(), expected, atol=atol, rtol=0, equal_nan=True)


# ----------------------------------------------------------------------------------- mAP against sklearn per label

def test_ap_hand_computed_example():
    # Label 0: scores .9 .8 .7 .6 .95 with targets + 0 - + -; label 1 has no positive; label 2 (constant scores) has
    # its positives in rows 1 and 2; row 4 has no positive at all.
    scores = torch.tensor([[0.9, 0.5, 0.5], [0.8, 0.5, 0.5], [0.7, 0.5, 0.5], [0.6, 0.5, 0.5], [0.95, 0.5, 0.5]],
                          dtype=torch.float64)
    targets = torch.tensor([[1, -1, -1], [0, -1, 1], [-1, 0, 1], [1, -1, -1], [-1, -1, -1]], dtype=torch.int8)
    for backend in available_backends("cpu"):
        # lesa: 0 ignored, row 4 kept: label 0 ranks .95- .9+ .7- .6+ -> (1/2 + 2/4) / 2; label 2: 2 of 5 tied
        ap = multilabel_average_precision(scores, targets, average="none", protocol="lesa", backend=backend)
        assert ap.tolist() == pytest.approx([0.5, 0.0, 0.4], abs=1e-15)
        assert float(multilabel_average_precision(scores, targets, protocol="lesa", backend=backend)) == \
            pytest.approx(0.3, abs=1e-15)
        # sdl: row 4 removed, 0 is negative: .9+ .8- .7- .6+ -> (1 + 2/4) / 2; label 1 has AP 0 and counts
        ap = multilabel_average_precision(scores, targets, average="none", protocol="sdl", backend=backend)
        assert ap.tolist() == pytest.approx([0.75, 0.0, 0.5], abs=1e-15)
        assert float(multilabel_average_precision(scores, targets, protocol="sdl", backend=backend)) == \
            pytest.approx(1.25 / 3, abs=1e-15)
        # biam: row 4 removed, 0 ignored: .9+ .7- .6+ -> (1 + 2/3) / 2; label 1 is NaN and left out of the mean
        ap = multilabel_average_precision(scores, targets, average="none", protocol="biam", backend=backend)
        assert ap[0] == pytest.approx(5 / 6, abs=1e-15) and math.isnan(ap[1]) and ap[2] == 0.5
        assert float(multilabel_average_precision(scores, targets, protocol="biam", backend=backend)) == \
            pytest.approx((5 / 6 + 0.5) / 2, abs=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("protocol", PROTOCOL_NAMES)
@pytest.mark.parametrize("seed", range(3))
def test_ap_matches_sklearn_with_ties_and_unannotated(seed, protocol, backend):
    scores, targets = make_inputs(80, 11, seed=seed, tied=True)
    targets = add_awkward_columns_and_rows(targets)
    expected = sklearn_ap(scores, targets, protocol)
    ap = multilabel_average_precision(scores, targets, average="none", protocol=protocol, backend=backend)
    assert_vector(ap, expected, atol=1e-6)
    mean = multilabel_average_precision(scores, targets, protocol=protocol, backend=backend)
    assert mean.dtype == torch.float64 and mean.dim() == 0
    assert_float(mean, oracle_mean(expected, protocol), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("protocol", PROTOCOL_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ap_matches_sklearn_every_dtype(dtype, protocol, backend):
    scores, targets = make_inputs(60, 7, seed=11, dtype=dtype, tied=False)
    scores[::3] = scores[1::3][: scores[::3].shape[0]]  # some ties in float scores too
    expected = sklearn_ap(scores, targets, protocol)
    ap = multilabel_average_precision(scores, targets, average="none", protocol=protocol, backend=backend)
    assert_vector(ap, expected, atol=1e-6)


def test_protocols_really_differ():
    """Guards the oracles: on data with 0s and positive-free images, the three protocols give three answers."""
    scores, targets = make_inputs(80, 11, seed=0)
    targets = add_awkward_columns_and_rows(targets)
    means = {p: float(multilabel_average_precision(scores, targets, protocol=p, backend="reference"))
             for p in PROTOCOL_NAMES}
    assert len({round(v, 12) for v in means.values()}) == 3, means


@needs_triton
@pytest.mark.parametrize("protocol", PROTOCOL_NAMES)
def test_ap_triton_matches_sklearn(protocol):
    scores, targets = make_inputs(23, 5, seed=3, dtype=torch.float32)
    targets = add_awkward_columns_and_rows(targets)
    ap = multilabel_average_precision(scores, targets, average="none", protocol=protocol, backend="triton")
    assert_vector(ap, sklearn_ap(scores, targets, protocol), atol=1e-6)


# ------------------------------------------------------------------------------------ top-K against a Python loop

def test_topk_hand_computed_example():
    scores = torch.tensor([[0.1, 0.9, 0.9, 0.2], [0.5, 0.5, 0.5, 0.5], [0.3, 0.2, 0.1, 0.0]])
    targets = torch.tensor([[1, -1, 1, 0], [-1, 1, 0, 1], [-1, 0, -1, -1]], dtype=torch.int8)
    for backend in available_backends("cpu"):
        # k=2: row 0 takes labels 1, 2 (tie to the lower index): 1 hit; row 1 takes 0, 1: 1 hit; row 2: 0 hits.
        lesa = multilabel_topk(scores, targets, 2, protocol="lesa", backend=backend)
        assert float(lesa.precision) == pytest.approx(2 / 6) and float(lesa.recall) == pytest.approx(2 / 4)
        assert float(lesa.f1) == pytest.approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5))
        sdl = multilabel_topk(scores, targets, 2, protocol="sdl", backend=backend)  # row 2 removed
        assert float(sdl.precision) == pytest.approx(2 / 4) and float(sdl.recall) == pytest.approx(2 / 4)
        # k beyond L: an image contributes its L labels but precision still divides by N*k
        wide = multilabel_topk(scores, targets, 6, protocol="biam", backend=backend)
        assert float(wide.precision) == pytest.approx(4 / 12) and float(wide.recall) == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("protocol", PROTOCOL_NAMES)
@pytest.mark.parametrize("tied", [True, False])
def test_topk_matches_loop(tied, protocol, backend):
    for seed, (N, L) in enumerate([(50, 9), (13, 4), (31, 40)]):
        scores, targets = make_inputs(N, L, seed=seed, tied=tied)
        targets = add_awkward_columns_and_rows(targets)
        for k in sorted({1, 3, 5, L, L + 3}):
            result = multilabel_topk(scores, targets, k, protocol=protocol, backend=backend)
            for actual, expected in zip(result, loop_topk(scores, targets, k, protocol)):
                assert actual.dtype == torch.float64 and actual.dim() == 0
                assert_float(actual, expected, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_degenerate_denominators(backend):
    scores = torch.randn(4, 3)
    no_positive = torch.full((4, 3), -1, dtype=torch.int8)
    # lesa keeps the images: P = 0, R has no positive to recall (NaN), F1 NaN
    p, r, f1 = multilabel_topk(scores, no_positive, 2, protocol="lesa", backend=backend)
    assert float(p) == 0 and math.isnan(r) and math.isnan(f1)
    # sdl/biam remove every image: nothing to measure
    for protocol in ("sdl", "biam"):
        assert all(math.isnan(v) for v in multilabel_topk(scores, no_positive, 2, protocol=protocol, backend=backend))
    # positives never ranked: P = R = 0 gives F1 = 0
    targets = torch.tensor([[1, -1, -1]] * 4, dtype=torch.int8)
    scores = torch.tensor([[0.0, 1.0, 2.0]] * 4)
    assert tuple(map(float, multilabel_topk(scores, targets, 1, backend=backend))) == (0.0, 0.0, 0.0)


@needs_triton
@pytest.mark.parametrize("protocol", PROTOCOL_NAMES)
def test_topk_triton_matches_loop(protocol):
    scores, targets = make_inputs(17, 6, seed=5, dtype=torch.float32)
    targets = add_awkward_columns_and_rows(targets)
    for k in (1, 3, 8):
        result = multilabel_topk(scores, targets, k, protocol=protocol, backend="triton")
        for actual, expected in zip(result, loop_topk(scores, targets, k, protocol)):
            assert_float(actual, expected, atol=1e-12)


# ------------------------------------------------------------------------------- C++ against the PyTorch reference

def assert_ops_agree(scores, targets, *, ks=(1, 3), masks=True):
    """torch.ops.pyzsl vs _reference: AP to 1e-12 and positive counts exactly, top-K hits exactly."""
    N = scores.shape[0]
    g = torch.Generator().manual_seed(N)
    row_masks = [None, torch.rand(N, generator=g) > 0.4] if masks else [None]
    for row_mask in row_masks:
        for unannotated_is_negative in (False, True):
            ap, num_positives = torch.ops.pyzsl.multilabel_ap(scores, targets, row_mask, unannotated_is_negative)
            ref_ap, ref_positives = _reference.multilabel_ap(scores, targets, row_mask, unannotated_is_negative)
            assert ap.dtype == torch.float64 and num_positives.dtype == torch.int64
            assert ap.shape == ref_ap.shape == (scores.shape[1],)
            torch.testing.assert_close(ap, ref_ap, atol=1e-12, rtol=0)
            assert torch.equal(num_positives, ref_positives)
    for k in ks:
        hits, row_positives = torch.ops.pyzsl.multilabel_topk_hits(scores, targets, k)
        ref_hits, ref_row_positives = _reference.multilabel_topk_hits(scores, targets, k)
        assert hits.dtype == torch.bool and hits.shape == (N, k)
        assert torch.equal(hits, ref_hits)
        assert torch.equal(row_positives, ref_row_positives)


SHAPES = [(1, 1), (1, 9), (9, 1), (37, 13), (101, 7), (2, 130), (120, 129), (2000, 3)]  # 129, 130: past a 128 block


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tied", [True, False])
def test_cpp_ops_match_reference(tied, dtype):
    for seed in range(2):
        for N, L in SHAPES:
            scores, targets = make_inputs(N, L, seed=seed, dtype=dtype, tied=tied)
            assert_ops_agree(scores, targets, ks=sorted({1, 3, 5, L, L + 2}))


@needs_cpp
def test_cpp_ops_dense_and_sparse_positives():
    for seed, p_positive in enumerate((0.001, 0.02, 0.9, 1.0)):
        scores, targets = make_inputs(700, 70, seed=seed, dtype=torch.float32, tied=seed % 2 == 0,
                                      p_positive=p_positive, p_unannotated=(1 - p_positive) / 2)
        assert_ops_agree(scores, targets, ks=(1, 10, 70))


@needs_cpp
@pytest.mark.parametrize("levels", [1, 3, 1000])
@pytest.mark.parametrize("labels", [1006, 2049])
def test_cpp_topk_with_many_chunks_and_ties(levels, labels):
    # The CPU top-K compares whole 32-score chunks with the k-th best so far: rows of 31 or 64 chunks plus a tail,
    # ties at the k-th best (levels = 1: all equal), k up to a whole chunk; k <= 16 keeps the k best in one AVX-512
    # register and first bounds the k-th best by the 16 lane maxima (ties at that bound must still be offered).
    for seed in range(3):
        scores, targets = make_inputs(40, labels, seed=seed, dtype=torch.float32, levels=levels)
        assert_ops_agree(scores, targets, ks=(1, 5, 15, 16, 17, 30, 31, 32), masks=False)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_ap_with_lopsided_bins(dtype):
    # The CPU AP sorts each label's positives by bin (about two per bin) and then within bins: an outlier positive
    # crowds the others into the lowest bins (a sort of more than 16, and insertion sorts of 2 to 16), ties and a
    # one-value label fill single bins, and distinct untied scores keep the usual spread.
    g = torch.Generator().manual_seed(11)
    N = 3000
    scores = torch.randn(N, 6, generator=g, dtype=torch.float64)
    targets = torch.where(torch.rand(N, 6, generator=g) < 0.3, 1, -1).to(torch.int8)
    scores[0, :3], targets[0, :3] = 1e6, 1                      # an outlier positive in labels 0-2
    scores[:, 1] = torch.round(scores[:, 1] * 2)                 # and ties in label 1
    scores[:, 2] = torch.round(scores[:, 2] * 40) / 40           # many small tie groups in label 2
    scores[1:, 3] = 0.5                                          # label 3: one value besides row 0
    scores[:, 4] = torch.round(scores[:, 4] * 8)                 # about 50 values: full bins
    assert_ops_agree(scores.to(dtype), targets, ks=(1,), masks=True)


@needs_cpp
def test_cpp_ap_on_every_count_loop():
    # The AVX-512 count picks its loop by the label's number of bins, G = 2P: the flags of the bins holding a
    # positive in 2, 4, 8 or 16 registers (up to 1,024, 2,048, 4,096 and 8,192 bins), else marked in the per-bin
    # counts. Labels on both sides of each bound, with ties within and across positives and negatives (a third of the
    # scores on a coarse grid) and unannotated entries, against the reference.
    g = torch.Generator().manual_seed(5)
    counts = [1, 2, 511, 512, 513, 1024, 1025, 2048, 2049, 4096, 4097, 5000]
    N, L = 9000, len(counts)
    scores = torch.rand(N, L, generator=g)
    targets = torch.where(torch.rand(N, L, generator=g) < 0.3, 0, -1).to(torch.int8)
    for j, P in enumerate(counts):
        rows = torch.randperm(N, generator=g)[:P]
        targets[rows, j] = 1
        scores[rows, j] += 0.3  # positives score higher on average, as a model's do
    coarse = torch.rand(N, L, generator=g) < 1 / 3
    scores = torch.where(coarse, torch.round(scores * 200) / 200, scores)
    assert scores.dtype == torch.float32 and ((targets == 1).sum(0) == torch.tensor(counts)).all()
    assert_ops_agree(scores, targets, ks=(3,))


@needs_cpp
def test_cpp_ap_counts_past_16_bits():
    # The AVX-512 count of a table of up to 8,192 bins counts a tile's column in 16-bit counters and adds them into
    # 32-bit ones after it: 70,000 rows (three tiles) put more than 65,535 negatives into one bin without a positive
    # (label 0) and into one bucket placed among tied positives (label 1).
    N = 70_000
    scores = torch.full((N, 2), 0.5, dtype=torch.float32)
    targets = torch.full((N, 2), -1, dtype=torch.int8)
    targets[:4, :] = 1
    scores[:4, 0] = torch.tensor([0.1, 0.2, 0.9, 1.0])  # 0.5 falls in a bin between positives
    scores[:4, 1] = torch.tensor([0.1, 0.5, 0.5, 1.0])  # 0.5 ties two positives: every negative is placed
    for row_mask in (None, torch.arange(N) % 3 != 1):
        ap, _ = torch.ops.pyzsl.multilabel_ap(scores, targets, row_mask, False)
        ref_ap, _ = _reference.multilabel_ap(scores, targets, row_mask, False)
        torch.testing.assert_close(ap, ref_ap, rtol=0, atol=1e-12)


@needs_cpp
def test_cpp_ap_reuses_its_tile_buffers_across_shapes_and_dtypes():
    # The CPU AP kernel keeps its tile buffers between calls and lends the smallest one that fits: a buffer that held a
    # larger or another dtype's tile, or the other tile copy's layout (dense transpose, sparse scatter), must not leak
    # into a later result, nor must a fresh buffer after empty_cache().
    cases = [(3000, 300, torch.float32, 0.1), (500, 40, torch.float64, 0.1), (2000, 90, torch.float32, 0.9),
             (4000, 320, torch.float32, 0.1), (700, 33, torch.float64, 0.9)]
    for i, (N, L, dtype, p_unannotated) in enumerate(cases * 2):
        if i == len(cases):
            empty_cache()
        scores, targets = make_inputs(N, L, seed=i, dtype=dtype, tied=i % 2 == 0, p_unannotated=p_unannotated)
        ap, _ = torch.ops.pyzsl.multilabel_ap(scores, targets, None, False)
        ref_ap, _ = _reference.multilabel_ap(scores, targets, None, False)
        torch.testing.assert_close(ap, ref_ap, rtol=0, atol=1e-12)


@needs_cpp
def test_empty_cache_frees_the_kept_tile_buffers():
    # 6,000 x 640 dense: the threads' tiles hold 640 labels x ~6,000 rows of float32 (14.6 MiB) between them.
    scores, targets = make_inputs(6000, 640, seed=3, dtype=torch.float32, tied=False, p_unannotated=0.0)
    torch.ops.pyzsl.multilabel_ap(scores, targets, None, False)
    assert empty_cache() >= 640 * 6000 * 4
    assert empty_cache() == 0  # nothing kept


@needs_cpp
@pytest.mark.parametrize("shape", [(32768 * 2 + 3, 5), (300, 40000)])
def test_cpp_ops_span_several_row_tiles(shape):
    # The CPU AP kernel reads rows in tiles of 256 to 32,768 rows (fewer when a thread owns many labels): cross them.
    N, L = shape
    scores, targets = make_inputs(N, L, seed=1, dtype=torch.float32, tied=True)
    assert_ops_agree(scores, targets, ks=(3,))


@needs_cpp
@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0)])
def test_cpp_ops_empty(shape):
    scores, targets = torch.randn(shape), torch.ones(shape, dtype=torch.int8)
    assert_ops_agree(scores, targets, ks=(1, 4))
    ap, num_positives = torch.ops.pyzsl.multilabel_ap(scores, targets, None, False)
    assert ap.shape == num_positives.shape == (shape[1],) and not ap.any() and not num_positives.any()


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_ops_special_targets_and_constant_scores(dtype):
    scores, targets = make_inputs(64, 12, seed=7, dtype=dtype)
    targets = add_awkward_columns_and_rows(targets)
    targets[:, 2] = 1  # every image positive
    assert_ops_agree(scores, targets, ks=(1, 3, 12, 20))
    constant = torch.full((64, 12), 0.25, dtype=dtype)  # ties everywhere
    assert_ops_agree(constant, targets, ks=(1, 3, 12, 20))
    assert_ops_agree(scores, torch.full_like(targets, -1), ks=(2,))  # nothing positive anywhere
    assert_ops_agree(scores, torch.zeros_like(targets), ks=(2,))  # nothing annotated
    signed_zeros = torch.tensor([0.0, -0.0], dtype=dtype).repeat(64 * 6).view(64, 12)  # -0.0 ties with 0.0
    assert_ops_agree(signed_zeros, targets, ks=(1, 5))
    # A constant column ranks its positives exactly as its negatives: AP = P / annotated.
    ap, _ = torch.ops.pyzsl.multilabel_ap(constant, targets, None, False)
    annotated = (targets != 0).sum(0).clamp(min=1).double()
    expected = torch.where((targets == 1).any(0), (targets == 1).sum(0) / annotated, 0.0)
    torch.testing.assert_close(ap, expected, atol=1e-12, rtol=0)


@needs_cpp
def test_cpp_ops_all_rows_masked_out():
    scores, targets = make_inputs(30, 6, seed=8)
    ap, num_positives = torch.ops.pyzsl.multilabel_ap(scores, targets, torch.zeros(30, dtype=torch.bool), False)
    assert not ap.any() and not num_positives.any()


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpp_ops_non_contiguous_inputs(dtype):
    scores, targets = make_inputs(29, 41, seed=9, dtype=dtype, tied=True)
    transposed_scores = scores.T.contiguous().T  # same values, column-major storage
    transposed_targets = targets.T.contiguous().T
    assert not transposed_scores.is_contiguous() and not transposed_targets.is_contiguous()
    assert_ops_agree(transposed_scores, transposed_targets, ks=(1, 4, 41))
    for k in (1, 4):
        assert torch.equal(torch.ops.pyzsl.multilabel_topk_hits(transposed_scores, transposed_targets, k)[0],
                           torch.ops.pyzsl.multilabel_topk_hits(scores, targets, k)[0])
    assert torch.equal(torch.ops.pyzsl.multilabel_ap(transposed_scores, transposed_targets, None, False)[0],
                       torch.ops.pyzsl.multilabel_ap(scores, targets, None, False)[0])
    assert_ops_agree(scores[::2, 1::3], targets[::2, 1::3], ks=(2, 20))  # strided slices
    wide_scores, wide_targets = make_inputs(5, 29, seed=10, dtype=dtype)
    assert_ops_agree(wide_scores.T, wide_targets.T, ks=(1, 5))  # a transposed view, [29, 5]
    row_mask = (torch.arange(58) % 3 > 0)[::2]  # a non-contiguous row mask
    assert not row_mask.is_contiguous()
    ap, _ = torch.ops.pyzsl.multilabel_ap(transposed_scores, transposed_targets, row_mask, True)
    torch.testing.assert_close(ap, _reference.multilabel_ap(scores, targets, row_mask.contiguous(), True)[0],
                               atol=1e-12, rtol=0)


@needs_cpp
def test_cpp_ops_huge_finite_scores_in_subprocess():
    """Finite scores whose differences overflow (|s| near the dtype's max): exact AP, no crash.

    Runs in a subprocess because a failure here has been a segmentation fault of the C++ AP kernel (its bin index
    became (inf * 0) = NaN when the positives' range or a score's distance to it overflowed).
    """
    code = textwrap.dedent("""
        import torch
        import pyzsl.metrics
        from pyzsl.metrics import _reference
        cases = []
        for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.float16):
            big = torch.finfo(dtype).max
            for column, target in (([-big, big, 0.0, big], [1, -1, -1, 1]),   # positives span more than max
                                   ([-big, big, 0.0, -big], [1, -1, -1, 1]),  # equal positives, far negative
                                   ([big, -big, 1.0, 2.0], [1, -1, 1, 0])):
                scores = torch.tensor(column, dtype=dtype)[:, None].repeat(1, 3)
                targets = torch.tensor(target, dtype=torch.int8)[:, None].repeat(1, 3)
                for flag in (False, True):
                    ap, num_positives = torch.ops.pyzsl.multilabel_ap(scores, targets, None, flag)
                    ref_ap, ref_positives = _reference.multilabel_ap(scores, targets, None, flag)
                    assert torch.equal(num_positives, ref_positives), (dtype, column)
                    torch.testing.assert_close(ap, ref_ap, atol=1e-12, rtol=0, msg=f"{dtype} {column} {flag}")
                hits = torch.ops.pyzsl.multilabel_topk_hits(scores.T.contiguous(), targets.T.contiguous(), 2)[0]
                assert torch.equal(hits, _reference.multilabel_topk_hits(scores.T, targets.T, 2)[0])
        print("ok")
    """)
    run_isolated(code)


@needs_cpp
def test_cpp_ops_infinite_scores_in_subprocess():
    """The public API rejects NaN/inf, but torch.ops.pyzsl.* can be called directly: ±inf must not crash the op.

    In a subprocess for the same reason as above: a score of +inf ran the bin scan past its +inf sentinels.
    """
    code = textwrap.dedent("""
        import torch
        import pyzsl.metrics
        from pyzsl.metrics import _reference
        inf = float("inf")
        for column, target in (([1.0, 1.0, 1.0, 1.0, inf], [1, 1, 1, 1, -1]),  # +inf negative above 4 tied positives
                               ([inf, inf, inf, 1.0, -inf, inf], [1, 1, 1, -1, 1, -1]),  # infinite positives
                               ([-inf, 1.0, 2.0, 3.0, inf], [1, -1, 1, 1, 0])):
            for dtype in (torch.float32, torch.float64):
                scores = torch.tensor(column, dtype=dtype)[:, None].repeat(1, 2)
                targets = torch.tensor(target, dtype=torch.int8)[:, None].repeat(1, 2)
                for flag in (False, True):
                    ap, num_positives = torch.ops.pyzsl.multilabel_ap(scores, targets, None, flag)
                    ref_ap, ref_positives = _reference.multilabel_ap(scores, targets, None, flag)
                    assert torch.equal(num_positives, ref_positives), column
                    torch.testing.assert_close(ap, ref_ap, atol=1e-12, rtol=0, msg=f"{dtype} {column} {flag}")
                rows = (scores.T.contiguous(), targets.T.contiguous())
                for k in (1, 3, 7):
                    assert torch.equal(torch.ops.pyzsl.multilabel_topk_hits(*rows, k)[0],
                                       _reference.multilabel_topk_hits(*rows, k)[0])
        print("ok")
    """)
    run_isolated(code)


@needs_cpp
def test_cpp_ap_portable_path_in_subprocess():
    """PYZSL_NO_AVX512=1 makes the AP and top-K kernels take their portable loops; they must agree with the reference
    (and the row scan must still flag a non-finite score and a bad target, and give the AP's positives)."""
    code = textwrap.dedent("""
        import torch
        import pyzsl.metrics
        from pyzsl.metrics import _reference
        from _inputs import make_inputs
        for seed, (N, L, tied) in enumerate([(1, 1, True), (37, 13, True), (300, 70, False), (8192 + 5, 3, True),
                                              (50, 33, False), (20, 100, False)]):
            for dtype in (torch.float32, torch.float16, torch.float64):
                scores, targets = make_inputs(N, L, seed=seed, dtype=dtype, tied=tied)
                row_mask = torch.rand(N, generator=torch.Generator().manual_seed(seed)) > 0.3
                for mask in (None, row_mask):
                    for flag in (False, True):
                        ap, num_positives = torch.ops.pyzsl.multilabel_ap(scores, targets, mask, flag)
                        ref_ap, ref_positives = _reference.multilabel_ap(scores, targets, mask, flag)
                        assert torch.equal(num_positives, ref_positives), (seed, dtype)
                        torch.testing.assert_close(ap, ref_ap, atol=1e-12, rtol=0, msg=f"{seed} {dtype} {flag}")
                for k in (1, 3, 40):
                    hits, row_positives = torch.ops.pyzsl.multilabel_topk_hits(scores, targets, k)
                    ref_hits, ref_row_positives = _reference.multilabel_topk_hits(scores, targets, k)
                    assert torch.equal(hits, ref_hits) and torch.equal(row_positives, ref_row_positives), (seed, k)
                    scan = torch.ops.pyzsl.multilabel_row_scan(scores, targets, k)
                    assert torch.equal(scan[0], hits) and bool(scan[2]), (seed, k)
                    ap = torch.ops.pyzsl.multilabel_ap_given_positives(scores, targets, None, False, *scan[3:])
                    assert torch.equal(ap[0], torch.ops.pyzsl.multilabel_ap(scores, targets, None, False)[0])
                bad_scores, bad_targets = scores.clone(), targets.clone()
                bad_scores[-1, -1], bad_targets[0, -1] = float("inf"), 3
                assert not bool(torch.ops.pyzsl.multilabel_row_scan(bad_scores, targets, 2)[2])
                assert not bool(torch.ops.pyzsl.multilabel_row_scan(scores, bad_targets, 2)[2])
        print("ok")
    """)
    run_isolated(code, env={"PYZSL_NO_AVX512": "1"})


def run_isolated(code, env=None):
    """Runs ``code`` in a fresh interpreter from the repository root; it must print "ok" and exit cleanly."""
    tests = Path(__file__).resolve().parent
    python_path = os.pathsep.join(filter(None, [str(tests), os.environ.get("PYTHONPATH")]))
    environment = {**os.environ, "PYTHONPATH": python_path, **(env or {})}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tests.parent, env=environment)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (
        f"exit status {done.returncode} (-11 is a segmentation fault)\n{done.stdout}\n{done.stderr[-3000:]}")


@needs_cpp
@pytest.mark.parametrize("protocol", PROTOCOL_NAMES)
def test_cpp_api_matches_reference(protocol):
    for seed, (N, L) in enumerate([(1, 1), (1, 6), (37, 13), (101, 7), (0, 4), (4, 0), (90, 131)]):
        for dtype in DTYPES:
            scores, targets = make_inputs(N, L, seed=seed, dtype=dtype, tied=seed % 2 == 0)
            targets = add_awkward_columns_and_rows(targets)
            for average in ("none", "macro"):
                got = multilabel_average_precision(scores, targets, average=average, protocol=protocol, backend="cpp")
                want = multilabel_average_precision(scores, targets, average=average, protocol=protocol,
                                                    backend="reference")
                torch.testing.assert_close(got, want, atol=1e-12, rtol=0, equal_nan=True)
            for k in sorted({1, 3, L + 1}):
                got = multilabel_topk(scores, targets, k, protocol=protocol, backend="cpp")
                want = multilabel_topk(scores, targets, k, protocol=protocol, backend="reference")
                for a, b in zip(got, want):
                    torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    for shape in [(0, 4), (4, 0), (0, 0)]:
        scores, targets = torch.randn(shape), torch.ones(shape, dtype=torch.int8)
        for protocol in PROTOCOL_NAMES:
            ap = multilabel_average_precision(scores, targets, average="none", protocol=protocol, backend=backend)
            assert ap.shape == (shape[1],)
            mean = float(multilabel_average_precision(scores, targets, protocol=protocol, backend=backend))
            if shape[1] == 0 or protocol == "biam":  # no label, or no label with a positive: mean over nothing
                assert math.isnan(mean)
            else:  # lesa / sdl: every label lacks a positive and counts with AP 0
                assert mean == 0.0
            topk = multilabel_topk(scores, targets, 3, protocol=protocol, backend=backend)
            for actual, expected in zip(topk, loop_topk(scores, targets, 3, protocol)):
                assert_float(actual, expected, atol=0)
            # P is 0 only for lesa on [4, 0] (4 images kept, 3 misses each); everything else has nothing to measure
            assert math.isnan(topk.recall) and math.isnan(topk.f1)
            assert math.isnan(topk.precision) == (shape[0] == 0 or protocol != "lesa")


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_target_dtypes_are_equivalent(backend):
    scores, targets = make_inputs(40, 6, seed=12)
    expected = multilabel_evaluation(scores, targets, ks=(1, 3), backend=backend)
    for dtype in (torch.int16, torch.int32, torch.int64):
        assert multilabel_evaluation(scores, targets.to(dtype), ks=(1, 3), backend=backend) == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_that_require_grad_evaluate_quietly(backend):
    """Model outputs often still require grad; a metric must neither warn nor hand back a graph."""
    scores, targets = make_inputs(20, 5, seed=13, dtype=torch.float32, tied=False)
    scores.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ap = multilabel_average_precision(scores, targets, average="none", backend=backend)
        results = multilabel_evaluation(scores, targets, ks=(2,), backend=backend)
    assert not ap.requires_grad
    assert results["mAP"] == pytest.approx(float(ap.mean()), abs=1e-12)


# ------------------------------------------------------------------------------------------------------ Hypothesis

@st.composite
def multilabel_inputs(draw, max_n=12, max_l=9):
    N = draw(st.integers(0, max_n))
    L = draw(st.integers(0, max_l))
    dtype = draw(st.sampled_from(DTYPES))
    if draw(st.booleans()):
        values = st.integers(-3, 3).map(float)
    else:
        values = st.floats(-6e4, 6e4, allow_nan=False, allow_infinity=False, width=32)
    scores = torch.tensor(draw(st.lists(values, min_size=N * L, max_size=N * L)), dtype=torch.float64)
    targets = torch.tensor(draw(st.lists(st.sampled_from([-1, 0, 1]), min_size=N * L, max_size=N * L)),
                           dtype=torch.int8)
    return scores.view(N, L).to(dtype), targets.view(N, L)


FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@needs_cpp
@FUZZ
@given(inputs=multilabel_inputs(), data=st.data())
def test_fuzz_cpp_ops_against_reference(inputs, data):
    scores, targets = inputs
    N, L = scores.shape
    row_mask = data.draw(st.none() | st.lists(st.booleans(), min_size=N, max_size=N).map(
        lambda m: torch.tensor(m, dtype=torch.bool).view(N)))
    flag = data.draw(st.booleans())
    ap, num_positives = torch.ops.pyzsl.multilabel_ap(scores, targets, row_mask, flag)
    ref_ap, ref_positives = _reference.multilabel_ap(scores, targets, row_mask, flag)
    torch.testing.assert_close(ap, ref_ap, atol=1e-12, rtol=0)
    assert torch.equal(num_positives, ref_positives)
    k = data.draw(st.integers(1, L + 3))
    hits, row_positives = torch.ops.pyzsl.multilabel_topk_hits(scores, targets, k)
    ref_hits, ref_row_positives = _reference.multilabel_topk_hits(scores, targets, k)
    assert torch.equal(hits, ref_hits) and torch.equal(row_positives, ref_row_positives)


@needs_cpp
@FUZZ
@given(inputs=multilabel_inputs(), protocol=st.sampled_from(PROTOCOL_NAMES), ks=st.lists(st.integers(1, 12),
       max_size=3, unique=True))
def test_fuzz_cpp_api_against_reference(inputs, protocol, ks):
    scores, targets = inputs
    got = multilabel_evaluation(scores, targets, ks=ks, protocol=protocol, backend="cpp")
    want = multilabel_evaluation(scores, targets, ks=ks, protocol=protocol, backend="reference")
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12, nan_ok=True), key
    ap = multilabel_average_precision(scores, targets, average="none", protocol=protocol, backend="cpp")
    torch.testing.assert_close(ap, multilabel_average_precision(scores, targets, average="none", protocol=protocol,
                                                                backend="reference"),
                               atol=1e-12, rtol=0, equal_nan=True)


@FUZZ
@given(inputs=multilabel_inputs(max_n=8, max_l=6), protocol=st.sampled_from(PROTOCOL_NAMES), k=st.integers(1, 8))
def test_fuzz_reference_against_oracles(inputs, protocol, k):
    scores, targets = inputs
    ap = multilabel_average_precision(scores, targets, average="none", protocol=protocol, backend="reference")
    expected = sklearn_ap(scores, targets, protocol)
    np.testing.assert_allclose(ap.numpy(), expected, atol=1e-9, rtol=0, equal_nan=True)
    for actual, expected in zip(multilabel_topk(scores, targets, k, protocol=protocol, backend="reference"),
                                loop_topk(scores, targets, k, protocol)):
        assert_float(actual, expected, atol=1e-12)


# --------------------------------------------------------------------------------------------------------- opcheck

@needs_cpp
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    scores, targets = make_inputs(9, 5, seed=14, dtype=torch.float32)
    scores.requires_grad_(requires_grad)
    row_mask = torch.tensor([True, False] * 4 + [True])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # backprop through an op without autograd kernel (by design)
        for args in ((scores, targets, None, False), (scores, targets, row_mask, True)):
            torch.library.opcheck(torch.ops.pyzsl.multilabel_ap.default, args)
        for k in (1, 3, 7):
            torch.library.opcheck(torch.ops.pyzsl.multilabel_topk_hits.default, (scores, targets, k))
            # Detached: opcheck's autograd test sums the outputs into one value, which fails on this op's mix of
            # integer and float outputs; the evaluation calls it on detached scores only.
            torch.library.opcheck(torch.ops.pyzsl.multilabel_row_scan.default, (scores.detach(), targets, k))
        positive_scores, positive_offsets = torch.ops.pyzsl.multilabel_row_scan(scores.detach(), targets, 1)[3:]
        for mask in (None, row_mask):
            args = (scores, targets, mask, False, positive_scores, positive_offsets)
            torch.library.opcheck(torch.ops.pyzsl.multilabel_ap_given_positives.default, args)


# --------------------------------------------------------------------------------- the evaluation's one row scan

@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (40, 1006), (3, 64), (5, 65), (4, 0), (0, 3)])
def test_cpp_row_scan_matches_topk_and_flags_exactly_the_bad_inputs(dtype, shape):
    # multilabel_evaluation on the cpp backend reads the rows once (multilabel_row_scan): its hits must be those of
    # multilabel_topk_hits, its positives each label's positive scores (in the kernels' compare type), and
    # inputs_valid false for one NaN or inf anywhere (unannotated entries included) or one target outside
    # {-1, 0, 1}, at the first, the last and a middle position of rows of awkward lengths. k = 3 and 17 take both
    # AVX-512 checks: the bounded top-K's (k <= 16), which tests the scores as it reads them, and the separate one.
    N, L = shape
    scores, targets = make_inputs(N, L, seed=N + L, dtype=dtype)
    compare = torch.float64 if dtype == torch.float64 else torch.float32
    for k in (1, 5, 17):
        hits, row_positives, valid, positive_scores, offsets = torch.ops.pyzsl.multilabel_row_scan(scores, targets, k)
        want_hits, want_positives = torch.ops.pyzsl.multilabel_topk_hits(scores, targets, k)
        assert torch.equal(hits, want_hits) and torch.equal(row_positives, want_positives) and bool(valid)
        assert positive_scores.dtype == compare and offsets.tolist() == [0] + (targets == 1).sum(0).cumsum(0).tolist()
        for j in range(L):
            got = positive_scores[offsets[j]:offsets[j + 1]].sort().values
            assert torch.equal(got, scores[:, j][targets[:, j] == 1].to(compare).sort().values), (k, j)
    for n, j in {(0, 0), (N - 1, L - 1), (N // 2, L // 2)} if N and L else ():
        for bad in (float("nan"), float("inf"), float("-inf")):
            s = scores.clone()
            s[n, j] = bad
            for k in (3, 17):
                assert not bool(torch.ops.pyzsl.multilabel_row_scan(s, targets, k)[2]), (n, j, bad, k)
        for bad in (2, -2, 127, -128):
            t = targets.clone()
            t[n, j] = bad
            for k in (3, 17):
                assert not bool(torch.ops.pyzsl.multilabel_row_scan(scores, t, k)[2]), (n, j, bad, k)
    huge = torch.full((2, 3), torch.finfo(dtype).max, dtype=dtype)  # finite, however large
    assert bool(torch.ops.pyzsl.multilabel_row_scan(huge, torch.ones(2, 3, dtype=torch.int8), 2)[2])


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpp_ap_given_positives_equals_ap(dtype):
    # The AP from the row scan's positives is the AP op's, with every row or only the rows with a positive (the mask
    # of the protocols that drop the others), under both rules for unannotated entries.
    for seed, (N, L) in enumerate([(1, 1), (37, 13), (300, 70), (8192 + 5, 3)]):
        scores, targets = make_inputs(N, L, seed=seed, dtype=dtype)
        targets[0] = torch.where(targets[0] == 1, -1, targets[0])  # a row without positive
        positives = torch.ops.pyzsl.multilabel_row_scan(scores, targets, 2)[3:]
        for mask in (None, (targets == 1).any(1)):
            for flag in (False, True):
                got = torch.ops.pyzsl.multilabel_ap_given_positives(scores, targets, mask, flag, *positives)
                want = torch.ops.pyzsl.multilabel_ap(scores, targets, mask, flag)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (seed, flag)


@needs_cpp
def test_cpp_ap_given_positives_rejects_bad_positives():
    scores, targets = make_inputs(6, 4, seed=24, dtype=torch.float32)
    ap_op = torch.ops.pyzsl.multilabel_ap_given_positives
    positive_scores, positive_offsets = torch.ops.pyzsl.multilabel_row_scan(scores, targets, 2)[3:]
    for bad_scores, bad_offsets, message in [
            (positive_scores.double(), positive_offsets, "positive_scores must be 1-D Float, got Double"),
            (positive_scores, positive_offsets[:-1], "positive_offsets must be 1-D int64 of size L + 1 = 5"),
            (positive_scores[:-1], positive_offsets, "positive_offsets must run from 0 to")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            ap_op(scores, targets, None, False, bad_scores, bad_offsets)
    zigzag = positive_offsets.clone()
    zigzag[1], zigzag[2] = int(positive_offsets[2]) + 1, int(positive_offsets[1])
    with pytest.raises(ValueError, match="positive_offsets must be non-decreasing steps of at most N"):
        ap_op(scores, targets, None, False, positive_scores, zigzag)


def test_evaluation_names_bad_values_found_in_the_row_scan():
    # The fast path (cpp backend, int8 targets): the same messages as the Python checks, for an unannotated NaN too.
    scores, targets = make_inputs(6, 9, seed=23, dtype=torch.float32)
    unannotated = (targets == 0).nonzero()[0].tolist()
    bad = scores.clone()
    bad[tuple(unannotated)] = float("nan")
    with _raises(f"multilabel_evaluation: scores must be finite, found 1 NaN/inf value(s); the first is nan at index "
                 f"{unannotated}"):
        multilabel_evaluation(bad, targets)
    two = targets.clone()
    two[5, 8] = 2
    with _raises("multilabel_evaluation: targets must take values in [-1, 0, 1], found 1 other value(s); the first "
                 "is 2 at index [5, 8]"):
        multilabel_evaluation(scores, two)
    assert multilabel_evaluation(scores, targets, ks=()) == {"mAP": multilabel_evaluation(scores, targets)["mAP"]}


# ---------------------------------------------------------------------------------------------------- input errors

def _raises(match):
    return pytest.raises(ValueError, match=re.escape(match))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_scores_are_rejected(backend):
    scores, targets = make_inputs(5, 4, seed=15, dtype=torch.float32, tied=False)
    bad = scores.clone()
    bad[3, 0] = float("inf")
    bad[1, 2] = float("nan")
    with _raises("scores must be finite, found 2 NaN/inf value(s); the first is nan at index [1, 2]"):
        multilabel_average_precision(bad, targets, backend=backend)
    with _raises("found 2 NaN/inf value(s)"):
        multilabel_topk(bad, targets, 2, backend=backend)
    with _raises("found 2 NaN/inf value(s)"):
        multilabel_evaluation(bad, targets, backend=backend)
    only_inf = scores.clone().to(torch.float16)
    only_inf[4, 3] = float("-inf")
    with _raises("found 1 NaN/inf value(s); the first is -inf at index [4, 3]"):
        multilabel_average_precision(only_inf, targets, backend=backend)
    # Finite values whose sum overflows are fine.
    huge = torch.tensor([[3e38, 2e38], [1e38, 3e38]], dtype=torch.float32)
    ap = multilabel_average_precision(huge, torch.tensor([[1, -1], [-1, 1]]), average="none", backend=backend)
    assert ap.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_targets_are_rejected(backend):
    scores, targets = make_inputs(5, 4, seed=16)
    two = targets.long()
    two[2, 1] = 2
    with _raises("targets must take values in [-1, 0, 1], found 1 other value(s); the first is 2 at index [2, 1]"):
        multilabel_average_precision(scores, two, backend=backend)
    minus_two = targets.clone()
    minus_two[0, 3] = -2
    minus_two[4, 0] = 5
    with _raises("found 2 other value(s); the first is -2 at index [0, 3]"):
        multilabel_topk(scores, minus_two, 1, backend=backend)
    with _raises("targets must be an integer tensor"):
        multilabel_average_precision(scores, targets.float(), backend=backend)
    with _raises("targets must be an integer tensor"):
        multilabel_topk(scores, targets == 1, 1, backend=backend)
    with _raises("targets must have the shape of scores [5, 4], got [5, 3]"):
        multilabel_average_precision(scores, targets[:, :3], backend=backend)
    with _raises("targets must have the shape of scores"):
        multilabel_evaluation(scores, targets.T.contiguous()[:, :5], backend=backend)


def test_bad_scores_and_arguments_are_rejected():
    scores, targets = make_inputs(5, 4, seed=17)
    with _raises("scores must be 2-D [N, L], got shape [5]"):
        multilabel_average_precision(scores[:, 0], targets[:, 0])
    with _raises("scores must be 2-D"):
        multilabel_topk(scores[None], targets[None], 1)
    with _raises("scores must be floating point"):
        multilabel_average_precision(targets, targets)
    for k, message in ((0, "k must be >= 1, got 0"), (-1, "k must be >= 1, got -1"),
                       (True, "k must be an int >= 1, got True"), (2.0, "k must be an int >= 1, got 2.0")):
        with _raises(message):
            multilabel_topk(scores, targets, k)
    with _raises("ks must be >= 1, got 0"):
        multilabel_evaluation(scores, targets, ks=(3, 0))
    with _raises("protocol must be one of ['biam', 'lesa', 'sdl'], got 'LESA'"):
        multilabel_average_precision(scores, targets, protocol="LESA")
    with _raises("protocol must be one of"):
        multilabel_topk(scores, targets, 1, protocol="coco")
    with _raises("protocol must be one of"):
        multilabel_evaluation(scores, targets, protocol="")
    with _raises("average must be 'macro' or 'none', got 'micro'"):
        multilabel_average_precision(scores, targets, average="micro")
    with _raises("backend must be one of ('auto', 'reference', 'cpp', 'triton', 'cuda'), got 'gpu'"):
        multilabel_average_precision(scores, targets, backend="gpu")
    with _raises("backend must be one of"):
        multilabel_topk(scores, targets, 1, backend="CPP")
    with pytest.raises(TypeError, match="scores must be a torch.Tensor"):
        multilabel_average_precision(scores.numpy(), targets)


def test_cuda_backend_on_cpu_tensors_lists_the_available_backends():
    scores, targets = make_inputs(5, 4, seed=18)
    available = available_backends("cpu")
    assert "cuda" not in available and {"reference", "cpp"} <= set(available)
    with _raises("backend='cuda' cannot run here") as error:
        multilabel_average_precision(scores, targets, backend="cuda")
    assert f"Available for cpu tensors: {available}" in str(error.value)
    assert "multilabel_average_precision" in str(error.value)
    with _raises(f"Available for cpu tensors: {available}"):
        multilabel_topk(scores, targets, 2, backend="cuda")


@pytest.mark.needs_cuda  # a device mismatch needs a second device: skipped (conftest) where no GPU is visible
def test_device_mismatch_is_rejected():
    scores, targets = make_inputs(5, 4, seed=19)
    with _raises("targets is on cuda:0 but scores is on cpu"):
        multilabel_average_precision(scores, targets.cuda())
    with _raises("targets is on cpu but scores is on cuda:0"):
        multilabel_topk(scores.cuda(), targets, 1)


# ------------------------------------------------------------------------------------------- multilabel_evaluation

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("protocol", PROTOCOL_NAMES)
def test_evaluation_equals_the_separate_functions(protocol, backend):
    scores, targets = make_inputs(90, 14, seed=20)
    targets = add_awkward_columns_and_rows(targets)
    results = multilabel_evaluation(scores, targets, ks=(1, 3, 5, 20), protocol=protocol, backend=backend)
    assert list(results) == ["mAP"] + [f"{m}@{k}" for k in (1, 3, 5, 20) for m in ("P", "R", "F1")]
    assert all(isinstance(v, float) for v in results.values())
    assert results["mAP"] == float(multilabel_average_precision(scores, targets, protocol=protocol, backend=backend))
    for k in (1, 3, 5, 20):
        topk = multilabel_topk(scores, targets, k, protocol=protocol, backend=backend)
        assert (results[f"P@{k}"], results[f"R@{k}"], results[f"F1@{k}"]) == tuple(map(float, topk))
    only_map = multilabel_evaluation(scores, targets, ks=(), protocol=protocol, backend=backend)
    assert only_map == {"mAP": results["mAP"]}


def test_evaluation_defaults_are_k_3_and_5_under_lesa():
    scores, targets = make_inputs(30, 8, seed=21)
    results = multilabel_evaluation(scores, targets)
    assert set(results) == {"mAP", "P@3", "R@3", "F1@3", "P@5", "R@5", "F1@5"}
    assert results["P@5"] == float(multilabel_topk(scores, targets, 5, protocol="lesa", backend="reference").precision)


# ------------------------------------------------------------------------------------------- single-label accuracy

def class_mean_accuracy_loop(preds, labels, classes):
    accuracies = []
    for c in classes:
        members = [i for i, y in enumerate(labels) if y == c]
        if members:
            accuracies.append(sum(preds[i] == c for i in members) / len(members))
    return sum(accuracies) / len(accuracies) if accuracies else math.nan


def make_single_label(N, C, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (N,), generator=g)
    logits = torch.randn(N, C, generator=g)
    # A learnable-looking signal so accuracies are away from 0 and 1.
    logits[torch.arange(N), labels] += torch.rand(N, generator=g) * 2
    return logits, labels


@pytest.mark.parametrize("seed", range(3))
def test_gzsl_accuracy_matches_loop_and_sklearn(seed):
    C = 12
    seen, unseen = [0, 3, 4, 7, 8, 11, 10], [9, 1, 2, 5, 6]
    logits, labels = make_single_label(200, C, seed)
    labels[labels == 6] = 5  # unseen class 6 has no test sample: left out of U's mean
    preds = logits.argmax(1)
    result = gzsl_accuracy(logits, labels, seen_classes=seen, unseen_classes=unseen)
    p, y = preds.tolist(), labels.tolist()
    s_expected = class_mean_accuracy_loop(p, y, seen)
    u_expected = class_mean_accuracy_loop(p, y, unseen)
    assert float(result.seen) == pytest.approx(s_expected, abs=1e-12)
    assert float(result.unseen) == pytest.approx(u_expected, abs=1e-12)
    assert float(result.h) == pytest.approx(2 * s_expected * u_expected / (s_expected + u_expected), abs=1e-12)
    is_seen = np.isin(labels.numpy(), seen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # predictions of classes absent from y_true
        assert float(result.seen) == pytest.approx(balanced_accuracy_score(labels[is_seen], preds[is_seen]),
                                                   abs=1e-12)
        assert float(result.unseen) == pytest.approx(
            balanced_accuracy_score(labels[~is_seen], preds[~is_seen]), abs=1e-12)
    # Predicted ids give the same numbers as the logits they come from.
    from_preds = gzsl_accuracy(preds, labels, seen_classes=seen, unseen_classes=unseen)
    assert tuple(map(float, from_preds)) == tuple(map(float, result))
    assert from_preds.seen.dtype == torch.float64


def test_gzsl_accuracy_edge_cases():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    preds = torch.tensor([0, 1, 1, 0, 0, 0])
    s, u, h = gzsl_accuracy(preds, labels, seen_classes=[0, 1], unseen_classes=[2, 3])
    assert float(s) == pytest.approx((0.5 + 1.0) / 2) and float(u) == 0.0 and float(h) == 0.0
    s, u, h = gzsl_accuracy(torch.tensor([1, 1, 0]), torch.tensor([0, 0, 1]), seen_classes=[0, 1], unseen_classes=[2])
    assert float(s) == 0.0 and math.isnan(u) and math.isnan(h)  # no unseen sample: U undefined
    s, u, h = gzsl_accuracy(torch.tensor([2, 2]), torch.tensor([2, 2]), seen_classes=[0, 1], unseen_classes=[2])
    assert math.isnan(s) and float(u) == 1.0


def test_zsl_accuracy_restricts_logits_to_unseen_classes():
    C = 10
    unseen = [7, 2, 5, 9]
    logits, labels = make_single_label(150, C, 22)
    labels = torch.tensor(unseen)[labels % 4]
    logits[:, [0, 1, 3]] += 100.0  # seen classes win every argmax over all classes; ZSL must not see them
    restricted = torch.tensor(unseen)[logits[:, unseen].argmax(1)]
    accuracy = zsl_accuracy(logits, labels, unseen_classes=unseen)
    assert accuracy.dtype == torch.float64
    assert float(accuracy) == pytest.approx(class_mean_accuracy_loop(restricted.tolist(), labels.tolist(), unseen),
                                            abs=1e-12)
    assert float(accuracy) == pytest.approx(balanced_accuracy_score(labels, restricted), abs=1e-12)
    assert 0.2 < float(accuracy) < 1.0
    assert float(zsl_accuracy(restricted, labels, unseen_classes=unseen)) == float(accuracy)
    # The same logits under GZSL pick the seen classes: U = 0.
    assert float(gzsl_accuracy(logits, labels, seen_classes=[0, 1, 3], unseen_classes=unseen).unseen) == 0.0
    assert math.isnan(zsl_accuracy(torch.zeros(0, C), torch.zeros(0, dtype=torch.long), unseen_classes=unseen))


def test_accuracy_errors():
    logits, labels = make_single_label(20, 6, 23)
    labels = labels % 4
    with _raises("seen_classes and unseen_classes overlap"):
        gzsl_accuracy(logits, labels, seen_classes=[0, 1, 2], unseen_classes=[2, 3])
    labels_out = labels.clone()
    labels_out[3] = 5
    with _raises("1 label(s) are not in seen_classes or unseen_classes; the first is 5 at index 3"):
        gzsl_accuracy(logits, labels_out, seen_classes=[0, 1], unseen_classes=[2, 3])
    with _raises("label(s) are not in unseen_classes"):
        zsl_accuracy(logits, labels, unseen_classes=[2, 3])
    with _raises("unseen_classes must lie in [0, "):
        zsl_accuracy(logits, labels, unseen_classes=[-1, 2, 3])
    with _raises("duplicate"):
        gzsl_accuracy(logits, labels, seen_classes=[0, 1, 1], unseen_classes=[2, 3])
    with _raises("class index 9 is out of range for logits with 6 columns"):
        zsl_accuracy(logits, labels % 4, unseen_classes=[0, 1, 2, 3, 9])
    with _raises("logits have 20 rows but labels has 19"):
        gzsl_accuracy(logits, labels[:19], seen_classes=[0, 1], unseen_classes=[2, 3])
    with _raises("predictions shape [19] differs from labels shape [20]"):
        zsl_accuracy(labels[:19], labels, unseen_classes=[0, 1, 2, 3])
    with _raises("logits_or_preds must be float logits [N, C] or integer predictions [N]"):
        zsl_accuracy(labels.float(), labels, unseen_classes=[0, 1, 2, 3])
    with _raises("labels must be a 1-D integer tensor"):
        zsl_accuracy(logits, labels.float(), unseen_classes=[0, 1, 2, 3])
    bad = logits.clone()
    bad[4, 1] = float("nan")
    with _raises("logits_or_preds must be finite, found 1 NaN/inf value(s); the first is nan at index [4, 1]"):
        gzsl_accuracy(bad, labels, seen_classes=[0, 1], unseen_classes=[2, 3])
