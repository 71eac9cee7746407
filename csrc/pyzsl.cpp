// Operator schemas of the pyzsl library. Kernels register themselves per device in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; fake (meta) kernels and autograd live in Python.
#include <torch/library.h>

#include <string>

// The build passes the architectures as a bare token (e.g. 80_90) because quoting differs between build tools.
#define PYZSL_STRINGIFY_(x) #x
#define PYZSL_STRINGIFY(x) PYZSL_STRINGIFY_(x)
#ifdef PYZSL_CUDA_ARCHS_TOKEN
#define PYZSL_CUDA_ARCHS PYZSL_STRINGIFY(PYZSL_CUDA_ARCHS_TOKEN)
#else
#define PYZSL_CUDA_ARCHS ""
#endif

namespace pyzsl {

// What this binary was built with, read by `python -m pyzsl.info` and the backend dispatcher.
std::string build_info() {
  std::string info = "cpu=1";
#ifdef PYZSL_WITH_CUDA
  info += ";cuda=1;cuda_archs=" PYZSL_CUDA_ARCHS;
#else
  info += ";cuda=0;cuda_archs=";
#endif
#ifdef _OPENMP
  info += ";openmp=1";
#else
  info += ";openmp=0";
#endif
  return info;
}

TORCH_LIBRARY(pyzsl, m) {
  m.def("_build_info() -> str", &build_info);
  // Per-label average precision (sklearn's definition, ties included) and the positive count of each label.
  // scores [N, L] floating, targets [N, L] int8 in {1, 0, -1}; row_mask [N] bool selects the rows evaluated.
  m.def(
      "multilabel_ap(Tensor scores, Tensor targets, Tensor? row_mask, bool unannotated_is_negative) "
      "-> (Tensor ap, Tensor num_positives)");
  // hits[i, r] = whether the r-th highest-scoring label of row i (ties: lower label index first) is positive;
  // row_positives[i] = number of positive labels of row i.
  m.def("multilabel_topk_hits(Tensor scores, Tensor targets, int k) -> (Tensor hits, Tensor row_positives)");
  // LESA's ranking loss: mean over images of sum over (positive p, negative n) pairs of max(0, margin + s_n - s_p),
  // divided by the image's number of violating pairs (+1e-8); unannotated (0) entries take no part.
  m.def("lesa_rank_loss(Tensor scores, Tensor targets, float margin) -> Tensor");
  m.def("_lesa_rank_loss_backward(Tensor grad, Tensor scores, Tensor targets, float margin) -> Tensor");
  // LESA's label scores from shared attention heads: scores[b, l] = max_m attended[b, m] . classifiers[l], with the
  // arg-max head kept for the backward; [B, M, L] is never formed for the whole label set.
  m.def("head_max_scores(Tensor attended, Tensor classifiers) -> (Tensor scores, Tensor head)");
  m.def(
      "_head_max_scores_backward(Tensor grad_scores, Tensor head, Tensor attended, Tensor classifiers) "
      "-> (Tensor grad_attended, Tensor grad_classifiers)");
}

}  // namespace pyzsl
