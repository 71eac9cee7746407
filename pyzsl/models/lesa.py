"""LESA: shared multi-attention for multi-label zero-shot learning (Huynh & Elhamifar, CVPR 2020).

As published (``hbdat/cvpr20_LESA: core/model_share_attention.py``): region features [B, R, D] pass a learned 2x2
conv + batch norm + ReLU; M attention heads over the regions are shared by every label; a label's classifier is
``c_l = W v_l`` from its fixed, L2-normalised word vector ``v_l``; its score is the best head's ``max_m f_m . c_l``.
Training minimises ``rank + 0.1 distribution + 0.001 relevance + 0.01 diversity`` with TF1 RMSProp and an LR that
decays when the EMA of the validation F1 falls.

Label sets: ``"seen"`` (training), ``"unseen"`` (ZSL) and ``"all"`` (GZSL, **unseen first**, as published).
"""
from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._backend import default_backend, resolve_backend
from ..ops import lesa_rank_loss, shared_multi_attention
from ..ops.attention import SharedAttention
from ..ops.conv import conv2x2_same
from ..ops.norm import batch_norm_relu
from ._distributed import GlobalBatchNorm2d, all_reduce_sum, global_batch_size, world_size

LABEL_SETS = ("seen", "unseen", "all")


@dataclass
class LESALossWeights:
    """The published weights of the ZSL scripts (``NUS_WIDE_zs_rank_Visual_Word_Attention.py``)."""
    distribution: float = 0.1
    relevance: float = 1e-3
    diversity: float = 1e-2


class LESAOutput(NamedTuple):
    scores: Tensor        # [B, L]
    attention: SharedAttention
    regions: Tensor       # [B, R, D] region features after conv/BN/ReLU
    classifiers: Tensor   # [L, D]
    # [B, D] sum over the regions (relevance loss). Computed before the attention, so that in the backward its
    # broadcast gradient is added in place to the attention's [B, R, D] feature gradient instead of the other way
    # round (which allocates a new [B, R, D] tensor).
    region_sum: Optional[Tensor] = None


def _normalised(vectors: Tensor, name: str) -> Tensor:
    if vectors.dim() != 2:
        raise ValueError(f"LESA: {name} must be [labels, embedding dim], got shape {list(vectors.shape)}")
    if not torch.isfinite(vectors).all():
        raise ValueError(f"LESA: {name} has non-finite values")
    norms = vectors.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        raise ValueError(f"LESA: {name} row {int((norms[:, 0] == 0).nonzero()[0])} is all zeros and cannot be "
                         f"L2-normalised")
    return (vectors / norms).float()


