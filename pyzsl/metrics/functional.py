"""Zero-shot evaluation metrics, exact and fast.

Multi-label (LESA, Generative MLZSL, SDL): ``scores`` [N, L] float16/bfloat16/float32/float64 and ``targets`` [N, L]
integer with **1 = positive, -1 = negative, 0 = unannotated**. The evaluated label set is the columns you pass:
slice the unseen columns for ZSL, pass unseen and seen together for GZSL.

Protocols (the published numbers differ on these switches; each is named after the code it reproduces):

============  ==========================================  ===================  ===========================
protocol      images with no positive among the labels     unannotated (0)      label with no positive
============  ==========================================  ===================  ===========================
``lesa``      kept (each adds K misses to top-K)           ignored in AP        AP 0, counted in the mean
``sdl``       removed, for AP and top-K                    treated as negative  AP 0, counted in the mean
``biam``      removed, for AP and top-K                    ignored in AP        left out of the mean (NaN)
============  ==========================================  ===================  ===========================

AP of a label is exactly ``sklearn.metrics.average_precision_score`` over its annotated rows, ties included:
``AP_j = (1/P_j) * sum over positives k of pos(>= s_kj) / annotated(>= s_kj)``.
Top-K is the micro ("overall") form: per image the K best labels (ties by the lower label index),
``P = TP / (N*K)``, ``R = TP / #(T = 1)``, ``F1 = 2PR / (P + R)`` over the images the protocol keeps. Zero
denominators give NaN (nothing to measure), except F1 = 0 when P = R = 0.

Single-label (GZSL): per-class mean top-1 accuracy; ``H = 2SU / (S + U)``.
"""
from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._backend import cpp_built, resolve_backend
from .._checks import (check_finite, check_index_list, check_positive_int, check_same_device, check_tensor,
                       check_values_in)
from . import _reference


@dataclass(frozen=True)
class Protocol:
    drop_images_without_positive: bool
    unannotated_is_negative: bool
    labels_without_positive_excluded: bool


PROTOCOLS: Dict[str, Protocol] = {
    "lesa": Protocol(False, False, False),
    "sdl": Protocol(True, True, False),
    "biam": Protocol(True, False, True),
}


class TopK(NamedTuple):
    precision: Tensor
    recall: Tensor
    f1: Tensor


class GZSLAccuracy(NamedTuple):
    seen: Tensor
    unseen: Tensor
    h: Tensor


