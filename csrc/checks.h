#pragma once
// Shape/dtype checks shared by the device kernels. Value checks (NaN, target range) happen once in Python.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace pyzsl {

inline void check_scores_targets(const at::Tensor& scores, const at::Tensor& targets, const char* op) {
  TORCH_CHECK_VALUE(scores.dim() == 2, op, ": scores must be 2-D [N, L], got ", scores.dim(), "-D");
  TORCH_CHECK_VALUE(at::isFloatingType(scores.scalar_type()), op, ": scores must be floating point, got ",
                    scores.scalar_type());
  TORCH_CHECK_VALUE(targets.scalar_type() == at::kChar, op, ": targets must be int8, got ", targets.scalar_type());
  TORCH_CHECK_VALUE(targets.sizes() == scores.sizes(), op, ": targets shape ", targets.sizes(),
                    " differs from scores shape ", scores.sizes());
  TORCH_CHECK_VALUE(targets.device() == scores.device(), op, ": targets on ", targets.device(), " but scores on ",
                    scores.device());
}

inline void check_row_mask(const std::optional<at::Tensor>& row_mask, const at::Tensor& scores, const char* op) {
  if (!row_mask.has_value()) return;
  TORCH_CHECK_VALUE(row_mask->scalar_type() == at::kBool && row_mask->dim() == 1 &&
                        row_mask->size(0) == scores.size(0),
                    op, ": row_mask must be bool [", scores.size(0), "], got ", row_mask->scalar_type(), " ",
                    row_mask->sizes());
  TORCH_CHECK_VALUE(row_mask->device() == scores.device(), op, ": row_mask on ", row_mask->device(),
                    " but scores on ", scores.device());
}

}  // namespace pyzsl