class LESA(nn.Module):
    """The LESA network. ``grid`` is the (height, width) of the region map, with height * width = R."""

    def __init__(self, seen_vectors: Tensor, unseen_vectors: Tensor, *, feature_dim: int = 512,
                 grid: Tuple[int, int] = (14, 14), hidden_dim: int = 512, heads: int = 10, use_conv: bool = True,
                 backend: Optional[str] = None):
        super().__init__()
        if seen_vectors.shape[1] != unseen_vectors.shape[1]:
            raise ValueError(f"LESA: seen and unseen label vectors must share a dimension, got "
                             f"{seen_vectors.shape[1]} and {unseen_vectors.shape[1]}")
        self.register_buffer("seen_vectors", _normalised(seen_vectors, "seen_vectors"))
        self.register_buffer("unseen_vectors", _normalised(unseen_vectors, "unseen_vectors"))
        self.feature_dim, self.grid, self.heads, self.backend = feature_dim, tuple(grid), heads, backend
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(feature_dim, feature_dim, 2)
            self.bn = GlobalBatchNorm2d(feature_dim, eps=1e-3)
        # The +1 rows are LESA's bias trick: features and hidden units are augmented with a constant 1.
        self.w1 = nn.Parameter(torch.empty(feature_dim + 1, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(hidden_dim + 1, heads))
        self.label_projection = nn.Linear(seen_vectors.shape[1], feature_dim, bias=False)  # W in c_l = W v_l
        for weight in (self.w1, self.w2):
            nn.init.xavier_uniform_(weight)
        nn.init.xavier_uniform_(self.label_projection.weight)

    def vectors(self, label_set: str) -> Tensor:
        if label_set == "seen":
            return self.seen_vectors
        if label_set == "unseen":
            return self.unseen_vectors
        if label_set == "all":
            return torch.cat([self.unseen_vectors, self.seen_vectors])
        raise ValueError(f"LESA: label_set must be one of {LABEL_SETS}, got {label_set!r}")

    def region_features(self, features: Tensor) -> Tensor:
        B, R, D = features.shape
        if not self.use_conv:
            return features
        h, w = self.grid
        if self._cpp_kernel(features, "LESA conv"):
            # Our Winograd conv reads the [B, R, D] features as the channels-last map and writes channels-last rows.
            rows = conv2x2_same(features.view(B, h, w, D), self.conv.weight, self.conv.bias, backend="cpp")
            rows = rows.reshape(B * R, D)
        else:
            # TF 'SAME' padding of a 2x2 kernel: one zero row and column after the map.
            conv = self.conv(F.pad(features.transpose(1, 2).reshape(B, D, h, w), (0, 1, 0, 1)))
            rows = conv.permute(0, 2, 3, 1).reshape(B * R, D)
        if self._fused_batch_norm_relu(rows):
            # Batch norm and ReLU as one op on the region rows, the running statistics updated as nn.BatchNorm2d
            # updates them.
            fused = batch_norm_relu(rows, self.bn.weight, self.bn.bias, self.bn.eps, backend="cpp")
            self._update_running_stats(fused.mean, fused.var, B * R)
            return fused.out.view(B, R, D)
        maps = F.relu(self.bn(rows.view(B, h, w, D).permute(0, 3, 1, 2)))
        return maps.permute(0, 2, 3, 1).reshape(B, R, D)

    def _cpp_kernel(self, x: Tensor, op: str) -> bool:
        """Whether this model's backend resolves to the cpp kernels for x (float32/float64)."""
        if x.dtype not in (torch.float32, torch.float64):
            return False
        if x.device.type != "cpu" and (self.backend or default_backend()) == "auto":
            return False  # off the CPU, nn.Conv2d and BatchNorm2d are the device's own kernels: no fallback warning
        return resolve_backend(self.backend, x.device, op, implemented=("reference", "cpp")) == "cpp"

    def _fused_batch_norm_relu(self, rows: Tensor) -> bool:
        """Whether the fused batch norm + ReLU op computes this batch of region rows [B R, D]: training on one process
        with the cpp backend. Otherwise (evaluation, reference backend, DDP's global statistics) BatchNorm2d and ReLU
        do."""
        if not (self.training and self.bn.affine and self.bn.track_running_stats and world_size() == 1):
            return False
        return rows.shape[0] >= 2 and self._cpp_kernel(rows, "LESA batch norm")

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: int) -> None:
        bn = self.bn
        bn.num_batches_tracked.add_(1)
        factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
        bn.running_var.lerp_((var * (count / (count - 1))).to(bn.running_var.dtype), factor)  # unbiased, as torch

    def forward(self, features: Tensor, label_set: str = "seen") -> LESAOutput:
        if features.dim() != 3 or features.shape[2] != self.feature_dim or \
                features.shape[1] != self.grid[0] * self.grid[1]:
            raise ValueError(f"LESA: features must be [B, {self.grid[0] * self.grid[1]}, {self.feature_dim}] "
                             f"(grid {self.grid}), got {list(features.shape)}")
        regions = self.region_features(features)
        region_sum = regions.sum(1) if regions.requires_grad else None  # only the backward's order needs it here
        classifiers = self.label_projection(self.vectors(label_set))
        attention = shared_multi_attention(regions, self.w1, self.w2, classifiers, backend=self.backend)
        return LESAOutput(attention.scores, attention, regions, classifiers, region_sum)


def distribution_loss(output: LESAOutput, targets: Tensor) -> Tensor:
    """Per-image ``mean_m (sum_{positive l} softmax_m(s_ml))^2`` [B]; only labels positive in the batch are scored."""
    positive = targets > 0
    columns = positive.any(0).nonzero().squeeze(1)
    D = output.classifiers.shape[1]
    head_scores = output.attention.attended[:, :, :D] @ output.classifiers[columns].t()   # [B, M, L+]
    mass = (torch.softmax(head_scores, dim=1) * positive[:, columns].unsqueeze(1)).sum(2)  # [B, M]
    return mass.square().mean(1)


def relevance_loss(output: LESAOutput, targets: Tensor, margin: float = 0.0) -> Tensor:
    """Per-image ``sum_l max(0, margin - (s_l - g_l) y_l)`` with ``g_l`` the global-average-pooling score [B]."""
    # mean_r(F_r) . c_l written as (sum_r F_r . c_l) / R: the same value, but the backward of a sum is a broadcast,
    # while mean's backward materialises a divided [B, R, D] gradient.
    region_sum = output.regions.sum(1) if output.region_sum is None else output.region_sum
    global_scores = (region_sum @ output.classifiers.t()) / output.regions.shape[1]
    return F.relu(margin - (output.scores - global_scores) * targets.to(output.scores.dtype)).sum(1)


