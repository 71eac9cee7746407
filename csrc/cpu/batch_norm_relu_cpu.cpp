// CPU kernels of batch_norm_relu: training-mode batch norm (batch statistics) followed by ReLU, on channels-last rows
// x [N, C] (LESA's conv output [B, h, w, C] viewed as rows), as one op instead of three (batch norm, ReLU and their
// backwards: five passes over the activations forward and backward instead of eight, and one activation tensor).
//
// Forward: pass 1 sums x and x^2 per channel (double accumulators, fixed row blocks: deterministic), pass 2 writes
// out = max(0, x * scale + shift) with scale = weight / sqrt(var + eps), shift = bias - mean * scale.
// Backward: pass 1 sums g = grad_out * (out > 0) and g * x per channel, pass 2 writes
// grad_x = scale * (g - sum g / N - xhat * sum(g xhat) / N).
// As in synthesis_cpu.cpp: no-trapping-math lets GCC if-convert the ReLU masks so that the loops vectorise.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "vector_math.h"

namespace pyzsl {
namespace {

constexpr int64_t kRows = 256;  // rows per block of the reductions (fixed, so sums do not depend on threads)

// Each pass is a template (double runs it as is: tests and gradcheck) plus a float overload cloned for AVX-512 /
// AVX2 / baseline (PYZSL_CLONES, vector_math.h), which overload resolution prefers for float pointers.

// s1[c] += x, s2[c] += x * x over the rows
template <typename T>
PYZSL_INLINE void sums(const T* __restrict x, double* __restrict s1, double* __restrict s2, int64_t rows, int64_t C) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const double v = xr[c];
      s1[c] += v;
      s2[c] += v * v;
    }
  }
}
PYZSL_CLONES void sums(const float* x, double* s1, double* s2, int64_t rows, int64_t C) {
  sums<float>(x, s1, s2, rows, C);
}

// out = max(0, x * scale[c] + shift[c])
template <typename T>
PYZSL_INLINE void affine_relu(const T* __restrict x, const T* __restrict scale, const T* __restrict shift,
                              T* __restrict out, int64_t rows, int64_t C) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < C; ++c) {
      const T v = x[r * C + c] * scale[c] + shift[c];
      out[r * C + c] = v > T(0) ? v : T(0);
    }
  }
}
PYZSL_CLONES void affine_relu(const float* x, const float* scale, const float* shift, float* out, int64_t rows,
                              int64_t C) {
  affine_relu<float>(x, scale, shift, out, rows, C);
}

// g = grad * (out > 0); sg[c] += g, sgx[c] += g * x
template <typename T>
PYZSL_INLINE void grad_sums(const T* __restrict grad, const T* __restrict out, const T* __restrict x,
                            double* __restrict sg, double* __restrict sgx, int64_t rows, int64_t C) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = r * C + c;
      const T gv = grad[i], ov = out[i];  // both loaded unconditionally: the select then vectorises
      const double g = static_cast<double>(ov > T(0) ? gv : T(0));
      sg[c] += g;
      sgx[c] += g * static_cast<double>(x[i]);
    }
  }
}
PYZSL_CLONES void grad_sums(const float* grad, const float* out, const float* x, double* sg, double* sgx,
                            int64_t rows, int64_t C) {
  grad_sums<float>(grad, out, x, sg, sgx, rows, C);
}

// grad_x = (out > 0 ? grad : 0) * k1[c] + (x - mean[c]) * k2[c] + k3[c]  (the batch-norm backward per channel)
template <typename T>
PYZSL_INLINE void grad_x(const T* __restrict grad, const T* __restrict out, const T* __restrict x,
                         const T* __restrict mean, const T* __restrict k1, const T* __restrict k2,
                         const T* __restrict k3, T* __restrict gx, int64_t rows, int64_t C) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = r * C + c;
      const T gv = grad[i], ov = out[i];
      const T g = ov > T(0) ? gv : T(0);
      gx[i] = g * k1[c] + (x[i] - mean[c]) * k2[c] + k3[c];
    }
  }
}
PYZSL_CLONES void grad_x(const float* grad, const float* out, const float* x, const float* mean, const float* k1,
                         const float* k2, const float* k3, float* gx, int64_t rows, int64_t C) {
  grad_x<float>(grad, out, x, mean, k1, k2, k3, gx, rows, C);
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be [N, C] (channels-last rows), got ", x.sizes());
  TORCH_CHECK_VALUE(x.size(0) >= 2, op, ": batch statistics need at least 2 rows, got N = ", x.size(0));
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == x.size(1) && bias.sizes() == weight.sizes(), op,
                    ": weight and bias must be [C] = [", x.size(1), "], got ", weight.sizes(), " and ", bias.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble, op, ": x must be float32 or float64, got ", dtype);
  TORCH_CHECK_VALUE(weight.scalar_type() == dtype && bias.scalar_type() == dtype, op,
                    ": x, weight and bias must share a dtype");
}

