// CPU kernels of head_max_scores: per label block, one library GEMM [B*M, D] x [D, block] and a max over heads, so
// only [B, M, block] scores exist at a time (O(B*L + B*M*block) memory instead of O(B*M*L)). The backward routes each
// score's gradient to its arg-max head, block by block, with the same GEMMs transposed.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"

namespace pyzsl {
namespace {

constexpr int64_t kLabelBlock = 512;

void check_head_max_inputs(const at::Tensor& attended, const at::Tensor& classifiers, const char* op) {
  TORCH_CHECK_VALUE(attended.dim() == 3, op, ": attended must be [B, M, D], got ", attended.sizes());
  TORCH_CHECK_VALUE(classifiers.dim() == 2, op, ": classifiers must be [L, D], got ", classifiers.sizes());
  TORCH_CHECK_VALUE(attended.size(2) == classifiers.size(1), op, ": attended has D = ", attended.size(2),
                    " but classifiers has D = ", classifiers.size(1));
  TORCH_CHECK_VALUE(attended.size(1) >= 1, op, ": attended needs at least one head, got M = 0");
  TORCH_CHECK_VALUE(attended.scalar_type() == classifiers.scalar_type(), op, ": attended is ",
                    attended.scalar_type(), " but classifiers is ", classifiers.scalar_type());
  TORCH_CHECK_VALUE(at::isFloatingType(attended.scalar_type()), op, ": inputs must be floating point, got ",
                    attended.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> head_max_scores_cpu(const at::Tensor& attended, const at::Tensor& classifiers) {
  check_head_max_inputs(attended, classifiers, "head_max_scores");
  const int64_t B = attended.size(0), M = attended.size(1), D = attended.size(2), L = classifiers.size(0);
  auto scores = at::empty({B, L}, attended.options());
  auto head = at::empty({B, L}, attended.options().dtype(at::kLong));
  const auto rows = attended.reshape({B * M, D});
  for (int64_t l0 = 0; l0 < L; l0 += kLabelBlock) {
    const int64_t width = std::min(kLabelBlock, L - l0);
    const auto block = at::matmul(rows, classifiers.narrow(0, l0, width).t()).view({B, M, width});
    auto [best, best_head] = block.max(/*dim=*/1);  // ties: the lowest head index, as torch.max documents for CPU
    scores.narrow(1, l0, width).copy_(best);
    head.narrow(1, l0, width).copy_(best_head);
  }
  return {scores, head};
}

std::tuple<at::Tensor, at::Tensor> head_max_scores_backward_cpu(const at::Tensor& grad_scores, const at::Tensor& head,
                                                                const at::Tensor& attended,
                                                                const at::Tensor& classifiers) {
  check_head_max_inputs(attended, classifiers, "head_max_scores_backward");
  const int64_t B = attended.size(0), M = attended.size(1), D = attended.size(2), L = classifiers.size(0);
  auto grad_attended = at::zeros({B * M, D}, attended.options());
  auto grad_classifiers = at::empty({L, D}, classifiers.options());
  const auto rows = attended.reshape({B * M, D});
  for (int64_t l0 = 0; l0 < L; l0 += kLabelBlock) {
    const int64_t width = std::min(kLabelBlock, L - l0);
    // routed[b, m, l] = grad[b, l] where m is the arg-max head of (b, l), else 0
    auto routed = at::zeros({B, M, width}, attended.options());
    routed.scatter_(1, head.narrow(1, l0, width).unsqueeze(1), grad_scores.narrow(1, l0, width).unsqueeze(1));
    const auto routed_rows = routed.view({B * M, width});
    const auto block = classifiers.narrow(0, l0, width);
    grad_attended.add_(at::matmul(routed_rows, block));
    grad_classifiers.narrow(0, l0, width).copy_(at::matmul(routed_rows.t(), rows));
  }
  return {grad_attended.view({B, M, D}), grad_classifiers};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyzsl, CPU, m) {
  m.impl("head_max_scores", &head_max_scores_cpu);
  m.impl("_head_max_scores_backward", &head_max_scores_backward_cpu);
}

}  // namespace pyzsl
