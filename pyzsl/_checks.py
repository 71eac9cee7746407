"""Input validation shared by the public API: every error names the argument, what was expected and what was found."""
from typing import Sequence

import torch
from torch import Tensor


def check_tensor(value, name: str, op: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_finite(x: Tensor, name: str, op: str) -> None:
    """Raises ValueError with the count and first position of NaN/inf entries.

    One reduction decides the common case: a sum is finite only if every term is (NaN and inf propagate). Only a
    non-finite sum, which overflow can also cause, pays for the element-wise scan.
    """
    if x.numel() == 0:
        return
    total = x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    if torch.isfinite(total):
        return
    bad = ~torch.isfinite(x)
    count = int(bad.sum())
    if count == 0:
        return  # the sum overflowed, every entry is finite
    first = tuple(int(i) for i in torch.nonzero(bad)[0])
    raise ValueError(
        f"{op}: {name} must be finite, found {count} NaN/inf value(s); the first is {x[first].item()} at index "
        f"{list(first)}"
    )


def check_values_in(x: Tensor, allowed: Sequence[int], name: str, op: str) -> None:
    """Raises ValueError naming how many entries of the integer tensor ``x`` are outside ``allowed`` and the first."""
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{op}: {name} must be an integer tensor with values in {set(allowed)}, got dtype {x.dtype}")
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x)
    if int(lo) >= min(allowed) and int(hi) <= max(allowed) and len(allowed) == max(allowed) - min(allowed) + 1:
        return
    bad = ~torch.isin(x, torch.tensor(list(allowed), dtype=x.dtype, device=x.device))
    count = int(bad.sum())
    if count == 0:
        return
    first = tuple(int(i) for i in torch.nonzero(bad)[0])
    raise ValueError(
        f"{op}: {name} must take values in {sorted(allowed)}, found {count} other value(s); the first is "
        f"{x[first].item()} at index {list(first)}"
    )


def check_same_device(a: Tensor, b: Tensor, name_a: str, name_b: str, op: str) -> None:
    if a.device != b.device:
        raise ValueError(f"{op}: {name_a} is on {a.device} but {name_b} is on {b.device}")


def check_positive_int(value, name: str, op: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{op}: {name} must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{op}: {name} must be >= 1, got {value}")
    return value


def check_index_list(indices, size: int, name: str, op: str) -> Tensor:
    """A 1-D int64 tensor of distinct indices in [0, size)."""
    t = torch.as_tensor(indices, dtype=torch.long).flatten() if not isinstance(indices, Tensor) else indices
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() != 1:
        raise ValueError(f"{op}: {name} must be a 1-D sequence of integer indices, got {t.dtype} of shape "
                         f"{list(t.shape)}")
    t = t.long().cpu()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= size):
        raise ValueError(f"{op}: {name} must lie in [0, {size}), got values from {int(t.min())} to {int(t.max())}")
    if t.unique().numel() != t.numel():
        raise ValueError(f"{op}: {name} contains duplicate indices")
    return t


def check_distinct(names: Sequence, what: str, where: str) -> None:
    """``names`` has no repeats; the error names the first repeated value and both positions."""
    first = {}
    for i, name in enumerate(names):
        if name in first:
            raise ValueError(f"{where}: {what} must be distinct, {name!r} appears at positions {first[name]} and {i}")
        first[name] = i