// Per-channel sums over the rows, block by block in parallel, blocks added in order (deterministic).
template <typename F>
std::vector<double> blocked_sums(int64_t N, int64_t C, F&& block_fn) {
  const int64_t blocks = (N + kRows - 1) / kRows;
  std::vector<double> partial(static_cast<size_t>(blocks * 2 * C), 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r0 = k * kRows;
      block_fn(r0, std::min(kRows, N - r0), partial.data() + k * 2 * C, partial.data() + k * 2 * C + C);
    }
  });
  std::vector<double> total(static_cast<size_t>(2 * C), 0.0);
  for (int64_t k = 0; k < blocks; ++k) {
    for (int64_t c = 0; c < 2 * C; ++c) total[c] += partial[k * 2 * C + c];
  }
  return total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                                                   const at::Tensor& bias, double eps) {
  check_inputs(x_in, weight, bias, "batch_norm_relu");
  const auto x = x_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  auto out = at::empty_like(x);
  auto mean = at::empty({C}, x.options().dtype(at::kDouble));
  auto var = at::empty({C}, x.options().dtype(at::kDouble));  // biased, as batch norm normalises with
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_relu_cpu", [&] {
    using T = scalar_t;
    const T* xp = x.const_data_ptr<T>();
    const auto total = blocked_sums(N, C, [&](int64_t r0, int64_t n, double* s1, double* s2) {
      sums(xp + r0 * C, s1, s2, n, C);
    });
    std::vector<T> scale(C), shift(C);
    double* mp = mean.mutable_data_ptr<double>();
    double* vp = var.mutable_data_ptr<double>();
    const T* w = weight.const_data_ptr<T>();
    const T* b = bias.const_data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) {
      const double m = total[c] / N;
      const double v = std::max(total[C + c] / N - m * m, 0.0);
      mp[c] = m;
      vp[c] = v;
      const double s = static_cast<double>(w[c]) / std::sqrt(v + eps);
      scale[c] = static_cast<T>(s);
      shift[c] = static_cast<T>(static_cast<double>(b[c]) - m * s);
    }
    T* op = out.mutable_data_ptr<T>();
    at::parallel_for(0, N, std::max<int64_t>(1, 32768 / C), [&](int64_t r0, int64_t r1) {
      affine_relu(xp + r0 * C, scale.data(), shift.data(), op + r0 * C, r1 - r0, C);
    });
  });
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward_cpu(const at::Tensor& grad_in,
                                                                            const at::Tensor& out_in,
                                                                            const at::Tensor& x_in,
                                                                            const at::Tensor& weight,
                                                                            const at::Tensor& mean,
                                                                            const at::Tensor& var, double eps) {
  check_inputs(x_in, weight, weight, "batch_norm_relu_backward");
  TORCH_CHECK_VALUE(grad_in.sizes() == x_in.sizes() && out_in.sizes() == x_in.sizes(),
                    "batch_norm_relu_backward: grad and out must have x's shape ", x_in.sizes());
  const auto x = x_in.contiguous(), grad = grad_in.contiguous(), out = out_in.contiguous();
  const auto mean64 = mean.to(at::kDouble).contiguous(), var64 = var.to(at::kDouble).contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  auto grad_input = at::empty_like(x);
  auto grad_weight = at::empty_like(weight);
  auto grad_bias = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_relu_backward_cpu", [&] {
    using T = scalar_t;
    const T* xp = x.const_data_ptr<T>();
    const T* gp = grad.const_data_ptr<T>();
    const T* op = out.const_data_ptr<T>();
    const auto total = blocked_sums(N, C, [&](int64_t r0, int64_t n, double* sg, double* sgx) {
      grad_sums(gp + r0 * C, op + r0 * C, xp + r0 * C, sg, sgx, n, C);
    });
    const double* mp = mean64.const_data_ptr<double>();
    const double* vp = var64.const_data_ptr<double>();
    const T* w = weight.const_data_ptr<T>();
    T* gw = grad_weight.mutable_data_ptr<T>();
    T* gb = grad_bias.mutable_data_ptr<T>();
    std::vector<T> mt(C), k1(C), k2(C), k3(C);
    for (int64_t c = 0; c < C; ++c) {
      const double invstd = 1.0 / std::sqrt(vp[c] + eps);
      const double sg = total[c];
      const double sgxhat = (total[C + c] - mp[c] * sg) * invstd;  // sum g * xhat
      gw[c] = static_cast<T>(sgxhat);
      gb[c] = static_cast<T>(sg);
      // grad_x = w invstd (g - sg / N - xhat sgxhat / N), xhat = (x - mean) invstd
      const double a = static_cast<double>(w[c]) * invstd;
      const double b = a * invstd * sgxhat / N;
      mt[c] = static_cast<T>(mp[c]);
      k1[c] = static_cast<T>(a);
      k2[c] = static_cast<T>(-b);
      k3[c] = static_cast<T>(-a * sg / N);
    }
    T* gxp = grad_input.mutable_data_ptr<T>();
    at::parallel_for(0, N, std::max<int64_t>(1, 32768 / C), [&](int64_t r0, int64_t r1) {
      grad_x(gp + r0 * C, op + r0 * C, xp + r0 * C, mt.data(), k1.data(), k2.data(), k3.data(), gxp + r0 * C,
             r1 - r0, C);
    });
  });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyzsl, CPU, m) {
  m.impl("batch_norm_relu", &batch_norm_relu_cpu);
  m.impl("_batch_norm_relu_backward", &batch_norm_relu_backward_cpu);
}

}  // namespace pyzsl
