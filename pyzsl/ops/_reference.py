"""Pure-PyTorch reference kernels of pyzsl.ops: the test oracles and the fallback."""
import torch
from torch import Tensor

RANK_LOSS_EPS = 1e-8


def lesa_rank_loss(scores: Tensor, targets: Tensor, margin: float = 1.0) -> Tensor:
    """LESA's ranking loss in the published pairwise form (builds the [B, L, L] pair tensor).

    ``loss = mean_i  sum_{p in P_i, n in N_i} max(0, margin + s_n - s_p) / (#violating pairs of i + 1e-8)``
    with P_i the positives (target 1) and N_i the negatives (target -1) of image i; unannotated (0) entries take no
    part. The violating-pair count is a constant for autograd, as in the published code.
    """
    positive = targets == 1
    negative = targets == -1
    difference = margin + scores[:, None, :] - scores[:, :, None]  # [B, p, n] = margin + s_n - s_p
    pairs = positive[:, :, None] & negative[:, None, :]
    hinge = torch.relu(difference) * pairs
    violating = (hinge > 0).sum(dim=(1, 2)).to(scores.dtype)
    return (hinge.sum(dim=(1, 2)) / (violating + RANK_LOSS_EPS)).mean()


def head_max_scores(attended: Tensor, classifiers: Tensor):
    """``scores[b, l] = max_m attended[b, m] . classifiers[l]`` and the arg-max head, through the full [B, M, L]."""
    all_heads = torch.einsum("bmd,ld->bml", attended, classifiers)
    scores, head = all_heads.max(dim=1)
    return scores, head


def region_attention(features: Tensor, w1: Tensor, w2: Tensor):
    """LESA's attention over regions in plain PyTorch ops: ``(attended [B, M, D + 1], attention_logits [B, M, R])``.

    ``alpha = softmax_r([tanh([F, 1] w1), 1] w2)``, ``attended[b, m] = sum_r alpha_mr [F_r, 1]``. The appended ones
    are written as bias rows (w1[D], w2[H]): the same values, without concatenated copies.
    """
    B, R, D = features.shape
    H, M = w1.shape[1], w2.shape[1]
    hidden = torch.tanh(torch.addmm(w1[D], features.reshape(B * R, D), w1[:D]))          # [B R, H]
    attention_logits = torch.addmm(w2[H], hidden, w2[:H]).view(B, R, M).transpose(1, 2)  # [B, M, R]
    alpha = torch.softmax(attention_logits, dim=2)
    attended = torch.cat([alpha @ features, alpha.sum(2, keepdim=True)], dim=2)           # [B, M, D + 1]
    return attended, attention_logits
