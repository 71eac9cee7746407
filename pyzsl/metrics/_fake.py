"""Fake (meta) kernels of the C++ metric ops, so torch.compile, export and opcheck can trace them."""
import torch

from .._backend import cpp_built

if cpp_built():

    @torch.library.register_fake("pyzsl::multilabel_ap")
    def _multilabel_ap_fake(scores, targets, row_mask, unannotated_is_negative):
        torch._check(scores.dim() == 2, lambda: f"scores must be 2-D, got {scores.dim()}-D")
        torch._check(targets.shape == scores.shape, lambda: "targets must have the shape of scores")
        L = scores.shape[1]
        return scores.new_empty(L, dtype=torch.float64), scores.new_empty(L, dtype=torch.int64)

    @torch.library.register_fake("pyzsl::multilabel_topk_hits")
    def _multilabel_topk_hits_fake(scores, targets, k):
        torch._check(scores.dim() == 2, lambda: f"scores must be 2-D, got {scores.dim()}-D")
        torch._check(targets.shape == scores.shape, lambda: "targets must have the shape of scores")
        torch._check(k >= 1, lambda: f"k must be >= 1, got {k}")
        N = scores.shape[0]
        return scores.new_empty(N, k, dtype=torch.bool), scores.new_empty(N, dtype=torch.int64)

    @torch.library.register_fake("pyzsl::multilabel_row_scan")
    def _multilabel_row_scan_fake(scores, targets, k):
        hits, row_positives = _multilabel_topk_hits_fake(scores, targets, k)
        total = torch.library.get_ctx().new_dynamic_size()  # the number of positives depends on the data
        compare = torch.float64 if scores.dtype == torch.float64 else torch.float32
        return (hits, row_positives, scores.new_empty((), dtype=torch.bool), scores.new_empty(total, dtype=compare),
                scores.new_empty(scores.shape[1] + 1, dtype=torch.int64))

    @torch.library.register_fake("pyzsl::multilabel_ap_given_positives")
    def _multilabel_ap_given_positives_fake(scores, targets, row_mask, unannotated_is_negative, positive_scores,
                                            positive_offsets):
        return _multilabel_ap_fake(scores, targets, row_mask, unannotated_is_negative)
