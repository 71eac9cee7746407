// CPU kernels of region_attention: LESA's M shared attention heads over the R regions of each image
// (see pyzsl/ops/attention.py), forward and backward.
//
// Forward, over all B*R region rows:
//   hidden = tanh(F w1[:D] + w1[D])           library GEMMs (at::mm_out, no bias) over ~1 MB row chunks, each followed
//                                              by one vectorised pass adding the bias row and applying tanh in place
//                                              while the chunk is still in cache
//   logits = w2[:H]^T hidden^T                 a small library GEMM [M, B R]
//   + w2[H], alpha = softmax over r            one pass per (image, head): bias, layout [B, M, R], max, exp,
//                                              normalisation
//   attended[b, m] = [sum_r alpha F_r, sum_r alpha]        one pass per image (axpy rows while F_b stays in cache)
// The appended-one trick of the published code becomes the bias rows w1[D] and w2[H]: GEMMs with K = D and H, no
// concatenated copies.
//
// Backward saves only hidden (= tanh) and alpha:
//   grad_alpha = gA[:, :, :D] F^T + gA[:, :, D]            one batched library GEMM (K = D)
//   grad_logits = alpha (grad_alpha - sum_r alpha grad_alpha) + incoming logits gradient, written as [M, B R]
//                                                          (one pass per image)
//   grad_w2[:H] = (grad_logits hidden)^T, grad_w2[H] = row sums   (a GEMM with M rows: far cheaper than hidden^T g)
//   per ~1 MB chunk of rows (d_pre never exists for the whole batch):
//   d_pre = (grad_logits^T w2[:H]^T) * (1 - hidden^2)       one fused vectorised pass: the K = M product, the tanh
//                                                          derivative and the w1 bias-row gradient (column sums in
//                                                          fixed row blocks, so the result is deterministic)
//   grad_w1[:D] += F^T d_pre                                library GEMM, accumulated over the chunks
//   grad_F = alpha^T gA[:, :, :D] + d_pre w1[:D]^T          batched GEMM, then per chunk a GEMM accumulating into it;
//                                                          skipped when the features need no gradient
//
// Types: float (vectorised passes, cloned for AVX-512 / AVX2 / baseline) and double (same code, for the tests and
// gradcheck).

// As in synthesis_cpu.cpp: no-trapping-math lets GCC if-convert the selects of tanh so that the loop vectorises. It
// must precede the headers.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "vector_math.h"

namespace pyzsl {
namespace {

constexpr int64_t kRowBlock = 64;  // rows per block of the backward's fused pass (fixed: deterministic sums)

// Branch-free tanh (Cephes tanhf): an odd polynomial below |x| = 0.625, 1 - 2 / (e^{2|x|} + 1) above; within a few
// ulp of std::tanh.
PYZSL_INLINE float tanh_approx(float x) {
  const float a = x < 0.0f ? -x : x;
  const float z = x * x;
  const float small =
      ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z + 1.33314422036e-1f) * z -
       3.33332819422e-1f) * z * x + x;
  const float large = 1.0f - 2.0f / (exp_approx(2.0f * a) + 1.0f);
  const float signed_large = x < 0.0f ? -large : large;
  return a < 0.625f ? small : signed_large;
}

PYZSL_INLINE float tanh_of(float x) { return tanh_approx(x); }
PYZSL_INLINE double tanh_of(double x) { return std::tanh(x); }

// x[r, c] = tanh(x[r, c] + b[c]) in place.
template <typename T>
PYZSL_INLINE void tanh_bias_rows(T* x, const T* __restrict b, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    T* __restrict row = x + r * cols;
    for (int64_t c = 0; c < cols; ++c) row[c] = tanh_of(row[c] + b[c]);
  }
}
PYZSL_CLONES void tanh_bias_f32(float* x, const float* b, int64_t rows, int64_t cols) {
  tanh_bias_rows<float>(x, b, rows, cols);
}
void tanh_bias_f64(double* x, const double* b, int64_t rows, int64_t cols) { tanh_bias_rows<double>(x, b, rows, cols); }

