"""Differentiable kernels on the training hot paths."""
from .attention import SharedAttention, head_max_scores, shared_multi_attention
from .rank_loss import lesa_rank_loss
from .synthesis import feedback_synthesis

__all__ = ["SharedAttention", "feedback_synthesis", "head_max_scores", "lesa_rank_loss", "shared_multi_attention"]