def _protocol(protocol: str, op: str) -> Protocol:
    if protocol not in PROTOCOLS:
        raise ValueError(f"{op}: protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
    return PROTOCOLS[protocol]


def _check_multilabel(scores, targets, op: str) -> Tuple[Tensor, Tensor]:
    """Validates the pair and returns (scores, targets as int8)."""
    _check_pair(scores, targets, op)
    _check_values(scores, targets, op)
    return scores.detach(), _as_int8(targets)


def _as_int8(targets: Tensor) -> Tensor:
    return targets if targets.dtype == torch.int8 else targets.to(torch.int8)


def _check_pair(scores, targets, op: str) -> None:
    """Types, shapes and devices: every check but the values'."""
    check_tensor(scores, "scores", op)
    check_tensor(targets, "targets", op)
    if scores.dim() != 2:
        raise ValueError(f"{op}: scores must be 2-D [N, L], got shape {list(scores.shape)}")
    if not scores.dtype.is_floating_point:
        raise ValueError(f"{op}: scores must be floating point, got {scores.dtype}")
    if targets.shape != scores.shape:
        raise ValueError(f"{op}: targets must have the shape of scores {list(scores.shape)}, got "
                         f"{list(targets.shape)}")
    check_same_device(targets, scores, "targets", "scores", op)


def _check_values(scores: Tensor, targets: Tensor, op: str) -> None:
    """Targets in {-1, 0, 1} and finite scores; the error names the count and the first offending entry."""
    check_values_in(targets, (-1, 0, 1), "targets", op)
    check_finite(scores, "scores", op)


def _kernels(backend: str):
    """(AP kernel, top-K kernel) of a resolved backend; cpp and cuda share the dispatcher's ops."""
    if backend == "reference":
        return _reference.multilabel_ap, _reference.multilabel_topk_hits
    if backend == "triton":
        from . import _triton
        return _triton.multilabel_ap_triton, _triton.multilabel_topk_hits_triton
    return torch.ops.pyzsl.multilabel_ap, torch.ops.pyzsl.multilabel_topk_hits


def _images_with_positive(targets: Tensor) -> Tensor:
    return (targets == 1).any(dim=1)


def _label_ap(scores, targets, proto: Protocol, backend: str, row_mask: Optional[Tensor],
              positives: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """Per-label AP under ``proto``; NaN marks a label left out of the mean. ``positives``: the (scores, offsets) CSR
    of ``multilabel_row_scan``, which are the positives of the kept rows when row_mask drops only rows without
    positive."""
    if row_mask is not None and bool(row_mask.all()):
        row_mask = None  # every image kept: spare the kernel the mask
    if positives is not None:
        ap, num_positives = torch.ops.pyzsl.multilabel_ap_given_positives(
            scores, targets, row_mask, proto.unannotated_is_negative, *positives)
    else:
        ap, num_positives = _kernels(backend)[0](scores, targets, row_mask, proto.unannotated_is_negative)
    if proto.labels_without_positive_excluded:
        ap = ap.masked_fill(num_positives == 0, float("nan"))
    return ap


def _mean_ap(ap: Tensor, proto: Protocol) -> Tensor:
    return ap.nanmean() if proto.labels_without_positive_excluded else ap.mean()


def _topk_from_hits(hits: Tensor, row_positives: Tensor, ks: Sequence[int], proto: Protocol) -> Dict[int, TopK]:
    """P/R/F1 at each k <= hits.shape[1] from the [N, max k] hits. An image without positive has no hit and adds no
    positive, so dropping it (``proto.drop_images_without_positive``) changes only the number of images the precision
    divides by; no row is gathered (GZSL size, K = 3 and 5: 3.0 -> 0.5 ms)."""
    images = int((row_positives > 0).sum()) if proto.drop_images_without_positive else hits.shape[0]
    hits_within = hits.sum(0, dtype=torch.float64).cumsum(0)  # [r]: hits at ranks 0..r of all images
    positives = row_positives.sum(dtype=torch.float64)
    results = {}
    for k in ks:
        tp = hits_within[k - 1]
        precision = tp / (images * k)
        recall = tp / positives
        denominator = precision + recall
        f1 = torch.where(denominator > 0, 2 * precision * recall / denominator, denominator)
        results[k] = TopK(precision.cpu(), recall.cpu(), f1.cpu())
    return results


def multilabel_average_precision(
    scores: Tensor, targets: Tensor, *, average: str = "macro", protocol: str = "lesa", backend: Optional[str] = None
) -> Tensor:
    """Mean average precision (``average="macro"``) or per-label AP (``"none"``), as a float64 tensor.

    Args:
        scores: [N, L] floating scores, all finite.
        targets: [N, L] integer tensor, 1 = positive, -1 = negative, 0 = unannotated.
        average: ``"macro"`` for the mean over labels, ``"none"`` for the [L] vector.
        protocol: ``"lesa"``, ``"sdl"`` or ``"biam"`` (module docstring). Under ``biam`` a label without positive is
            NaN in the vector and left out of the mean. The mean over zero labels is NaN.
        backend: ``"auto"``, ``"reference"``, ``"cpp"``, ``"triton"`` or ``"cuda"``; default ``$PYZSL_BACKEND`` or auto.
    """
    op = "multilabel_average_precision"
    proto = _protocol(protocol, op)
    if average not in ("macro", "none"):
        raise ValueError(f"{op}: average must be 'macro' or 'none', got {average!r}")
    scores, targets = _check_multilabel(scores, targets, op)
    backend = resolve_backend(backend, scores.device, op)
    row_mask = _images_with_positive(targets) if proto.drop_images_without_positive else None
    ap = _label_ap(scores, targets, proto, backend, row_mask)
    return ap if average == "none" else _mean_ap(ap, proto)


def multilabel_topk(
    scores: Tensor, targets: Tensor, k: int, *, protocol: str = "lesa", backend: Optional[str] = None
) -> TopK:
    """Micro ("overall") precision, recall and F1 of each image's top-``k`` labels, as float64 tensors.

    Ties between scores go to the lower label index. With ``k`` > L an image contributes its L labels but the
    precision still divides by N*k, as in the published code. See the module docstring for the protocols.
    """
    op = "multilabel_topk"
    proto = _protocol(protocol, op)
    k = check_positive_int(k, "k", op)
    scores, targets = _check_multilabel(scores, targets, op)
    backend = resolve_backend(backend, scores.device, op)
    hits, row_positives = _kernels(backend)[1](scores, targets, k)
    return _topk_from_hits(hits, row_positives, [k], proto)[k]


def empty_cache() -> int:
    """Frees the workspace the C++ CPU kernels keep between calls and returns its size in bytes: the AP kernel's tile
    buffers, up to ~64 MiB per thread, kept so that a repeated evaluation need not fault them in again. Later calls
    allocate them anew (as after ``torch.cuda.empty_cache``)."""
    return int(torch.ops.pyzsl._empty_cache()) if cpp_built() else 0


def multilabel_evaluation(
    scores: Tensor,
    targets: Tensor,
    *,
    ks: Sequence[int] = (3, 5),
    protocol: str = "lesa",
    backend: Optional[str] = None,
) -> Dict[str, float]:
    """mAP and P/R/F1 at every K in one validation and one top-K pass: ``{"mAP", "P@3", "R@3", "F1@3", ...}``."""
    op = "multilabel_evaluation"
    proto = _protocol(protocol, op)
    ks = [check_positive_int(k, "ks", op) for k in ks]
    _check_pair(scores, targets, op)
    backend = resolve_backend(backend, scores.device, op)
    # On the C++ CPU backend one pass over the rows does the top-K, checks the values and collects the positives
    # for the AP, which spares three more reads of the inputs (GZSL size: 0.280 -> 0.252 s). Other targets than
    # int8 are checked first all the same: casting them could wrap a bad value.
    scan_rows = bool(ks) and backend == "cpp" and scores.device.type == "cpu" and targets.dtype == torch.int8
    if not scan_rows:
        _check_values(scores, targets, op)
    return _evaluate(scores.detach(), _as_int8(targets), ks, proto, backend, op if scan_rows else None)


def _evaluate(scores: Tensor, targets: Tensor, ks: Sequence[int], proto: Protocol, backend: str,
              scan_rows_for: Optional[str] = None) -> Dict[str, float]:
    """multilabel_evaluation on int8 targets and a resolved backend. The inputs' values are checked already, unless
    ``scan_rows_for`` names the calling op: then ``multilabel_row_scan`` checks them (cpp on CPU, ks not empty)."""
    results: Dict[str, float] = {}
    row_positives = positives = None
    if scan_rows_for is not None:
        hits, row_positives, valid, *positives = torch.ops.pyzsl.multilabel_row_scan(scores, targets, max(ks))
        if not bool(valid):
            _check_values(scores, targets, scan_rows_for)  # raises, naming what is wrong and where
            raise RuntimeError(f"{scan_rows_for}: the row scan found a non-finite score or a target outside "
                               "{-1, 0, 1} that the Python check did not; please report this")
    elif ks:
        hits, row_positives = _kernels(backend)[1](scores, targets, max(ks))
    if ks:
        for k, topk in _topk_from_hits(hits, row_positives, ks, proto).items():
            results.update({f"P@{k}": float(topk.precision), f"R@{k}": float(topk.recall), f"F1@{k}": float(topk.f1)})
    row_mask = None
    if proto.drop_images_without_positive:
        row_mask = row_positives > 0 if row_positives is not None else _images_with_positive(targets)
    return {"mAP": float(_mean_ap(_label_ap(scores, targets, proto, backend, row_mask, positives), proto)), **results}


def _predictions(
    logits_or_preds: Tensor, labels: Tensor, op: str, allowed_columns: Tensor, restrict_argmax: bool
) -> Tensor:
    """Predicted class ids; logits must have a column for every class in ``allowed_columns``."""
    check_tensor(logits_or_preds, "logits_or_preds", op)
    check_tensor(labels, "labels", op)
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{op}: labels must be a 1-D integer tensor, got {labels.dtype} of shape {list(labels.shape)}")
    check_same_device(logits_or_preds, labels, "logits_or_preds", "labels", op)
    if logits_or_preds.dim() == 2 and logits_or_preds.dtype.is_floating_point:
        if logits_or_preds.shape[0] != labels.shape[0]:
            raise ValueError(f"{op}: logits have {logits_or_preds.shape[0]} rows but labels has {labels.shape[0]}")
        check_finite(logits_or_preds, "logits_or_preds", op)
        if allowed_columns.numel() and int(allowed_columns.max()) >= logits_or_preds.shape[1]:
            raise ValueError(f"{op}: class index {int(allowed_columns.max())} is out of range for logits with "
                             f"{logits_or_preds.shape[1]} columns")
        if restrict_argmax:
            columns = allowed_columns.to(logits_or_preds.device)
            return columns[logits_or_preds[:, columns].argmax(dim=1)]
        return logits_or_preds.argmax(dim=1)
    if logits_or_preds.dim() == 1 and not logits_or_preds.dtype.is_floating_point:
        if logits_or_preds.shape != labels.shape:
            raise ValueError(f"{op}: predictions shape {list(logits_or_preds.shape)} differs from labels shape "
                             f"{list(labels.shape)}")
        return logits_or_preds
    raise ValueError(f"{op}: logits_or_preds must be float logits [N, C] or integer predictions [N], got "
                     f"{logits_or_preds.dtype} of shape {list(logits_or_preds.shape)}")


def _class_mean_accuracy(preds: Tensor, labels: Tensor, classes: Tensor) -> Tensor:
    """Mean over ``classes`` present in ``labels`` of each class's top-1 accuracy (absent classes are left out)."""
    num = int(max(int(classes.max()), int(labels.max()), int(preds.max()))) + 1 if classes.numel() else 1
    correct = torch.bincount(labels[preds == labels], minlength=num).double()
    total = torch.bincount(labels, minlength=num).double()
    correct, total = correct[classes], total[classes]
    present = total > 0
    return (correct[present] / total[present]).mean()


def _labels_in(labels: Tensor, classes: Tensor, name: str, op: str) -> None:
    outside = ~torch.isin(labels, classes.to(labels.device))
    if bool(outside.any()):
        first = int(torch.nonzero(outside)[0])
        raise ValueError(f"{op}: {int(outside.sum())} label(s) are not in {name}; the first is {int(labels[first])} "
                         f"at index {first}")


def gzsl_accuracy(
    logits_or_preds: Tensor, labels: Tensor, *, seen_classes: Sequence[int], unseen_classes: Sequence[int]
) -> GZSLAccuracy:
    """Generalized ZSL: per-class mean top-1 accuracy on seen (S) and unseen (U) test samples and ``H = 2SU/(S+U)``.

    ``logits_or_preds`` is either logits [N, C] over all classes (argmax over all of them) or predicted class ids
    [N]. Each sample is scored in the group of its true class; classes without test samples are left out of the
    mean of their group, and a group without samples gives NaN.
    """
    op = "gzsl_accuracy"
    labels = check_tensor(labels, "labels", op)
    num_classes = max([int(labels.max()) + 1 if labels.numel() else 0] + [int(c) + 1 for c in seen_classes]
                      + [int(c) + 1 for c in unseen_classes])
    seen = check_index_list(seen_classes, num_classes, "seen_classes", op)
    unseen = check_index_list(unseen_classes, num_classes, "unseen_classes", op)
    if bool(torch.isin(seen, unseen).any()):
        raise ValueError(f"{op}: seen_classes and unseen_classes overlap at {torch.isin(seen, unseen).nonzero()[0]}")
    preds = _predictions(logits_or_preds, labels, op, torch.cat([seen, unseen]), restrict_argmax=False).cpu().long()
    labels = labels.cpu().long()
    _labels_in(labels, torch.cat([seen, unseen]), "seen_classes or unseen_classes", op)
    is_seen = torch.isin(labels, seen)
    nan = torch.tensor(float("nan"), dtype=torch.float64)  # no image of the set: no accuracy
    s = _class_mean_accuracy(preds[is_seen], labels[is_seen], seen) if bool(is_seen.any()) else nan
    u = _class_mean_accuracy(preds[~is_seen], labels[~is_seen], unseen) if bool((~is_seen).any()) else nan
    h = torch.where(s + u > 0, 2 * s * u / (s + u), s + u)
    return GZSLAccuracy(s, u, h)


def zsl_accuracy(logits_or_preds: Tensor, labels: Tensor, *, unseen_classes: Sequence[int]) -> Tensor:
    """Conventional ZSL: per-class mean top-1 accuracy when the classifier sees only ``unseen_classes``.

    Logits [N, C] are restricted to the ``unseen_classes`` columns before the argmax; predicted ids [N] are taken
    as they are. Every label must be an unseen class.
    """
    op = "zsl_accuracy"
    labels = check_tensor(labels, "labels", op)
    num_classes = max([int(labels.max()) + 1 if labels.numel() else 0] + [int(c) + 1 for c in unseen_classes])
    unseen = check_index_list(unseen_classes, num_classes, "unseen_classes", op)
    preds = _predictions(logits_or_preds, labels, op, unseen, restrict_argmax=True).cpu().long()
    labels = labels.cpu().long()
    _labels_in(labels, unseen, "unseen_classes", op)
    if labels.numel() == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    return _class_mean_accuracy(preds, labels, unseen)

