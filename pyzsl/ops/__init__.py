"""Differentiable kernels on the training hot paths."""
from . import conv, norm  # LESA's conv block ops; importing registers their autograd and fake kernels
from .attention import RegionAttention, SharedAttention, head_max_scores, region_attention, shared_multi_attention
from .rank_loss import lesa_rank_loss
from .synthesis import feedback_synthesis

__all__ = ["RegionAttention", "SharedAttention", "conv", "feedback_synthesis", "head_max_scores", "lesa_rank_loss",
           "norm", "region_attention", "shared_multi_attention"]
