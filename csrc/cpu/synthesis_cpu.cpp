// CPU kernels of feedback_synthesis (TF-VAEGAN's synthesis path with feedback, see pyzsl/ops/synthesis.py).
//
// Forward, per chunk of rows: six library GEMMs (at::mm_out, no bias: addmm's broadcast-bias path runs ~25% below
// mm here) each followed by one fused pass over its output that adds the bias and applies the activation in the
// accumulation type, rounding to the storage type on the way out. The generator hidden layer x1 is computed once and
// used twice (for the feedback-free output and for the residual x1 + alpha * fb); the residual is fused into the
// epilogue of the feedback's last layer. Chunks reuse their buffers, so inference memory is O(chunk * width).
//
// Backward: the decoder hidden h is detached (as published), so only two paths carry gradient: out -> gen_fc3 -> x1
// -> gen_fc1 and out -> gen_fc3 -> fb -> fb_fc2 -> fb_fc1. Per chunk: one GEMM for d(x1 + alpha fb), one fused pass
// splitting it into the two LeakyReLU-masked branches, and the weight gradients accumulated across chunks.
//
// Types: acc_t (float or double) is the input/output type; low_t (acc_t, BFloat16 or Half) is the GEMM operand and
// activation storage type.

// no-trapping-math (it concerns floating-point exception flags only, never values) lets GCC if-convert the
// clamps and selects of the epilogues' exp so that they vectorise. It must precede the headers: the std::min/max
// instantiated with trapping math would keep their comparisons as branches.
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
#include <optional>
#include <vector>

#include "vector_math.h"

namespace pyzsl {
namespace {

constexpr double kSlope = 0.2;  // LeakyReLU(0.2), as published

// Rows per parallel task of an elementwise pass: about 32k elements.

template <typename T>
inline T leaky(T v) {
  return v > T(0) ? v : v * T(kSlope);
}

template <typename T>
inline T leaky_grad(T x) {  // from the activation's output: x > 0 exactly where its input was > 0
  return x > T(0) ? T(1) : T(kSlope);
}

template <typename T>
inline T sigmoid(T v) {
  return T(1) / (T(1) + std::exp(-v));
}

// --- vectorised epilogues for float32 and bfloat16 storage ------------------------------------------------------
// PYZSL_CLONES loops (vector_math.h), branch-free so that they vectorise, exp included. Measured on CUB shapes,
// scalar epilogues took ~5% of the fp32 op and ~15% of the bf16 one.

struct F32 {  // float storage
  using T = float;
  static PYZSL_INLINE float load(float v) { return v; }
  static PYZSL_INLINE float store(float v) { return v; }
};

struct BF16 {  // bfloat16 storage as raw bits; round to nearest even and quiet NaN exactly as c10::BFloat16
  using T = uint16_t;
  static PYZSL_INLINE float load(uint16_t v) { return std::bit_cast<float>(static_cast<uint32_t>(v) << 16); }
  static PYZSL_INLINE uint16_t store(float f) {
    const uint32_t u = std::bit_cast<uint32_t>(f);
    const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? static_cast<uint16_t>(0x7FC0) : rounded;
  }
};

template <typename S>
PYZSL_INLINE void bias_leaky_rows(typename S::T* x, const float* __restrict b, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    typename S::T* __restrict row = x + r * cols;
    for (int64_t c = 0; c < cols; ++c) {
      const float v = S::load(row[c]) + b[c];
      row[c] = S::store(v > 0.0f ? v : v * 0.2f);
    }
  }
}

PYZSL_INLINE float sigmoid_approx(float v) { return 1.0f / (1.0f + exp_approx(-v)); }

template <typename S>
PYZSL_INLINE void bias_sigmoid_rows(typename S::T* x, const float* __restrict b, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    typename S::T* __restrict row = x + r * cols;
    for (int64_t c = 0; c < cols; ++c) row[c] = S::store(sigmoid_approx(S::load(row[c]) + b[c]));
  }
}

