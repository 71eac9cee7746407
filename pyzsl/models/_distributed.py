"""Exact global-batch training under torch.distributed.

DDP averages the gradients of the ranks. A loss is therefore written so that the ranks' losses sum to ``world_size``
times the loss of the whole global batch: per-sample terms are scaled by ``world_size * local / global`` batch size,
and terms that are not sums over samples (batch-norm statistics, LESA's Frobenius diversity norm) reduce across ranks
with an autograd-aware all-reduce. Then N processes with batch B/N step exactly as one process with batch B.
"""
import torch
import torch.distributed as dist
from torch import Tensor, nn

if dist.is_available():
    # DDP imports torch.distributed.nn.functional on first use, whose functions take ``group=group.WORLD`` as a
    # default argument. Imported after init_process_group, that default pins the process group for the life of the
    # interpreter: destroy_process_group then leaves gloo's threads running, and tearing them down during interpreter
    # shutdown can abort the process ("terminate called without an active exception"). Imported here, before any
    # group exists, the default is None.
    import torch.distributed.nn.functional  # noqa: F401


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x; every rank's x feeds every rank's y, so dx = sum over ranks of dy."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over ranks, differentiable (the backward sums the ranks' gradients); identity on one process."""
    if world_size() == 1:
        return tensor
    return _AllReduceSum.apply(tensor)


def global_batch_size(local: int, device: torch.device) -> int:
    if world_size() == 1:
        return local
    count = torch.tensor([local], dtype=torch.int64, device=device)
    dist.all_reduce(count)
    return int(count.item())


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch across ranks (gloo or nccl).

    ``nn.SyncBatchNorm`` does the same on GPUs only; on one process this is exactly ``nn.BatchNorm2d``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        channels = x.shape[1]
        count = x.new_tensor([x.numel() / channels])
        stats = all_reduce_sum(torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), count]))
        total = stats[-1]
        mean = stats[:channels] / total
        var = stats[channels:2 * channels] / total - mean * mean
        with torch.no_grad():
            self.num_batches_tracked += 1
            unbiased = var * (total / (total - 1)).clamp(min=0)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(unbiased.detach(), self.momentum)
        shape = (1, channels, 1, 1)
        normalised = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return normalised * self.weight.view(shape) + self.bias.view(shape)
