"""Differentiable kernels on the training hot paths (reference + C++ CPU)."""
from .rank_loss import lesa_rank_loss

__all__ = ["lesa_rank_loss"]
