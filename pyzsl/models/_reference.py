"""LESA's losses computed the way the published TensorFlow code computes them: the full [B, M, L] head-score tensor
and the [B, L, L] (positive, negative) pair tensor. The oracle of :func:`pyzsl.models.lesa.lesa_loss` in the tests
and the reference path of ``benchmarks/bench_lesa.py``."""
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import _reference as ops_reference


def pairwise_rank_loss(scores: Tensor, targets: Tensor, chunk_pairs: int = 1 << 27) -> Tensor:
    """LESA's rank loss in the published pairwise form, over chunks of images whose [b, L, L] pair tensors hold at
    most ``chunk_pairs`` entries (the batch mean is additive over chunks)."""
    B = scores.shape[0]
    chunk = max(1, chunk_pairs // max(1, scores.shape[1] ** 2))
    return sum(ops_reference.lesa_rank_loss(scores[i:i + chunk], targets[i:i + chunk]) * len(scores[i:i + chunk])
               for i in range(0, B, chunk)) / B


def published_lesa_losses(model, features: Tensor, targets: Tensor, *, chunk_pairs: int = 1 << 27
                          ) -> Dict[str, Tensor]:
    """The four losses over the seen labels. The pair tensor is built for chunks of images of at most
    ``chunk_pairs`` entries each (the batch mean is additive over chunks), so large label sets fit in memory."""
    regions = model.region_features(features)
    B, R, D = regions.shape
    ones = regions.new_ones(B, R, 1)
    augmented = torch.cat([regions, ones], 2)
    hidden = torch.cat([torch.tanh(augmented @ model.w1), ones], 2)
    logits = (hidden @ model.w2).transpose(1, 2)                                   # [B, M, R]
    attended = torch.softmax(logits, 2) @ augmented                                # [B, M, D + 1]
    classifiers = model.label_projection(model.seen_vectors)
    zero_augmented = torch.cat([classifiers, classifiers.new_zeros(len(classifiers), 1)], 1)
    head_scores = attended @ zero_augmented.t()                                    # [B, M, L]
    scores = head_scores.max(1).values
    y = targets.to(scores.dtype)
    rank = pairwise_rank_loss(scores, targets, chunk_pairs)
    distribution = ((torch.softmax(head_scores, 1) * (y > 0).unsqueeze(1)).sum(2) ** 2).mean()
    global_scores = regions.mean(1) @ classifiers.t()
    relevance = F.relu(-(scores - global_scores) * y).sum()
    n = F.normalize(logits, dim=2)
    gram = n @ n.transpose(1, 2)
    diversity = (gram * (1 - torch.eye(gram.shape[1], dtype=gram.dtype, device=gram.device))).norm()
    return {"scores": scores, "rank": rank, "distribution": distribution, "relevance": relevance,
            "diversity": diversity}