// g holds F's last pre-activation and becomes x1 + alpha * fb; fb (rounded to storage) is also written when kept.
template <typename S, bool kKeepFb>
PYZSL_INLINE void feedback_rows(typename S::T* g, const float* __restrict b, const typename S::T* __restrict x1,
                                float alpha, typename S::T* __restrict fb, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t base = r * cols;
    typename S::T* __restrict grow = g + base;
    for (int64_t c = 0; c < cols; ++c) {
      const float v = S::load(grow[c]) + b[c];
      const auto f = S::store(v > 0.0f ? v : v * 0.2f);
      if constexpr (kKeepFb) fb[base + c] = f;
      grow[c] = S::store(S::load(x1[base + c]) + alpha * S::load(f));
    }
  }
}

PYZSL_CLONES void bias_leaky_f32(float* x, const float* b, int64_t rows, int64_t cols) {
  bias_leaky_rows<F32>(x, b, rows, cols);
}
PYZSL_CLONES void bias_leaky_bf16(uint16_t* x, const float* b, int64_t rows, int64_t cols) {
  bias_leaky_rows<BF16>(x, b, rows, cols);
}
PYZSL_CLONES void bias_sigmoid_f32(float* x, const float* b, int64_t rows, int64_t cols) {
  bias_sigmoid_rows<F32>(x, b, rows, cols);
}
PYZSL_CLONES void bias_sigmoid_bf16(uint16_t* x, const float* b, int64_t rows, int64_t cols) {
  bias_sigmoid_rows<BF16>(x, b, rows, cols);
}
PYZSL_CLONES void bias_sigmoid_bf16_f32(const uint16_t* __restrict in, const float* __restrict b,
                                        float* __restrict out, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = sigmoid_approx(BF16::load(in[r * cols + c]) + b[c]);
  }
}
PYZSL_CLONES void feedback_f32(float* g, const float* b, const float* x1, float alpha, float* fb, int64_t rows,
                               int64_t cols) {
  if (fb != nullptr) {
    feedback_rows<F32, true>(g, b, x1, alpha, fb, rows, cols);
  } else {
    feedback_rows<F32, false>(g, b, x1, alpha, fb, rows, cols);
  }
}
PYZSL_CLONES void feedback_bf16(uint16_t* g, const float* b, const uint16_t* x1, float alpha, uint16_t* fb,
                                int64_t rows, int64_t cols) {
  if (fb != nullptr) {
    feedback_rows<BF16, true>(g, b, x1, alpha, fb, rows, cols);
  } else {
    feedback_rows<BF16, false>(g, b, x1, alpha, fb, rows, cols);
  }
}

// The raw storage of a float or bfloat16 tensor.
template <typename T>
auto raw(const at::Tensor& t) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return reinterpret_cast<uint16_t*>(t.mutable_data_ptr<c10::BFloat16>());
  } else {
    return t.mutable_data_ptr<T>();
  }
}

template <typename acc_t, typename low_t>
constexpr bool kVectorised =
    std::is_same_v<acc_t, float> && (std::is_same_v<low_t, float> || std::is_same_v<low_t, c10::BFloat16>);

enum class Act { kLeakyRelu, kSigmoid };