def diversity_sum_of_squares(output: LESAOutput) -> Tensor:
    """Per-image squared Frobenius norm of the off-diagonal head Gram matrix of the L2-normalised logits [B]."""
    logits = F.normalize(output.attention.attention_logits, dim=2)
    gram = logits @ logits.transpose(1, 2)
    off_diagonal = gram - torch.diag_embed(torch.diagonal(gram, dim1=1, dim2=2))
    return off_diagonal.square().sum((1, 2))


def lesa_loss(output: LESAOutput, targets: Tensor, weights: LESALossWeights = LESALossWeights(),
              backend: Optional[str] = None) -> Dict[str, Tensor]:
    """The four LESA losses of a batch and their weighted total.

    Under torch.distributed each rank passes its shard of the global batch; the returned ``total`` is scaled so that
    DDP's gradient average equals the gradient of the global batch (see :mod:`pyzsl.models._distributed`). The
    reported parts are this shard's contributions to the global-batch values.
    """
    batch = targets.shape[0]
    ranks = world_size()
    share = batch / global_batch_size(batch, targets.device)    # this rank's fraction of the global batch
    rank = lesa_rank_loss(output.scores, targets, margin=1.0, backend=backend) * share
    distribution = distribution_loss(output, targets).sum() / batch * share
    relevance = relevance_loss(output, targets).sum()
    diversity = all_reduce_sum(diversity_sum_of_squares(output).sum()).sqrt()  # one value for the global batch
    weighted_local = rank + weights.distribution * distribution + weights.relevance * relevance
    total = ranks * weighted_local + weights.diversity * diversity
    return {"total": total, "rank": rank, "distribution": distribution, "relevance": relevance,
            "diversity": diversity / ranks}


class AdaptiveLR:
    """LESA's learning-rate rule (``core/utils.py::LearningRate``).

    Keeps an EMA (weight ``signal_strength`` on the new value, starting from 0) of a validation score; when the EMA
    falls, the LR is at least ``limit_scale`` times its start and the patience counter has run out, the LR is
    multiplied by ``decay_rate`` and the counter restarts at ``patience``. The counter drops by one every call.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, signal_strength: float = 0.3,
                 patience: int = 2, decay_rate: float = 0.8, limit_scale: float = 1e-3):
        self.optimizer, self.lr, self.signal_strength = optimizer, lr, signal_strength
        self.patience, self.decay_rate, self.limit = patience, decay_rate, lr * limit_scale
        self.ema = 0.0
        self.counter = 0
        self._apply()

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def step(self, score: float) -> float:
        previous = self.ema
        self.ema = self.ema * (1 - self.signal_strength) + score * self.signal_strength
        if self.ema < previous and self.lr >= self.limit and self.counter <= 0:
            self.lr *= self.decay_rate
            self.counter = self.patience
            self._apply()
        self.counter -= 1
        return self.lr

    def state_dict(self) -> Dict[str, float]:
        return {"lr": self.lr, "ema": self.ema, "counter": self.counter}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.lr, self.ema, self.counter = state["lr"], state["ema"], state["counter"]
        self._apply()


class TFRMSprop(torch.optim.Optimizer):
    """RMSProp with TensorFlow 1 semantics, as LESA trains (decay 0.9, momentum 0.9, epsilon 1.0).

    Differs from ``torch.optim.RMSprop``: the mean square starts at 1, epsilon sits inside the square root, and the LR
    multiplies the momentum input: ``ms = d ms + (1 - d) g^2; mom = m mom + lr g / sqrt(ms + eps); p -= mom``.
    With epsilon 1.0 the two rules give very different steps, so the published behaviour needs this one.
    """

    def __init__(self, params, lr: float = 1e-3, decay: float = 0.9, momentum: float = 0.9, eps: float = 1.0):
        for name, value in (("lr", lr), ("eps", eps)):
            if not value > 0:
                raise ValueError(f"TFRMSprop: {name} must be > 0, got {value}")
        super().__init__(params, dict(lr=lr, decay=decay, momentum=momentum, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p].update(ms=torch.ones_like(p), mom=torch.zeros_like(p))
            grads = [p.grad for p in params]
            ms = [self.state[p]["ms"] for p in params]
            mom = [self.state[p]["mom"] for p in params]
            # multi-tensor updates: one pass per operation over all parameters
            torch._foreach_mul_(ms, group["decay"])
            torch._foreach_addcmul_(ms, grads, grads, value=1 - group["decay"])
            denominators = torch._foreach_add(ms, group["eps"])
            torch._foreach_sqrt_(denominators)
            torch._foreach_mul_(mom, group["momentum"])
            torch._foreach_addcdiv_(mom, grads, denominators, value=group["lr"])
            torch._foreach_sub_(params, mom)
        return loss
