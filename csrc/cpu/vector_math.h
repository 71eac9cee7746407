#pragma once
// Helpers shared by the CPU kernels' vectorised elementwise passes (epilogues around library GEMMs).
//
// The build compiles for baseline x86-64 (SSE2); functions marked PYZSL_CLONES are cloned for AVX-512 and AVX2 and
// picked at load time (GCC function multiversioning), so their loops run at the width of the machine. Everything they
// call is PYZSL_INLINE and branch-free so that it vectorises inside each clone.
#include <algorithm>
#include <bit>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYZSL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PYZSL_CLONES
#endif
#define PYZSL_INLINE inline __attribute__((always_inline))

namespace pyzsl {

// Rows per parallel task of an elementwise pass over [rows, cols]: about 32k elements.
inline int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

// exp(x) = 2^n e^r with n = round(x / ln 2), |r| <= ln 2 / 2; x clamped so 2^n stays a normal float. A Cephes-style
// polynomial, within 1 ulp of exp over [-87, 88].
PYZSL_INLINE float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float t = x * 1.44269504088896341f;
  const int32_t ni = static_cast<int32_t>(t + (t >= 0.0f ? 0.5f : -0.5f));  // round half away (floor is a call)
  const float n = static_cast<float>(ni);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * std::bit_cast<float>((ni + 127) << 23);
}

}  // namespace pyzsl