// d[r, h] = (1 - t[r, h]^2) * sum_m g[m, r] w2t[m, h] for the rows of one block (g is [M, rows] with row stride
// g_stride), and colsum[h] = sum_r d[r, h].
template <typename T>
PYZSL_INLINE void tanh_grad_rows(const T* __restrict g, int64_t g_stride, const T* __restrict w2t,
                                     const T* __restrict t, T* __restrict d, T* __restrict colsum, int64_t rows,
                                     int64_t M, int64_t H) {
  for (int64_t h = 0; h < H; ++h) colsum[h] = T(0);
  for (int64_t r = 0; r < rows; ++r) {
    const T* tr = t + r * H;
    T* dr = d + r * H;
    for (int64_t h = 0; h < H; ++h) dr[h] = T(0);
    for (int64_t m = 0; m < M; ++m) {
      const T gm = g[m * g_stride + r];
      const T* wm = w2t + m * H;
      for (int64_t h = 0; h < H; ++h) dr[h] += gm * wm[h];
    }
    for (int64_t h = 0; h < H; ++h) {
      const T v = dr[h] * (T(1) - tr[h] * tr[h]);
      dr[h] = v;
      colsum[h] += v;
    }
  }
}
PYZSL_CLONES void tanh_grad_f32(const float* g, int64_t g_stride, const float* w2t, const float* t, float* d,
                                    float* colsum, int64_t rows, int64_t M, int64_t H) {
  tanh_grad_rows<float>(g, g_stride, w2t, t, d, colsum, rows, M, H);
}
PYZSL_CLONES void tanh_grad_f64(const double* g, int64_t g_stride, const double* w2t, const double* t, double* d,
                                    double* colsum, int64_t rows, int64_t M, int64_t H) {
  tanh_grad_rows<double>(g, g_stride, w2t, t, d, colsum, rows, M, H);
}

// out[d] += a * x[d]
template <typename T>
PYZSL_INLINE void axpy(T* __restrict out, const T* __restrict x, T a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] += a * x[i];
}
PYZSL_CLONES void axpy_f32(float* out, const float* x, float a, int64_t n) { axpy<float>(out, x, a, n); }
PYZSL_CLONES void axpy_f64(double* out, const double* x, double a, int64_t n) { axpy<double>(out, x, a, n); }

PYZSL_INLINE void tanh_bias(float* x, const float* b, int64_t rows, int64_t cols) { tanh_bias_f32(x, b, rows, cols); }
PYZSL_INLINE void tanh_bias(double* x, const double* b, int64_t rows, int64_t cols) {
  tanh_bias_f64(x, b, rows, cols);
}
PYZSL_INLINE void tanh_grad(const float* g, int64_t g_stride, const float* w2t, const float* t, float* d,
                                float* colsum, int64_t rows, int64_t M, int64_t H) {
  tanh_grad_f32(g, g_stride, w2t, t, d, colsum, rows, M, H);
}
PYZSL_INLINE void tanh_grad(const double* g, int64_t g_stride, const double* w2t, const double* t, double* d,
                                double* colsum, int64_t rows, int64_t M, int64_t H) {
  tanh_grad_f64(g, g_stride, w2t, t, d, colsum, rows, M, H);
}
PYZSL_INLINE void axpy_any(float* out, const float* x, float a, int64_t n) { axpy_f32(out, x, a, n); }
PYZSL_INLINE void axpy_any(double* out, const double* x, double a, int64_t n) { axpy_f64(out, x, a, n); }

