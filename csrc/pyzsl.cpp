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

int64_t empty_cache();  // csrc/cpu/metrics_cpu.cpp

TORCH_LIBRARY(pyzsl, m) {
  m.def("_build_info() -> str", &build_info);
  // Frees the workspace the CPU evaluation kernels keep between calls; returns its size in bytes.
  m.def("_empty_cache() -> int", &empty_cache);
  // Per-label average precision (sklearn's definition, ties included) and the positive count of each label.
  // scores [N, L] floating, targets [N, L] int8 in {1, 0, -1}; row_mask [N] bool selects the rows evaluated.
  m.def(
      "multilabel_ap(Tensor scores, Tensor targets, Tensor? row_mask, bool unannotated_is_negative) "
      "-> (Tensor ap, Tensor num_positives)");
  // hits[i, r] = whether the r-th highest-scoring label of row i (ties: lower label index first) is positive;
  // row_positives[i] = number of positive labels of row i.
  m.def("multilabel_topk_hits(Tensor scores, Tensor targets, int k) -> (Tensor hits, Tensor row_positives)");
  // CPU only, for the evaluation: one pass over the rows gives multilabel_topk_hits' outputs, inputs_valid (a bool
  // scalar: every score finite and every target in {-1, 0, 1}) and each label's positive scores as a CSR over labels
  // (float32, or float64 for float64 scores), so that the inputs are not read again to check them or to find the
  // positives. multilabel_ap_given_positives is multilabel_ap with those positives (those of the rows row_mask
  // keeps: all of them when row_mask drops only rows without positive).
  m.def(
      "multilabel_row_scan(Tensor scores, Tensor targets, int k) "
      "-> (Tensor hits, Tensor row_positives, Tensor inputs_valid, Tensor positive_scores, Tensor positive_offsets)");
  m.def(
      "multilabel_ap_given_positives(Tensor scores, Tensor targets, Tensor? row_mask, bool unannotated_is_negative, "
      "Tensor positive_scores, Tensor positive_offsets) -> (Tensor ap, Tensor num_positives)");
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
  // LESA's attention over regions (M heads shared by every label, the append-a-one trick as bias rows):
  // hidden = tanh(features w1[:D] + w1[D]) [B, R, H], attention_logits[b, m, r] = hidden[b, r] . w2[:H, m] + w2[H, m],
  // alpha = softmax over r, attended[b, m] = [sum_r alpha F_r, sum_r alpha] [B, M, D + 1]. hidden and alpha are what
  // the backward needs. The backward's grad_features is None when features_need_grad is false.
  m.def(
      "region_attention(Tensor features, Tensor w1, Tensor w2) "
      "-> (Tensor attended, Tensor attention_logits, Tensor hidden, Tensor alpha)");
  m.def(
      "_region_attention_backward(Tensor grad_attended, Tensor grad_attention_logits, Tensor features, Tensor w1, "
      "Tensor w2, Tensor hidden, Tensor alpha, bool features_need_grad) "
      "-> (Tensor? grad_features, Tensor grad_w1, Tensor grad_w2)");
  // 2x2 convolution with TF 'SAME' padding (one zero row and column after the map) on channels-last maps (LESA's
  // conv): out[b, i, j] = bias + sum_{a, c in {0, 1}} weight[:, :, a, c] x[b, i + a, j + c]. x [B, h, w, C_in],
  // weight [C_out, C_in, 2, 2] (nn.Conv2d's layout), out [B, h, w, C_out]. tiles [9, B ceil(h/2) ceil(w/2), C_in] is
  // the Winograd-transformed input, kept for the weight gradient; grad_x is None when x_needs_grad is false.
  m.def("conv2x2_same(Tensor x, Tensor weight, Tensor bias) -> (Tensor out, Tensor tiles)");
  m.def(
      "_conv2x2_same_backward(Tensor grad_out, Tensor tiles, Tensor weight, bool x_needs_grad) "
      "-> (Tensor? grad_x, Tensor grad_weight, Tensor grad_bias)");
  // Training-mode batch norm + ReLU on channels-last rows x [N, C] (LESA's conv output): out = max(0, (x - mean) /
  // sqrt(var + eps) * weight + bias) with the batch's mean and biased var, returned in float64 for the running stats.
  m.def("batch_norm_relu(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor out, Tensor mean, Tensor var)");
  m.def(
      "_batch_norm_relu_backward(Tensor grad_out, Tensor out, Tensor x, Tensor weight, Tensor mean, Tensor var, "
      "float eps) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  // TF-VAEGAN's synthesis with feedback for N rows (nn.Linear weight layout [out, in], LeakyReLU slope 0.2):
  // x1 = lrelu(gen_fc1([noise, attributes])), h = lrelu(dec_fc1(sigmoid(gen_fc3(x1)))),
  // fb = lrelu(fb_fc2(lrelu(fb_fc1(h)))), out = sigmoid(gen_fc3(x1 + alpha * fb)). Rows go chunk_size at a time.
  // compute_dtype (bf16/fp16) is the GEMM operand and activation type. With keep_activations the activations the
  // backward needs (x1, h, F's hidden f1, fb) are returned, else they are empty.
  m.def(
      "feedback_synthesis(Tensor noise, Tensor attributes, Tensor gen_w1, Tensor gen_b1, Tensor gen_w3, "
      "Tensor gen_b3, Tensor dec_w1, Tensor dec_b1, Tensor fb_w1, Tensor fb_b1, Tensor fb_w2, Tensor fb_b2, "
      "float alpha, int chunk_size, ScalarType? compute_dtype, bool keep_activations) "
      "-> (Tensor out, Tensor x1, Tensor h, Tensor f1, Tensor fb)");
  // Gradients of feedback_synthesis; h is detached, so the decoder gets none.
  m.def(
      "_feedback_synthesis_backward(Tensor grad_out, Tensor out, Tensor x1, Tensor h, Tensor f1, Tensor fb, "
      "Tensor noise, Tensor attributes, Tensor gen_w1, Tensor gen_w3, Tensor fb_w1, Tensor fb_w2, float alpha, "
      "int chunk_size, ScalarType? compute_dtype) -> (Tensor grad_noise, Tensor grad_attributes, "
      "Tensor grad_gen_w1, Tensor grad_gen_b1, Tensor grad_gen_w3, Tensor grad_gen_b3, Tensor grad_fb_w1, "
      "Tensor grad_fb_b1, Tensor grad_fb_w2, Tensor grad_fb_b2)");
}

}  // namespace pyzsl