// out[r, c] = act(pre[r, c] + bias[c]); pre and out may be the same buffer.
template <Act act, typename acc_t, typename pre_t, typename out_t>
void bias_act(const at::Tensor& pre, const at::Tensor& bias, const at::Tensor& out) {
  const int64_t rows = pre.size(0), cols = pre.size(1);
  const pre_t* p = pre.const_data_ptr<pre_t>();
  const acc_t* b = bias.const_data_ptr<acc_t>();
  out_t* o = out.mutable_data_ptr<out_t>();
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t r0, int64_t r1) {
    if constexpr (kVectorised<acc_t, pre_t> && kVectorised<acc_t, out_t>) {
      auto dst = raw<out_t>(out) + r0 * cols;
      if constexpr (std::is_same_v<pre_t, out_t>) {  // in place
        TORCH_INTERNAL_ASSERT(pre.data_ptr() == out.data_ptr(), "same-type epilogues run in place");
        if constexpr (act == Act::kLeakyRelu && std::is_same_v<out_t, float>) {
          bias_leaky_f32(dst, b, r1 - r0, cols);
        } else if constexpr (act == Act::kLeakyRelu) {
          bias_leaky_bf16(dst, b, r1 - r0, cols);
        } else if constexpr (std::is_same_v<out_t, float>) {
          bias_sigmoid_f32(dst, b, r1 - r0, cols);
        } else {
          bias_sigmoid_bf16(dst, b, r1 - r0, cols);
        }
      } else {
        static_assert(act == Act::kSigmoid, "only the final sigmoid changes type (bf16 in, float out)");
        bias_sigmoid_bf16_f32(raw<pre_t>(pre) + r0 * cols, b, dst, r1 - r0, cols);
      }
      return;
    }
    for (int64_t r = r0; r < r1; ++r) {
      const pre_t* pr = p + r * cols;
      out_t* orow = o + r * cols;
      for (int64_t c = 0; c < cols; ++c) {
        const acc_t v = static_cast<acc_t>(pr[c]) + b[c];
        orow[c] = static_cast<out_t>(act == Act::kLeakyRelu ? leaky(v) : sigmoid(v));
      }
    }
  });
}

// fb = lrelu(pre + bias) (stored only when fb_out is defined), g = x1 + alpha * fb.
template <typename acc_t, typename low_t>
void feedback_residual(const at::Tensor& pre, const at::Tensor& bias, const at::Tensor& x1, double alpha,
                       const at::Tensor& fb_out, const at::Tensor& g) {
  const int64_t rows = pre.size(0), cols = pre.size(1);
  const low_t* p = pre.const_data_ptr<low_t>();
  const acc_t* b = bias.const_data_ptr<acc_t>();
  const low_t* x = x1.const_data_ptr<low_t>();
  low_t* f = fb_out.defined() ? fb_out.mutable_data_ptr<low_t>() : nullptr;
  low_t* o = g.mutable_data_ptr<low_t>();
  const acc_t a = static_cast<acc_t>(alpha);
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t r0, int64_t r1) {
    if constexpr (kVectorised<acc_t, low_t>) {
      TORCH_INTERNAL_ASSERT(pre.data_ptr() == g.data_ptr(), "the feedback epilogue runs in place");
      const int64_t offset = r0 * cols;
      auto fb_raw = fb_out.defined() ? raw<low_t>(fb_out) + offset : nullptr;
      if constexpr (std::is_same_v<low_t, float>) {
        feedback_f32(raw<low_t>(g) + offset, b, raw<low_t>(x1) + offset, a, fb_raw, r1 - r0, cols);
      } else {
        feedback_bf16(raw<low_t>(g) + offset, b, raw<low_t>(x1) + offset, a, fb_raw, r1 - r0, cols);
      }
      return;
    }
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * cols;
      for (int64_t c = 0; c < cols; ++c) {
        const low_t fb = static_cast<low_t>(leaky(static_cast<acc_t>(p[base + c]) + b[c]));
        if (f != nullptr) f[base + c] = fb;
        o[base + c] = static_cast<low_t>(static_cast<acc_t>(x[base + c]) + a * static_cast<acc_t>(fb));
      }
    }
  });
}

// Every input of the op, contiguous, with the weights already in the GEMM type.
struct Weights {
  at::Tensor gen_w1, gen_b1, gen_w3, gen_b3, dec_w1, dec_b1, fb_w1, fb_b1, fb_w2, fb_b2;
};