void check_region_attention_inputs(const at::Tensor& features, const at::Tensor& w1, const at::Tensor& w2,
                                   const char* op) {
  TORCH_CHECK_VALUE(features.dim() == 3, op, ": features must be [B, R, D], got ", features.sizes());
  TORCH_CHECK_VALUE(w1.dim() == 2 && w1.size(0) == features.size(2) + 1, op, ": w1 must be [D + 1, H] = [",
                    features.size(2) + 1, ", H] for features ", features.sizes(), ", got ", w1.sizes());
  TORCH_CHECK_VALUE(w2.dim() == 2 && w2.size(0) == w1.size(1) + 1, op, ": w2 must be [H + 1, M] = [",
                    w1.size(1) + 1, ", M] for w1 ", w1.sizes(), ", got ", w2.sizes());
  TORCH_CHECK_VALUE(w2.size(1) >= 1, op, ": w2 needs at least one head, got M = 0");
  TORCH_CHECK_VALUE(features.size(1) >= 1, op, ": features needs at least one region, got R = 0");
  const auto dtype = features.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble, op, ": features must be float32 or float64, got ",
                    dtype);
  TORCH_CHECK_VALUE(w1.scalar_type() == dtype && w2.scalar_type() == dtype, op, ": features, w1 and w2 must share a ",
                    "dtype, got ", dtype, ", ", w1.scalar_type(), " and ", w2.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> region_attention_cpu(const at::Tensor& features_in,
                                                                                const at::Tensor& w1_in,
                                                                                const at::Tensor& w2_in) {
  check_region_attention_inputs(features_in, w1_in, w2_in, "region_attention");
  const auto features = features_in.contiguous();
  const auto w1 = w1_in.contiguous();
  const auto w2 = w2_in.contiguous();
  const int64_t B = features.size(0), R = features.size(1), D = features.size(2);
  const int64_t H = w1.size(1), M = w2.size(1);
  const auto options = features.options();
  auto logits = at::empty({B, M, R}, options);
  auto alpha = at::empty({B, M, R}, options);
  auto attended = at::empty({B, M, D + 1}, options);
  if (B == 0) return {attended, logits, at::empty({B, R, H}, options), alpha};
  const auto rows = features.view({B * R, D});
  // Row chunks of about 1 MB: each chunk's GEMM output is still in cache when the bias + tanh pass runs over it.
  auto hidden = at::empty({B, R, H}, options);
  auto hidden2d = hidden.view({B * R, H});
  const int64_t chunk = std::max<int64_t>(64, (1 << 18) / std::max<int64_t>(H, 1));
  for (int64_t r0 = 0; r0 < B * R; r0 += chunk) {
    const int64_t n = std::min(chunk, B * R - r0);
    auto out = hidden2d.narrow(0, r0, n);
    at::mm_out(out, rows.narrow(0, r0, n), w1.narrow(0, 0, D));
    AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "region_attention_tanh", [&] {
      using T = scalar_t;
      T* h = out.mutable_data_ptr<T>();
      const T* b1 = w1.const_data_ptr<T>() + D * H;
      at::parallel_for(0, n, grain_rows(H), [&](int64_t i0, int64_t i1) { tanh_bias(h + i0 * H, b1, i1 - i0, H); });
    });
  }
  // [M, B R] (w2^T hidden^T: with the M-wide side as the GEMM's rows this runs several times faster than
  // hidden w2), before the heads' bias; each (image, head) is then a contiguous run of R logits.
  const auto logits_t = at::mm(w2.narrow(0, 0, H).t(), hidden2d.t());
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "region_attention_cpu", [&] {
    using T = scalar_t;
    const T* lt = logits_t.const_data_ptr<T>();
    const T* b2 = w2.const_data_ptr<T>() + H * M;
    T* lg = logits.mutable_data_ptr<T>();
    T* al = alpha.mutable_data_ptr<T>();
    const T* f = features.const_data_ptr<T>();
    T* at_out = attended.mutable_data_ptr<T>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1_) {
      for (int64_t b = b0; b < b1_; ++b) {
        for (int64_t m = 0; m < M; ++m) {
          const T* src = lt + m * B * R + b * R;
          const T bias = b2[m];
          T* l = lg + (b * M + m) * R;
          T* a = al + (b * M + m) * R;
          T top = -std::numeric_limits<T>::infinity();
          for (int64_t r = 0; r < R; ++r) {
            l[r] = src[r] + bias;
            top = std::max(top, l[r]);
          }
          double sum = 0;  // reductions over the regions accumulate in double
          for (int64_t r = 0; r < R; ++r) {
            a[r] = std::exp(l[r] - top);
            sum += a[r];
          }
          const T inv = static_cast<T>(1.0 / sum);
          T* out = at_out + (b * M + m) * (D + 1);
          std::fill(out, out + D, T(0));
          double total = 0;
          for (int64_t r = 0; r < R; ++r) {
            a[r] *= inv;
            total += a[r];
            axpy_any(out, f + (b * R + r) * D, a[r], D);
          }
          out[D] = static_cast<T>(total);
        }
      }
    });
  });
  return {attended, logits, hidden, alpha};
}

