"""Evaluation: multi-label ZSL (mAP, top-K P/R/F1 under the lesa / sdl / biam protocols) and GZSL accuracy."""
from . import _fake  # noqa: F401  (fake kernels of the C++ ops)
from .evaluator import MultilabelZSLEvaluator
from .functional import (PROTOCOLS, GZSLAccuracy, TopK, empty_cache, gzsl_accuracy, multilabel_average_precision,
                         multilabel_evaluation, multilabel_topk, zsl_accuracy)

__all__ = [
    "PROTOCOLS",
    "GZSLAccuracy",
    "MultilabelZSLEvaluator",
    "TopK",
    "empty_cache",
    "gzsl_accuracy",
    "multilabel_average_precision",
    "multilabel_evaluation",
    "multilabel_topk",
    "zsl_accuracy",
]