void check_inputs(const at::Tensor& noise, const at::Tensor& attributes, const std::vector<at::Tensor>& weights,
                  int64_t chunk_size, const std::optional<at::ScalarType>& compute_dtype, const char* op) {
  TORCH_CHECK_VALUE(noise.dim() == 2 && attributes.dim() == 2 && noise.size(0) == attributes.size(0), op,
                    ": noise [N, nz] and attributes [N, na] must share N, got ", noise.sizes(), " and ",
                    attributes.sizes());
  const auto dtype = noise.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble, op, ": inputs must be float32 or float64, got ",
                    dtype);
  TORCH_CHECK_VALUE(chunk_size >= 1, op, ": chunk_size must be >= 1, got ", chunk_size);
  for (const auto& w : weights) {
    TORCH_CHECK_VALUE(w.scalar_type() == dtype, op, ": every tensor must be ", dtype, ", got ", w.scalar_type());
  }
  const auto& [gen_w1, gen_b1, gen_w3, gen_b3, dec_w1, dec_b1, fb_w1, fb_b1, fb_w2, fb_b2] =
      std::tie(weights[0], weights[1], weights[2], weights[3], weights[4], weights[5], weights[6], weights[7],
               weights[8], weights[9]);
  TORCH_CHECK_VALUE(gen_w1.dim() == 2 && gen_w1.size(1) == noise.size(1) + attributes.size(1), op,
                    ": gen_w1 must be [H, nz + na] = [H, ", noise.size(1) + attributes.size(1), "], got ",
                    gen_w1.sizes());
  const int64_t H = gen_w1.size(0);
  TORCH_CHECK_VALUE(gen_w3.dim() == 2 && gen_w3.size(1) == H, op, ": gen_w3 must be [X, ", H, "], got ",
                    gen_w3.sizes());
  const int64_t X = gen_w3.size(0);
  TORCH_CHECK_VALUE(dec_w1.dim() == 2 && dec_w1.size(1) == X, op, ": dec_w1 must be [Hd, ", X, "], got ",
                    dec_w1.sizes());
  const int64_t Hd = dec_w1.size(0);
  TORCH_CHECK_VALUE(fb_w1.dim() == 2 && fb_w1.size(1) == Hd, op, ": fb_w1 must be [Hf, ", Hd, "], got ",
                    fb_w1.sizes());
  const int64_t Hf = fb_w1.size(0);
  TORCH_CHECK_VALUE(fb_w2.dim() == 2 && fb_w2.size(0) == H && fb_w2.size(1) == Hf, op, ": fb_w2 must be [", H, ", ",
                    Hf, "], got ", fb_w2.sizes());
  const std::pair<const at::Tensor*, int64_t> biases[] = {{&gen_b1, H}, {&gen_b3, X}, {&dec_b1, Hd}, {&fb_b1, Hf},
                                                          {&fb_b2, H}};
  for (const auto& [b, width] : biases) {
    TORCH_CHECK_VALUE(b->dim() == 1 && b->size(0) == width, op, ": a bias must be [", width, "], got ", b->sizes());
  }
  if (compute_dtype.has_value() && *compute_dtype != dtype) {
    TORCH_CHECK_VALUE(*compute_dtype == at::kBFloat16 || *compute_dtype == at::kHalf, op,
                      ": compute_dtype must be bfloat16, float16 or the input dtype, got ", *compute_dtype);
    TORCH_CHECK_VALUE(dtype == at::kFloat, op, ": compute_dtype ", *compute_dtype, " needs float32 inputs, got ",
                      dtype);
  }
}

at::ScalarType low_type(const at::Tensor& noise, const std::optional<at::ScalarType>& compute_dtype) {
  return compute_dtype.value_or(noise.scalar_type());
}

