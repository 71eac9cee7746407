"""Stateful multi-label ZSL/GZSL evaluation over batches, across torch.distributed ranks."""
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .._backend import BACKENDS, resolve_backend
from .._checks import check_index_list, check_positive_int, check_tensor
from .functional import PROTOCOLS, _check_multilabel, _evaluate


def _all_gather_rows(x: Tensor, group) -> Tensor:
    """Concatenates the rows of ``x`` from every rank (rank order); ranks may hold different row counts."""
    world = dist.get_world_size(group)
    count = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in counts]
    padded = x.new_zeros((max(counts),) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded, group=group)
    return torch.cat([piece[:c] for piece, c in zip(pieces, counts)])


class MultilabelZSLEvaluator:
    """Accumulates scores and targets over the full label set, then reports ZSL and GZSL metrics.

    Args:
        unseen: column indices of the unseen labels (the ZSL label set).
        seen: column indices of the seen labels; when given, GZSL metrics over ``unseen + seen`` are reported too.
        ks: the K of the top-K precision/recall/F1.
        protocol: ``"lesa"``, ``"sdl"`` or ``"biam"`` (see :mod:`pyzsl.metrics.functional`).
        backend: kernel backend, as in the functional API.
        process_group: under torch.distributed, ``compute()`` gathers every rank's rows (default: the world group).

    ``compute()`` returns ``{"zsl/mAP": ..., "zsl/P@3": ..., "zsl/R@3": ..., "zsl/F1@3": ..., "gzsl/mAP": ...}``.
    Columns of the GZSL set keep their order in the score matrix, which decides top-K ties.
    """

    def __init__(
        self,
        *,
        unseen: Sequence[int],
        seen: Optional[Sequence[int]] = None,
        ks: Sequence[int] = (3, 5),
        protocol: str = "lesa",
        backend: Optional[str] = None,
        process_group=None,
    ):
        if protocol not in PROTOCOLS:
            raise ValueError(f"MultilabelZSLEvaluator: protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
        self.ks = [check_positive_int(k, "ks", "MultilabelZSLEvaluator") for k in ks]
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"MultilabelZSLEvaluator: backend must be one of {BACKENDS}, got {backend!r}")
        self._unseen = unseen
        self._seen = seen
        self.protocol = protocol
        self.backend = backend
        self.process_group = process_group
        self.num_labels: Optional[int] = None
        self.subsets: Dict[str, Tensor] = {}
        self.reset()

    def reset(self) -> None:
        self._scores: List[Tensor] = []
        self._targets: List[Tensor] = []

    def _set_label_count(self, num_labels: int) -> None:
        op = "MultilabelZSLEvaluator"
        unseen = check_index_list(self._unseen, num_labels, "unseen", op)
        self.subsets = {"zsl": unseen.sort().values}  # matrix order, like GZSL: it decides top-K ties
        if self._seen is not None:
            seen = check_index_list(self._seen, num_labels, "seen", op)
            if bool(torch.isin(seen, unseen).any()):
                raise ValueError(f"{op}: seen and unseen share label indices")
            self.subsets["gzsl"] = torch.cat([unseen, seen]).sort().values
        self.num_labels = num_labels

    def update(self, scores: Tensor, targets: Tensor) -> None:
        """Adds a batch: ``scores`` [B, L] and ``targets`` [B, L] over the full label set (1 / 0 / -1)."""
        op = "MultilabelZSLEvaluator.update"
        check_tensor(scores, "scores", op)
        if self.num_labels is None:
            if scores.dim() != 2:
                raise ValueError(f"{op}: scores must be 2-D [B, L], got shape {list(scores.shape)}")
            self._set_label_count(scores.shape[1])
        elif scores.dim() != 2 or scores.shape[1] != self.num_labels:
            raise ValueError(f"{op}: scores must be [B, {self.num_labels}] like the earlier batches, got "
                             f"{list(scores.shape)}")
        scores, targets = _check_multilabel(scores, targets, op)
        self._scores.append(scores.detach())
        self._targets.append(targets)

    def compute(self) -> Dict[str, float]:
        if self.num_labels is None:
            raise RuntimeError("MultilabelZSLEvaluator.compute: no batch was added with update()")
        scores, targets = torch.cat(self._scores), torch.cat(self._targets)
        if dist.is_available() and dist.is_initialized():
            scores = _all_gather_rows(scores, self.process_group)
            targets = _all_gather_rows(targets, self.process_group)
        results: Dict[str, float] = {}
        for name, columns in self.subsets.items():
            whole = columns.numel() == self.num_labels  # all columns in order: evaluate without a copy
            s = scores if whole else scores[:, columns.to(scores.device)]
            t = targets if whole else targets[:, columns.to(targets.device)]
            # update() validated every batch: evaluate without scanning the scores again
            metrics = _evaluate(s, t, self.ks, PROTOCOLS[self.protocol],
                                resolve_backend(self.backend, s.device, "MultilabelZSLEvaluator.compute"))
            results.update({f"{name}/{key}": value for key, value in metrics.items()})
        return results