std::tuple<std::optional<at::Tensor>, at::Tensor, at::Tensor> region_attention_backward_cpu(
    const at::Tensor& grad_attended_in, const at::Tensor& grad_logits_in, const at::Tensor& features_in,
    const at::Tensor& w1_in, const at::Tensor& w2_in, const at::Tensor& hidden_in, const at::Tensor& alpha_in,
    bool features_need_grad) {
  check_region_attention_inputs(features_in, w1_in, w2_in, "region_attention_backward");
  const auto features = features_in.contiguous();
  const auto w1 = w1_in.contiguous();
  const auto w2 = w2_in.contiguous();
  const auto hidden = hidden_in.contiguous();
  const auto alpha = alpha_in.contiguous();
  const auto grad_attended = grad_attended_in.contiguous();
  const auto grad_logits = grad_logits_in.contiguous();
  const int64_t B = features.size(0), R = features.size(1), D = features.size(2);
  const int64_t H = w1.size(1), M = w2.size(1);
  TORCH_CHECK_VALUE(grad_attended.sizes() == at::IntArrayRef({B, M, D + 1}), "region_attention_backward: ",
                    "grad_attended must be [B, M, D + 1], got ", grad_attended.sizes());
  TORCH_CHECK_VALUE(grad_logits.sizes() == at::IntArrayRef({B, M, R}) && alpha.sizes() == grad_logits.sizes(),
                    "region_attention_backward: grad_attention_logits and alpha must be [B, M, R], got ",
                    grad_logits.sizes(), " and ", alpha.sizes());
  TORCH_CHECK_VALUE(hidden.sizes() == at::IntArrayRef({B, R, H}), "region_attention_backward: hidden must be ",
                    "[B, R, H], got ", hidden.sizes());
  const auto options = features.options();
  auto grad_w1 = at::empty({D + 1, H}, options);
  auto grad_w2 = at::empty({H + 1, M}, options);
  if (B == 0) {
    std::optional<at::Tensor> none;
    return {features_need_grad ? std::optional<at::Tensor>(at::zeros_like(features)) : none, grad_w1.zero_(),
            grad_w2.zero_()};
  }
  const auto gA = grad_attended.narrow(2, 0, D);
  const auto grad_alpha = at::bmm(gA, features.transpose(1, 2));  // [B, M, R]; the ones column is added below
  auto glT = at::empty({M, B * R}, options);                       // grad of the logits, [M, B R]
  const int64_t blocks = (B * R + kRowBlock - 1) / kRowBlock;
  auto colsums = at::empty({blocks, H}, options);
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "region_attention_backward_cpu", [&] {
    using T = scalar_t;
    const T* ga = grad_alpha.const_data_ptr<T>();
    const T* gAp = grad_attended.const_data_ptr<T>();
    const T* gl = grad_logits.const_data_ptr<T>();
    const T* al = alpha.const_data_ptr<T>();
    T* g = glT.mutable_data_ptr<T>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t m = 0; m < M; ++m) {
          const int64_t base = (b * M + m) * R;
          const T ones = gAp[(b * M + m) * (D + 1) + D];  // gradient of the appended-one feature
          double dot = 0;  // in double, as the forward's sums
          for (int64_t r = 0; r < R; ++r) dot += static_cast<double>(al[base + r]) * (ga[base + r] + ones);
          for (int64_t r = 0; r < R; ++r) {
            g[m * B * R + b * R + r] = al[base + r] * ((ga[base + r] + ones) - static_cast<T>(dot)) + gl[base + r];
          }
        }
      }
    });
  });
  auto grad_b1 = grad_w1.select(0, D);
  auto grad_w1_rows = grad_w1.narrow(0, 0, D);
  auto grad_b2 = grad_w2.select(0, H);
  auto grad_w2_rows = grad_w2.narrow(0, 0, H);
  grad_w2_rows.copy_(at::mm(glT, hidden.view({B * R, H})).t());  // grad_logits^T hidden: [M, H], M-wide rows
  at::sum_out(grad_b2, glT, {1});
  const auto rows = features.view({B * R, D});
  const auto w1t = w1.narrow(0, 0, D).t();
  std::optional<at::Tensor> grad_features;  // None when the features need no gradient: two GEMMs saved
  at::Tensor grad_rows;
  if (features_need_grad) {
    grad_features = at::bmm(alpha.transpose(1, 2), gA);  // [B, R, D]; d_pre w1[:D]^T is added chunk by chunk
    grad_rows = grad_features->view({B * R, D});
  }
  // d_pre goes ~1 MB of rows at a time (a whole number of row blocks): each chunk feeds the two GEMMs while it is
  // in cache, and d_pre never exists for the whole batch.
  const int64_t chunk = kRowBlock * std::max<int64_t>(1, ((1 << 18) / std::max<int64_t>(H, 1)) / kRowBlock);
  auto d_pre = at::empty({std::min(chunk, B * R), H}, options);
  const auto w2t = w2.narrow(0, 0, H).t().contiguous();  // [M, H]
  grad_w1_rows.zero_();
  for (int64_t c0 = 0; c0 < B * R; c0 += chunk) {
    const int64_t n = std::min(chunk, B * R - c0);
    auto d_chunk = d_pre.narrow(0, 0, n);
    AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "region_attention_backward_tanh", [&] {
      using T = scalar_t;
      const T* g = glT.const_data_ptr<T>();
      const T* w2tp = w2t.const_data_ptr<T>();
      const T* t = hidden.const_data_ptr<T>();
      T* d = d_chunk.mutable_data_ptr<T>();
      T* cs = colsums.mutable_data_ptr<T>();
      const int64_t k_first = c0 / kRowBlock, k_last = (c0 + n + kRowBlock - 1) / kRowBlock;
      at::parallel_for(k_first, k_last, 1, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t r0 = k * kRowBlock, m = std::min(kRowBlock, c0 + n - r0);
          tanh_grad(g + r0, B * R, w2tp, t + r0 * H, d + (r0 - c0) * H, cs + k * H, m, M, H);
        }
      });
    });
    grad_w1_rows.addmm_(rows.narrow(0, c0, n).t(), d_chunk);
    if (features_need_grad) grad_rows.narrow(0, c0, n).addmm_(d_chunk, w1t);
  }
  at::sum_out(grad_b1, colsums, {0});  // fixed block order: deterministic
  return {grad_features, grad_w1, grad_w2};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyzsl, CPU, m) {
  m.impl("region_attention", &region_attention_cpu);
  m.impl("_region_attention_backward", &region_attention_backward_cpu);
}

}  // namespace pyzsl