template <typename acc_t, typename low_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& noise, const at::Tensor& attributes, const Weights& w, double alpha, int64_t chunk_size,
    at::ScalarType low, bool keep) {
  const int64_t N = noise.size(0), H = w.gen_w1.size(0), X = w.gen_w3.size(0), Hd = w.dec_w1.size(0),
                Hf = w.fb_w1.size(0);
  const auto acc_opts = noise.options();
  const auto low_opts = acc_opts.dtype(low);
  constexpr bool same = std::is_same_v<acc_t, low_t>;
  auto out = at::empty({N, X}, acc_opts);
  // Kept activations are written in place; otherwise one chunk's worth of buffers is reused.
  const int64_t rows = keep ? N : std::min(chunk_size, N);
  auto x1_all = at::empty({rows, H}, low_opts), h_all = at::empty({rows, Hd}, low_opts);
  auto f1_all = at::empty({rows, Hf}, low_opts), fb_all = keep ? at::empty({N, H}, low_opts) : at::Tensor();
  const int64_t buffer_rows = std::min(chunk_size, N);
  auto x0 = at::empty({buffer_rows, X}, low_opts), g = at::empty({buffer_rows, H}, low_opts);
  auto pre_out = same ? at::Tensor() : at::empty({buffer_rows, X}, low_opts);
  // [z, a] in the GEMM type, once for all rows (N x (nz + na), small next to the activations).
  const auto za = at::cat({noise, attributes}, 1).to(low);
  for (int64_t r0 = 0; r0 < N; r0 += chunk_size) {
    const int64_t c = std::min(chunk_size, N - r0);
    const int64_t k0 = keep ? r0 : 0;
    auto x1 = x1_all.narrow(0, k0, c), h = h_all.narrow(0, k0, c), f1 = f1_all.narrow(0, k0, c);
    auto fb = keep ? fb_all.narrow(0, r0, c) : at::Tensor();
    auto x0c = x0.narrow(0, 0, c), gc = g.narrow(0, 0, c), outc = out.narrow(0, r0, c);
    at::mm_out(x1, za.narrow(0, r0, c), w.gen_w1.t());
    bias_act<Act::kLeakyRelu, acc_t, low_t, low_t>(x1, w.gen_b1, x1);
    at::mm_out(x0c, x1, w.gen_w3.t());
    bias_act<Act::kSigmoid, acc_t, low_t, low_t>(x0c, w.gen_b3, x0c);
    at::mm_out(h, x0c, w.dec_w1.t());
    bias_act<Act::kLeakyRelu, acc_t, low_t, low_t>(h, w.dec_b1, h);
    at::mm_out(f1, h, w.fb_w1.t());
    bias_act<Act::kLeakyRelu, acc_t, low_t, low_t>(f1, w.fb_b1, f1);
    at::mm_out(gc, f1, w.fb_w2.t());  // F's pre-activation, turned into x1 + alpha * fb in place
    feedback_residual<acc_t, low_t>(gc, w.fb_b2, x1, alpha, fb, gc);
    if constexpr (same) {
      at::mm_out(outc, gc, w.gen_w3.t());
      bias_act<Act::kSigmoid, acc_t, acc_t, acc_t>(outc, w.gen_b3, outc);
    } else {
      auto pre = pre_out.narrow(0, 0, c);
      at::mm_out(pre, gc, w.gen_w3.t());
      bias_act<Act::kSigmoid, acc_t, low_t, acc_t>(pre, w.gen_b3, outc);
    }
  }
  if (!keep) {
    auto empty = at::empty({0}, low_opts);
    return {out, empty, empty.clone(), empty.clone(), empty.clone()};
  }
  return {out, x1_all, h_all, f1_all, fb_all};
}

Weights prepare(const std::vector<at::Tensor>& t, at::ScalarType low) {
  // GEMM operands in the GEMM type, biases in the accumulation type.
  auto gemm = [&](const at::Tensor& x) { return x.to(low).contiguous(); };
  auto bias = [](const at::Tensor& x) { return x.contiguous(); };
  return {gemm(t[0]), bias(t[1]), gemm(t[2]), bias(t[3]), gemm(t[4]), bias(t[5]), gemm(t[6]), bias(t[7]),
          gemm(t[8]), bias(t[9])};
}

