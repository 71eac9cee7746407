"""Pure-PyTorch reference kernels of the multi-label evaluation ops.

They are the test oracle of every other backend and the fallback where no compiled kernel fits. They are written
to read like the formulas of GUIDE §4, vectorised over labels in chunks so they stay usable at benchmark sizes.
Signatures and outputs match ``torch.ops.pyzsl.multilabel_ap`` and ``torch.ops.pyzsl.multilabel_topk_hits``.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

_CHUNK_ELEMENTS = 1 << 23  # labels per chunk * rows; bounds the reference's memory


def _count_at_or_above(sorted_scores: Tensor, flags_in_sorted_order: Tensor, scores: Tensor) -> Tensor:
    """For every entry of ``scores`` [l, N], how many flagged entries of its row score >= it.

    ``sorted_scores`` is each row sorted ascending; an entry with value s counts everything from the first
    sorted position holding s onwards, so ties all count.
    """
    suffix = flags_in_sorted_order.flip(1).cumsum(1).flip(1)  # suffix[m] = flagged entries at positions >= m
    first = torch.searchsorted(sorted_scores, scores, side="left")
    return suffix.gather(1, first)


def multilabel_ap(
    scores: Tensor, targets: Tensor, row_mask: Optional[Tensor], unannotated_is_negative: bool
) -> Tuple[Tensor, Tensor]:
    """Per-label AP_j = (1/P_j) * sum over positives k of pos(>= s_kj) / annotated(>= s_kj).

    Rows where ``row_mask`` is False are left out. Annotated means target != 0, or every entry when
    ``unannotated_is_negative``. A label with no positive gets AP 0. Returns (ap float64 [L], num_positives int64 [L]).
    """
    if row_mask is not None:
        scores, targets = scores[row_mask], targets[row_mask]
    N, L = scores.shape
    ap = torch.zeros(L, dtype=torch.float64, device=scores.device)
    num_positives = torch.zeros(L, dtype=torch.int64, device=scores.device)
    if N == 0 or L == 0:
        return ap, num_positives
    chunk = max(1, _CHUNK_ELEMENTS // N)
    for j0 in range(0, L, chunk):
        s = scores[:, j0 : j0 + chunk].T.double().contiguous()  # [l, N]; float64 holds every half/float value exactly
        t = targets[:, j0 : j0 + chunk].T
        positive = t == 1
        annotated = torch.ones_like(positive) if unannotated_is_negative else t != 0
        s_sorted, order = s.sort(dim=1)
        pos_at_or_above = _count_at_or_above(s_sorted, positive.gather(1, order).long(), s)
        annotated_at_or_above = _count_at_or_above(s_sorted, annotated.gather(1, order).long(), s)
        precision_at_positive = torch.where(
            positive, pos_at_or_above.double() / annotated_at_or_above.clamp(min=1), torch.zeros((), dtype=torch.float64)
        )
        P = positive.sum(1)
        ap[j0 : j0 + chunk] = precision_at_positive.sum(1) / P.clamp(min=1)
        num_positives[j0 : j0 + chunk] = P
    return ap, num_positives


def multilabel_topk_hits(scores: Tensor, targets: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """hits[i, r]: is the r-th best label of row i positive (score descending, ties by lower label index)?

    Columns r >= L are False. Returns (hits bool [N, k], row_positives int64 [N]).
    """
    N, L = scores.shape
    hits = torch.zeros(N, k, dtype=torch.bool, device=scores.device)
    if L > 0:
        # A stable descending sort keeps equal scores in index order, which is the tie rule.
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        hits[:, : order.shape[1]] = targets.gather(1, order) == 1
    row_positives = (targets == 1).sum(1)
    return hits, row_positives
