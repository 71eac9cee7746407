"""Triton kernels of the multi-label evaluation ops, registered as ``torch.library.triton_op`` operators.

``pyzsl::multilabel_ap_triton`` and ``pyzsl::multilabel_topk_hits_triton`` compute exactly what
``pyzsl.metrics._reference`` (the oracle) and the C++ ops ``pyzsl::multilabel_ap`` / ``pyzsl::multilabel_topk_hits``
compute. Neither kernel sorts, so ties need no special care:

- AP: a first kernel packs each label's positive scores to the front of a [L, N] buffer (a running prefix sum over
  the column). Then one program per (label, block of its positives) sweeps the label's column and counts, for each
  of those positives, the positives and the annotated entries scoring >= it. The per-block sums of
  pos(>= s) / annotated(>= s) are added on the host in a fixed order, so results are deterministic.
- top-K: one program per block of rows makes K selection passes over the row, chunk by chunk; pass r picks the
  entry that comes right after pass r-1's pick in the order "score descending, then label index ascending". Any
  row length works, and nothing is kept per row but the last pick.

Comparisons run in float32 for half/bfloat16/float32 scores (the upcast keeps every value and the order) and in
float64 for float64 scores. Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors, which is how they are tested;
the ops are then plain opaque custom ops (see ``_define_op``). ``TRITON_AVAILABLE`` says whether triton imported.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

try:
    import triton
    import triton.language as tl
except ImportError:  # pyzsl works without triton; only this backend is then missing
    TRITON_AVAILABLE = False
else:
    TRITON_AVAILABLE = True

# AP tiles: BLOCK_POSITIVES positives of one label compared with BLOCK_ROWS entries of its column at a time.
_AP_BLOCK_POSITIVES = 64
_AP_BLOCK_ROWS = 256
# top-K tiles: up to _TOPK_TILE_ELEMENTS scores per step, rows times a chunk of at most _TOPK_MAX_CHUNK labels.
_TOPK_TILE_ELEMENTS = 4096
_TOPK_MAX_CHUNK = 1024

if TRITON_AVAILABLE:

    @triton.jit
    def _pack_positives_kernel(
        scores_ptr, targets_ptr, row_mask_ptr, packed_ptr, num_positives_ptr, N, L,
        HAS_ROW_MASK: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    ):
        """Label j: its positive scores, cast to the packed buffer's dtype, go to packed[j, :P_j]; P_j to
        num_positives[j]."""
        label = tl.program_id(0)
        packed_row = packed_ptr + label.to(tl.int64) * N
        count = tl.zeros([], dtype=tl.int32)
        for start in range(0, N, BLOCK_ROWS):
            rows = start + tl.arange(0, BLOCK_ROWS)
            in_range = rows < N
            offsets = rows.to(tl.int64) * L + label
            positive = in_range & (tl.load(targets_ptr + offsets, mask=in_range, other=0) == 1)
            if HAS_ROW_MASK:
                positive = positive & (tl.load(row_mask_ptr + rows, mask=in_range, other=0) != 0)
            slot = count + tl.cumsum(positive.to(tl.int32), axis=0) - 1
            score = tl.load(scores_ptr + offsets, mask=positive, other=0)
            tl.store(packed_row + slot, score.to(packed_ptr.dtype.element_ty), mask=positive)
            count += tl.sum(positive.to(tl.int32), axis=0)
        tl.store(num_positives_ptr + label, count.to(tl.int64))

    @triton.jit
    def _ap_partial_sums_kernel(
        scores_ptr, targets_ptr, row_mask_ptr, packed_ptr, num_positives_ptr, partial_sums_ptr, N, L, num_blocks,
        HAS_ROW_MASK: tl.constexpr, UNANNOTATED_IS_NEGATIVE: tl.constexpr,
        BLOCK_POSITIVES: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    ):
        """Program (j, b): partial_sums[j, b] = sum over positives p in block b of label j of pos(>= p) / ann(>= p).

        The grid is flat (L * num_blocks programs) so that neither L nor N meets CUDA's 65535 limit on grid y/z.
        """
        label = tl.program_id(0) // num_blocks
        block = tl.program_id(0) % num_blocks
        num_positives = tl.load(num_positives_ptr + label).to(tl.int32)
        if block * BLOCK_POSITIVES >= num_positives:
            return  # the host zero-filled partial_sums
        slots = block * BLOCK_POSITIVES + tl.arange(0, BLOCK_POSITIVES)
        valid = slots < num_positives
        thresholds = tl.load(packed_ptr + label.to(tl.int64) * N + slots, mask=valid, other=0)
        positives_at_or_above = tl.zeros([BLOCK_POSITIVES], dtype=tl.int32)
        annotated_at_or_above = tl.zeros([BLOCK_POSITIVES], dtype=tl.int32)
        for start in range(0, N, BLOCK_ROWS):
            rows = start + tl.arange(0, BLOCK_ROWS)
            in_range = rows < N
            offsets = rows.to(tl.int64) * L + label
            target = tl.load(targets_ptr + offsets, mask=in_range, other=0)
            counted = in_range
            if HAS_ROW_MASK:
                counted = counted & (tl.load(row_mask_ptr + rows, mask=in_range, other=0) != 0)
            if not UNANNOTATED_IS_NEGATIVE:
                counted = counted & (target != 0)
            positive = counted & (target == 1)
            score = tl.load(scores_ptr + offsets, mask=counted, other=0).to(thresholds.dtype)
            at_or_above = score[None, :] >= thresholds[:, None]
            annotated_at_or_above += tl.sum((at_or_above & counted[None, :]).to(tl.int32), axis=1)
            positives_at_or_above += tl.sum((at_or_above & positive[None, :]).to(tl.int32), axis=1)
        # A positive counts itself, so annotated >= 1; the clamp only matters for NaN scores, as in the reference.
        precision = positives_at_or_above.to(tl.float64) / tl.maximum(annotated_at_or_above, 1).to(tl.float64)
        block_sum = tl.sum(tl.where(valid, precision, 0.0), axis=0)
        tl.store(partial_sums_ptr + label.to(tl.int64) * num_blocks + block, block_sum)

    @triton.jit
    def _topk_hits_kernel(
        scores_ptr, targets_ptr, hits_ptr, row_positives_ptr, N, L, k, kept,
        COMPARE_DTYPE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_LABELS: tl.constexpr,
    ):
        """Rows of program b: hits[i, r] for r < kept = min(k, L) (the host zero-filled the rest), row_positives[i]."""
        rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_in_range = rows < N
        row_starts = rows.to(tl.int64) * L
        columns = tl.arange(0, BLOCK_LABELS)

        row_positives = tl.zeros([BLOCK_ROWS], dtype=tl.int64)
        for start in range(0, L, BLOCK_LABELS):
            in_range = row_in_range[:, None] & (start + columns < L)[None, :]
            target = tl.load(targets_ptr + row_starts[:, None] + start + columns[None, :], mask=in_range, other=0)
            row_positives += tl.sum((target == 1).to(tl.int64), axis=1)
        tl.store(row_positives_ptr + rows, row_positives, mask=row_in_range)

        # The previous pick; (+inf, index -1) comes before every entry. A best index of L means "none found yet".
        previous_score = tl.full([BLOCK_ROWS], float("inf"), COMPARE_DTYPE)
        previous_index = tl.full([BLOCK_ROWS], -1, tl.int32)
        for r in range(0, kept):
            best_score = tl.full([BLOCK_ROWS], float("-inf"), COMPARE_DTYPE)
            best_index = tl.zeros([BLOCK_ROWS], dtype=tl.int32) + L
            for start in range(0, L, BLOCK_LABELS):
                index = start + columns[None, :]
                in_range = row_in_range[:, None] & (index < L)
                score = tl.load(scores_ptr + row_starts[:, None] + index, mask=in_range, other=0).to(COMPARE_DTYPE)
                comes_after_previous = in_range & (
                    (score < previous_score[:, None])
                    | ((score == previous_score[:, None]) & (index > previous_index[:, None]))
                )
                candidate = tl.where(comes_after_previous, score, float("-inf"))
                chunk_best = tl.max(candidate, axis=1)
                is_chunk_best = comes_after_previous & (candidate == chunk_best[:, None])
                chunk_index = tl.min(tl.where(is_chunk_best, index, L), axis=1)
                # Chunks go left to right, so on equal scores the earlier chunk's lower index stays.
                better = (chunk_index < L) & ((chunk_best > best_score) | (best_index == L))
                best_score = tl.where(better, chunk_best, best_score)
                best_index = tl.where(better, chunk_index, best_index)
            target = tl.load(targets_ptr + row_starts + best_index, mask=row_in_range, other=0)
            tl.store(hits_ptr + rows.to(tl.int64) * k + r, target == 1, mask=row_in_range)
            previous_score = best_score
            previous_index = best_index

    # TRITON_INTERPRET=1 at decoration time makes triton.jit return an interpreter object instead of a JITFunction.
    _INTERPRETED = not isinstance(_topk_hits_kernel, triton.runtime.jit.JITFunction)


def _check_scores_targets(scores: Tensor, targets: Tensor, op: str) -> None:
    """The checks of csrc/checks.h, so that this backend rejects what the C++ one rejects, with the same message."""
    if not TRITON_AVAILABLE:
        raise RuntimeError(f"{op}: triton is not installed")
    if scores.dim() != 2:
        raise ValueError(f"{op}: scores must be 2-D [N, L], got {scores.dim()}-D")
    if not scores.is_floating_point():
        raise ValueError(f"{op}: scores must be floating point, got {scores.dtype}")
    if targets.dtype != torch.int8:
        raise ValueError(f"{op}: targets must be int8, got {targets.dtype}")
    if targets.shape != scores.shape:
        raise ValueError(f"{op}: targets shape {tuple(targets.shape)} differs from scores shape {tuple(scores.shape)}")
    if targets.device != scores.device:
        raise ValueError(f"{op}: targets on {targets.device} but scores on {scores.device}")


def _launches_kernels(scores: Tensor) -> bool:
    """False for fake tensors under the interpreter (the fake kernel, opcheck, tracing): it needs real data.

    Compiled kernels always launch; wrap_triton traces them and gives the fake pass what it needs.
    """
    return not (_INTERPRETED and is_fake(scores))


def _compare_dtype(scores: Tensor) -> torch.dtype:
    """float64 scores compare in float64; every narrower float compares exactly in float32."""
    return torch.float64 if scores.dtype == torch.float64 else torch.float32


def multilabel_ap_triton(
    scores: Tensor, targets: Tensor, row_mask: Optional[Tensor], unannotated_is_negative: bool
) -> Tuple[Tensor, Tensor]:
    """Per-label AP and positive counts; same contract as ``pyzsl.metrics._reference.multilabel_ap``.

    Rows where ``row_mask`` is False are left out; annotated means target != 0, or every entry when
    ``unannotated_is_negative``; a label with no positive gets AP 0. Returns (ap float64 [L], num_positives int64 [L]).
    Work is O(N * P_j) for label j; the packed positives take an [L, N] float32 (float64) workspace.
    """
    _check_scores_targets(scores, targets, "multilabel_ap_triton")
    N, L = scores.shape
    if row_mask is not None and (row_mask.dtype != torch.bool or row_mask.shape != (N,)):
        raise ValueError(
            f"multilabel_ap_triton: row_mask must be bool [{N}], got {row_mask.dtype} {tuple(row_mask.shape)}"
        )
    if row_mask is not None and row_mask.device != scores.device:
        raise ValueError(f"multilabel_ap_triton: row_mask on {row_mask.device} but scores on {scores.device}")
    num_positives = scores.new_zeros(L, dtype=torch.int64)
    if N == 0 or L == 0:
        return scores.new_zeros(L, dtype=torch.float64), num_positives
    scores, targets = scores.contiguous(), targets.contiguous()
    row_mask_bytes = row_mask.contiguous().view(torch.int8) if row_mask is not None else None
    packed = scores.new_empty(L, N, dtype=_compare_dtype(scores))
    block_rows = min(_AP_BLOCK_ROWS, triton.next_power_of_2(N))
    block_positives = min(_AP_BLOCK_POSITIVES, triton.next_power_of_2(N))
    num_blocks = triton.cdiv(N, block_positives)
    partial_sums = scores.new_zeros(L, num_blocks, dtype=torch.float64)
    if _launches_kernels(scores):
        torch.library.wrap_triton(_pack_positives_kernel)[(L,)](
            scores, targets, row_mask_bytes, packed, num_positives, N, L,
            HAS_ROW_MASK=row_mask is not None, BLOCK_ROWS=block_rows,
        )
        torch.library.wrap_triton(_ap_partial_sums_kernel)[(L * num_blocks,)](
            scores, targets, row_mask_bytes, packed, num_positives, partial_sums, N, L, num_blocks,
            HAS_ROW_MASK=row_mask is not None, UNANNOTATED_IS_NEGATIVE=unannotated_is_negative,
            BLOCK_POSITIVES=block_positives, BLOCK_ROWS=block_rows,
        )
    ap = partial_sums.sum(1) / num_positives.clamp(min=1)
    return ap, num_positives


def multilabel_topk_hits_triton(scores: Tensor, targets: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Top-k hits and positive counts per row; same contract as ``pyzsl.metrics._reference.multilabel_topk_hits``.

    hits[i, r] says whether the r-th best label of row i (score descending, ties by lower label index) is positive;
    columns r >= L are False. Returns (hits bool [N, k], row_positives int64 [N]). Work is O(k * L) per row.
    """
    _check_scores_targets(scores, targets, "multilabel_topk_hits_triton")
    if k < 1:
        raise ValueError(f"multilabel_topk_hits_triton: k must be >= 1, got {k}")
    N, L = scores.shape
    hits = scores.new_zeros(N, k, dtype=torch.bool)
    row_positives = scores.new_zeros(N, dtype=torch.int64)
    if N == 0 or L == 0:
        return hits, row_positives
    scores, targets = scores.contiguous(), targets.contiguous()
    block_labels = min(_TOPK_MAX_CHUNK, triton.next_power_of_2(L))
    block_rows = min(_TOPK_TILE_ELEMENTS // block_labels, triton.next_power_of_2(N))
    compare_dtype = tl.float64 if _compare_dtype(scores) == torch.float64 else tl.float32
    if _launches_kernels(scores):
        torch.library.wrap_triton(_topk_hits_kernel)[(triton.cdiv(N, block_rows),)](
            scores, targets, hits, row_positives, N, L, k, min(k, L),
            COMPARE_DTYPE=compare_dtype, BLOCK_ROWS=block_rows, BLOCK_LABELS=block_labels,
        )
    return hits, row_positives


def _define_op(name: str, body):
    """A traceable ``triton_op`` for compiled kernels; an opaque ``custom_op`` for interpreted ones.

    wrap_triton passes interpreted kernels through untraced, so under torch.compile a triton_op would record the
    host code without its kernels; as an opaque op the body runs on real tensors, and on fake ones it is the fake.
    """
    if not _INTERPRETED:
        return torch.library.triton_op(name, body, mutates_args=())
    op = torch.library.custom_op(name, body, mutates_args=())
    op.register_fake(body)
    return op


if TRITON_AVAILABLE:
    multilabel_ap_triton = _define_op("pyzsl::multilabel_ap_triton", multilabel_ap_triton)
    multilabel_topk_hits_triton = _define_op("pyzsl::multilabel_topk_hits_triton", multilabel_topk_hits_triton)