// Calls fn.template operator()<acc_t, low_t>() for the (input, compute) type pair.
template <typename Fn>
auto dispatch_types(at::ScalarType acc, at::ScalarType low, Fn&& fn) {
  if (acc == at::kDouble) return fn.template operator()<double, double>();
  if (low == at::kBFloat16) return fn.template operator()<float, c10::BFloat16>();
  if (low == at::kHalf) return fn.template operator()<float, c10::Half>();
  return fn.template operator()<float, float>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> feedback_synthesis_cpu(
    const at::Tensor& noise, const at::Tensor& attributes, const at::Tensor& gen_w1, const at::Tensor& gen_b1,
    const at::Tensor& gen_w3, const at::Tensor& gen_b3, const at::Tensor& dec_w1, const at::Tensor& dec_b1,
    const at::Tensor& fb_w1, const at::Tensor& fb_b1, const at::Tensor& fb_w2, const at::Tensor& fb_b2, double alpha,
    int64_t chunk_size, std::optional<at::ScalarType> compute_dtype, bool keep_activations) {
  const std::vector<at::Tensor> weights = {gen_w1, gen_b1, gen_w3, gen_b3, dec_w1, dec_b1, fb_w1, fb_b1, fb_w2, fb_b2};
  check_inputs(noise, attributes, weights, chunk_size, compute_dtype, "feedback_synthesis");
  const auto low = low_type(noise, compute_dtype);
  const Weights w = prepare(weights, low);
  const auto z = noise.contiguous(), a = attributes.contiguous();
  return dispatch_types(noise.scalar_type(), low, [&]<typename acc_t, typename low_t>() {
    return forward_impl<acc_t, low_t>(z, a, w, alpha, chunk_size, low, keep_activations);
  });
}

// --- backward ---------------------------------------------------------------------------------------------------

// dp = grad * out * (1 - out) (sigmoid's derivative from its output), in acc_t and, when they differ, in low_t.
template <typename acc_t, typename low_t>
void sigmoid_grad(const at::Tensor& grad, const at::Tensor& out, const at::Tensor& dp, const at::Tensor& dp_low) {
  const int64_t rows = grad.size(0), cols = grad.size(1);
  const acc_t* gr = grad.const_data_ptr<acc_t>();
  const acc_t* o = out.const_data_ptr<acc_t>();
  acc_t* d = dp.mutable_data_ptr<acc_t>();
  low_t* dl = dp_low.defined() ? dp_low.mutable_data_ptr<low_t>() : nullptr;
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0 * cols; i < r1 * cols; ++i) {
      d[i] = gr[i] * o[i] * (acc_t(1) - o[i]);
      if (dl != nullptr) dl[i] = static_cast<low_t>(d[i]);
    }
  });
}

// g = x1 + alpha * fb, the input of the second gen_fc3, recomputed rather than kept.
template <typename acc_t, typename low_t>
void residual(const at::Tensor& x1, const at::Tensor& fb, double alpha, const at::Tensor& g) {
  const int64_t rows = x1.size(0), cols = x1.size(1);
  const low_t* x = x1.const_data_ptr<low_t>();
  const low_t* f = fb.const_data_ptr<low_t>();
  low_t* o = g.mutable_data_ptr<low_t>();
  const acc_t a = static_cast<acc_t>(alpha);
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0 * cols; i < r1 * cols; ++i) {
      o[i] = static_cast<low_t>(static_cast<acc_t>(x[i]) + a * static_cast<acc_t>(f[i]));
    }
  });
}

// From dg = d(x1 + alpha fb): dx1 = dg * lrelu'(x1) in place, dpf2 = alpha * dg * lrelu'(fb).
template <typename acc_t, typename low_t>
void split_feedback_grad(const at::Tensor& dg, const at::Tensor& x1, const at::Tensor& fb, double alpha,
                         const at::Tensor& dpf2) {
  const int64_t rows = dg.size(0), cols = dg.size(1);
  low_t* d = dg.mutable_data_ptr<low_t>();
  const low_t* x = x1.const_data_ptr<low_t>();
  const low_t* f = fb.const_data_ptr<low_t>();
  low_t* o = dpf2.mutable_data_ptr<low_t>();
  const acc_t a = static_cast<acc_t>(alpha);
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0 * cols; i < r1 * cols; ++i) {
      const acc_t v = static_cast<acc_t>(d[i]);
      o[i] = static_cast<low_t>(a * v * leaky_grad(static_cast<acc_t>(f[i])));
      d[i] = static_cast<low_t>(v * leaky_grad(static_cast<acc_t>(x[i])));
    }
  });
}

// d *= lrelu'(act), in place.
template <typename acc_t, typename low_t>
void mask_leaky(const at::Tensor& d, const at::Tensor& act) {
  const int64_t rows = d.size(0), cols = d.size(1);
  low_t* p = d.mutable_data_ptr<low_t>();
  const low_t* x = act.const_data_ptr<low_t>();
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0 * cols; i < r1 * cols; ++i) {
      p[i] = static_cast<low_t>(static_cast<acc_t>(p[i]) * leaky_grad(static_cast<acc_t>(x[i])));
    }
  });
}

// grad_w (acc_t) += dy^T @ x and grad_b += column sums of dy_sum (dy itself, or its acc_t original) over one chunk.
// In acc_t the GEMM accumulates in place; in a narrower type the product comes out in that type (as at::mm does)
// and is added in acc_t.
void accumulate_weight_grad(at::Tensor grad_w, at::Tensor grad_b, const at::Tensor& dy,
                            const at::Tensor& dy_sum, const at::Tensor& x, bool first) {
  if (dy.scalar_type() == grad_w.scalar_type()) {
    if (first) {
      at::mm_out(grad_w, dy.t(), x);
    } else {
      grad_w.addmm_(dy.t(), x);
    }
  } else {
    auto product = at::mm(dy.t(), x);
    if (first) {
      grad_w.copy_(product);
    } else {
      grad_w.add_(product);
    }
  }
  auto column_sums = at::sum(dy_sum, at::IntArrayRef{0}, /*keepdim=*/false, grad_b.scalar_type());
  if (first) {
    grad_b.copy_(column_sums);
  } else {
    grad_b.add_(column_sums);
  }
}

template <typename acc_t, typename low_t>
std::vector<at::Tensor> backward_impl(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& x1,
                                      const at::Tensor& h, const at::Tensor& f1, const at::Tensor& fb,
                                      const at::Tensor& za, const at::Tensor& gen_w1, const at::Tensor& gen_w3,
                                      const at::Tensor& fb_w2, int64_t H, int64_t Hf, double alpha,
                                      int64_t chunk_size, at::ScalarType low) {
  constexpr bool same = std::is_same_v<acc_t, low_t>;
  const int64_t N = out.size(0), X = out.size(1), K1 = za.size(1), Hd = h.size(1);
  const auto acc_opts = out.options();
  const auto low_opts = acc_opts.dtype(low);
  auto grad_za = at::empty({N, K1}, acc_opts);
  auto grad_gen_w1 = at::zeros({H, K1}, acc_opts), grad_gen_b1 = at::zeros({H}, acc_opts);
  auto grad_gen_w3 = at::zeros({X, H}, acc_opts), grad_gen_b3 = at::zeros({X}, acc_opts);
  auto grad_fb_w1 = at::zeros({Hf, Hd}, acc_opts), grad_fb_b1 = at::zeros({Hf}, acc_opts);
  auto grad_fb_w2 = at::zeros({H, Hf}, acc_opts), grad_fb_b2 = at::zeros({H}, acc_opts);
  const int64_t buffer_rows = std::min(chunk_size, N);
  auto dp = at::empty({buffer_rows, X}, acc_opts);
  auto dp_low = same ? at::Tensor() : at::empty({buffer_rows, X}, low_opts);
  auto g = at::empty({buffer_rows, H}, low_opts), dg = at::empty({buffer_rows, H}, low_opts);
  auto dpf2 = at::empty({buffer_rows, H}, low_opts), df1 = at::empty({buffer_rows, Hf}, low_opts);
  auto dza_low = same ? at::Tensor() : at::empty({buffer_rows, K1}, low_opts);
  for (int64_t r0 = 0; r0 < N; r0 += chunk_size) {
    const int64_t c = std::min(chunk_size, N - r0);
    const bool first = r0 == 0;
    auto rows = [&](const at::Tensor& t) { return t.narrow(0, r0, c); };
    auto head = [&](const at::Tensor& t) { return t.narrow(0, 0, c); };
    auto dpc = head(dp), gc = head(g), dgc = head(dg), dpf2c = head(dpf2), df1c = head(df1);
    auto dp_gemm = same ? dpc : head(dp_low);
    sigmoid_grad<acc_t, low_t>(rows(grad_out), rows(out), dpc, same ? at::Tensor() : dp_gemm);
    residual<acc_t, low_t>(rows(x1), rows(fb), alpha, gc);
    accumulate_weight_grad(grad_gen_w3, grad_gen_b3, dp_gemm, dpc, gc, first);
    at::mm_out(dgc, dp_gemm, gen_w3);
    split_feedback_grad<acc_t, low_t>(dgc, rows(x1), rows(fb), alpha, dpf2c);  // dgc now holds dx1
    accumulate_weight_grad(grad_fb_w2, grad_fb_b2, dpf2c, dpf2c, rows(f1), first);
    at::mm_out(df1c, dpf2c, fb_w2);
    mask_leaky<acc_t, low_t>(df1c, rows(f1));
    accumulate_weight_grad(grad_fb_w1, grad_fb_b1, df1c, df1c, rows(h), first);
    accumulate_weight_grad(grad_gen_w1, grad_gen_b1, dgc, dgc, rows(za), first);
    if constexpr (same) {
      auto target = rows(grad_za);
      at::mm_out(target, dgc, gen_w1);
    } else {
      auto tmp = head(dza_low);
      at::mm_out(tmp, dgc, gen_w1);
      rows(grad_za).copy_(tmp);
    }
  }
  return {grad_za, grad_gen_w1, grad_gen_b1, grad_gen_w3, grad_gen_b3,
          grad_fb_w1, grad_fb_b1, grad_fb_w2, grad_fb_b2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
feedback_synthesis_backward_cpu(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& x1,
                                const at::Tensor& h, const at::Tensor& f1, const at::Tensor& fb,
                                const at::Tensor& noise, const at::Tensor& attributes, const at::Tensor& gen_w1,
                                const at::Tensor& gen_w3, const at::Tensor& fb_w1, const at::Tensor& fb_w2,
                                double alpha, int64_t chunk_size, std::optional<at::ScalarType> compute_dtype) {
  const char* op = "feedback_synthesis_backward";
  const auto low = low_type(noise, compute_dtype);
  const int64_t N = noise.size(0), H = gen_w1.size(0), X = gen_w3.size(0), Hf = fb_w1.size(0), Hd = fb_w1.size(1);
  TORCH_CHECK_VALUE(chunk_size >= 1, op, ": chunk_size must be >= 1, got ", chunk_size);
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef({N, X}) && out.sizes() == grad_out.sizes(), op,
                    ": grad_out and out must be [", N, ", ", X, "], got ", grad_out.sizes(), " and ", out.sizes());
  const std::pair<const at::Tensor*, int64_t> acts[] = {{&x1, H}, {&h, Hd}, {&f1, Hf}, {&fb, H}};
  for (const auto& [t, width] : acts) {
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == N && t->size(1) == width && t->scalar_type() == low, op,
                      ": saved activations must be ", low, " [", N, ", ", width, "], got ", t->scalar_type(), " ",
                      t->sizes());
  }
  const auto za = at::cat({noise, attributes}, 1).to(low);
  const auto w1 = gen_w1.to(low).contiguous(), w3 = gen_w3.to(low).contiguous(), wf2 = fb_w2.to(low).contiguous();
  const auto go = grad_out.contiguous(), o = out.contiguous();
  auto grads = dispatch_types(noise.scalar_type(), low, [&]<typename acc_t, typename low_t>() {
    return backward_impl<acc_t, low_t>(go, o, x1.contiguous(), h.contiguous(), f1.contiguous(), fb.contiguous(), za,
                                       w1, w3, wf2, H, Hf, alpha, chunk_size, low);
  });
  const int64_t nz = noise.size(1);
  // clones: the two halves of one buffer must not alias each other
  return {grads[0].narrow(1, 0, nz).clone(at::MemoryFormat::Contiguous),
          grads[0].narrow(1, nz, attributes.size(1)).clone(at::MemoryFormat::Contiguous),
          grads[1], grads[2], grads[3], grads[4], grads[5], grads[6], grads[7], grads[8]};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyzsl, CPU, m) {
  m.impl("feedback_synthesis", &feedback_synthesis_cpu);
  m.impl("_feedback_synthesis_backward", &feedback_synthesis_backward_cpu);
}

}  // namespace pyzsl
