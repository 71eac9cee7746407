// CPU kernels of conv2x2_same: LESA's 2x2 convolution with TF 'SAME' padding (one zero row and column after the map)
// on channels-last maps, by Winograd's minimal filtering F(2x2, 2x2).
//
// In one dimension two outputs of a 2-tap filter g over inputs d0 d1 d2 take three products instead of four:
//   y0 = d0 g0 + d1 g1 = m0 + m1,  y1 = d1 g0 + d2 g1 = m1 + m2,
//   m0 = (d0 - d1) g0,  m1 = d1 (g0 + g1),  m2 = (d2 - d1) g1.
// Nested over rows and columns, each 2x2 block of outputs ("tile") reads a 3x3 block of inputs and needs 9 products
// instead of 16; with channels the products are 9 GEMMs [tiles, C_in] x [C_in, C_out]: 9/16 of the direct
// convolution's multiply-adds, forward and for the weight gradient. The transforms use only +1/-1/0 coefficients,
// so the rounding is that of a direct convolution with at most four times as many terms.
//
//   tiles  V[p, q][t, ci] = sum_ij BT[p, i] BT[q, j] x[rows of tile t + i, columns + j, ci]   (zero past the map)
//   weight U[p, q][co, ci] = sum_ab G[p, a] G[q, b] weight[co, ci, a, b]
//   products M[p, q] = V[p, q] U[p, q]^T                                                      (at::bmm)
//   out[2 ti + a, 2 tj + b] = bias + sum_pq AT[a, p] AT[b, q] M[p, q]
// with BT = [[1,-1,0],[0,1,0],[0,-1,1]], G = [[1,0],[1,1],[0,1]], AT = [[1,1,0],[0,1,1]]. The backward runs the same
// algebra transposed: dM = A dOut A^T per tile, dU = dM^T V (at::bmm), dweight = G^T dU G, dV = dM U, dx = B dV B^T.
// The forward returns V so that the weight gradient does not redo the input transform.
//
// Each pass is a template (double runs it as is: tests and gradcheck) plus a float overload cloned for AVX-512 /
// AVX2 / baseline (PYZSL_CLONES, vector_math.h), which overload resolution prefers for float pointers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <vector>

#include "vector_math.h"

namespace pyzsl {
namespace {

constexpr int kBT[3][3] = {{1, -1, 0}, {0, 1, 0}, {0, -1, 1}};

struct Geometry {
  int64_t B, h, w, th, tw, tiles;
  Geometry(int64_t B_, int64_t h_, int64_t w_)
      : B(B_), h(h_), w(w_), th((h_ + 1) / 2), tw((w_ + 1) / 2), tiles(B_ * ((h_ + 1) / 2) * ((w_ + 1) / 2)) {}
};

// Pointers to the 3x3 input pixels of tile t (a pixel past the map points at `zeros`).
template <typename T>
PYZSL_INLINE void tile_pixels(const T* x, const Geometry& g, int64_t t, int64_t C, const T* zeros,
                              std::array<const T*, 9>& px) {
  const int64_t b = t / (g.th * g.tw), ti = (t / g.tw) % g.th, tj = t % g.tw;
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) {
      const int64_t y = 2 * ti + i, xx = 2 * tj + j;
      px[3 * i + j] = (y < g.h && xx < g.w) ? x + ((b * g.h + y) * g.w + xx) * C : zeros;
    }
  }
}

// V[p, q][t] for one tile; `stride` is the distance between the 9 planes of V. The loop says that the planes of V do
// not overlap the pixels (ivdep): without it GCC keeps it scalar.
template <typename T>
PYZSL_INLINE void input_transform_tile(const std::array<const T*, 9>& d, T* __restrict v, int64_t stride, int64_t C) {
  const T *d00 = d[0], *d01 = d[1], *d02 = d[2], *d10 = d[3], *d11 = d[4], *d12 = d[5], *d20 = d[6], *d21 = d[7],
          *d22 = d[8];
#pragma GCC ivdep
  for (int64_t c = 0; c < C; ++c) {
    // rows combined, r_pj = sum_i BT[p, i] d_ij, then the columns
    const T r00 = d00[c] - d10[c], r01 = d01[c] - d11[c], r02 = d02[c] - d12[c];
    const T r10 = d10[c], r11 = d11[c], r12 = d12[c];
    const T r20 = d20[c] - d10[c], r21 = d21[c] - d11[c], r22 = d22[c] - d12[c];
    v[c] = r00 - r01;
    v[stride + c] = r01;
    v[2 * stride + c] = r02 - r01;
    v[3 * stride + c] = r10 - r11;
    v[4 * stride + c] = r11;
    v[5 * stride + c] = r12 - r11;
    v[6 * stride + c] = r20 - r21;
    v[7 * stride + c] = r21;
    v[8 * stride + c] = r22 - r21;
  }
}

template <typename T>
PYZSL_INLINE void input_transform(const T* x, const Geometry& g, int64_t C, const T* zeros, T* V, int64_t t0,
                                  int64_t t1) {
  std::array<const T*, 9> px;
  for (int64_t t = t0; t < t1; ++t) {
    tile_pixels(x, g, t, C, zeros, px);
    input_transform_tile(px, V + t * C, g.tiles * C, C);
  }
}
PYZSL_CLONES void input_transform(const float* x, const Geometry& g, int64_t C, const float* zeros, float* V,
                                  int64_t t0, int64_t t1) {
  input_transform<float>(x, g, C, zeros, V, t0, t1);
}

// out[2 ti + a, 2 tj + b] = bias + sum_pq AT[a, p] AT[b, q] M[p, q] for the tiles t0..t1, outputs past the map dropped.
template <typename T>
PYZSL_INLINE void output_transform(const T* M, const T* __restrict bias, const Geometry& g, int64_t C, T* out,
                                   int64_t t0, int64_t t1) {
  const int64_t stride = g.tiles * C;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / (g.th * g.tw), ti = (t / g.tw) % g.th, tj = t % g.tw;
    const T* m = M + t * C;
    T* o[2][2];
    for (int a = 0; a < 2; ++a) {
      for (int e = 0; e < 2; ++e) {
        const int64_t y = 2 * ti + a, xx = 2 * tj + e;
        o[a][e] = (y < g.h && xx < g.w) ? out + ((b * g.h + y) * g.w + xx) * C : nullptr;
      }
    }
    if (o[0][1] && o[1][0]) {  // whole tile inside the map: the branch-free loop
      T* __restrict o00 = o[0][0];
      T* __restrict o01 = o[0][1];
      T* __restrict o10 = o[1][0];
      T* __restrict o11 = o[1][1];
      const T* m0 = m;
      const T* m1 = m + stride;
      const T* m2 = m + 2 * stride;
      const T* m3 = m + 3 * stride;
      const T* m4 = m + 4 * stride;
      const T* m5 = m + 5 * stride;
      const T* m6 = m + 6 * stride;
      const T* m7 = m + 7 * stride;
      const T* m8 = m + 8 * stride;
#pragma GCC ivdep
      for (int64_t c = 0; c < C; ++c) {
        // rows combined: r_aq = M[a, q] + M[a + 1, q]
        const T r00 = m0[c] + m3[c], r01 = m1[c] + m4[c], r02 = m2[c] + m5[c];
        const T r10 = m3[c] + m6[c], r11 = m4[c] + m7[c], r12 = m5[c] + m8[c];
        o00[c] = bias[c] + r00 + r01;
        o01[c] = bias[c] + r01 + r02;
        o10[c] = bias[c] + r10 + r11;
        o11[c] = bias[c] + r11 + r12;
      }
      continue;
    }
    for (int a = 0; a < 2; ++a) {
      for (int e = 0; e < 2; ++e) {
        if (!o[a][e]) continue;
        for (int64_t c = 0; c < C; ++c) {
          T s = bias[c];
          for (int p = a; p <= a + 1; ++p) {
            for (int q = e; q <= e + 1; ++q) s += m[(3 * p + q) * stride + c];
          }
          o[a][e][c] = s;
        }
      }
    }
  }
}
PYZSL_CLONES void output_transform(const float* M, const float* bias, const Geometry& g, int64_t C, float* out,
                                   int64_t t0, int64_t t1) {
  output_transform<float>(M, bias, g, C, out, t0, t1);
}

// out[(3 p + q) * plane] = sum_ab G[p, a] G[q, b] x_ab with G = [[1,0],[1,1],[0,1]]: the weight transform, and the
// output transform's backward (AT transposed is G).
template <typename T>
PYZSL_INLINE void spread_2x2(T x00, T x01, T x10, T x11, T* __restrict out, int64_t plane) {
  const T s0 = x00 + x10, s1 = x01 + x11;  // G's middle row over a
  out[0] = x00;
  out[plane] = x00 + x01;
  out[2 * plane] = x01;
  out[3 * plane] = s0;
  out[4 * plane] = s0 + s1;
  out[5 * plane] = s1;
  out[6 * plane] = x10;
  out[7 * plane] = x10 + x11;
  out[8 * plane] = x11;
}

// dM[p, q][t] = sum_ab AT[a, p] AT[b, q] dout[2 ti + a, 2 tj + b] (the output transform transposed; outputs past the
// map have no gradient). In one dimension: dm0 = dy0, dm1 = dy0 + dy1, dm2 = dy1.
template <typename T>
PYZSL_INLINE void output_transform_backward(const T* dout, const Geometry& g, int64_t C, const T* zeros, T* dM,
                                            int64_t t0, int64_t t1) {
  const int64_t stride = g.tiles * C;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / (g.th * g.tw), ti = (t / g.tw) % g.th, tj = t % g.tw;
    const T* dy[2][2];
    for (int a = 0; a < 2; ++a) {
      for (int e = 0; e < 2; ++e) {
        const int64_t y = 2 * ti + a, xx = 2 * tj + e;
        dy[a][e] = (y < g.h && xx < g.w) ? dout + ((b * g.h + y) * g.w + xx) * C : zeros;
      }
    }
    const T *dy00 = dy[0][0], *dy01 = dy[0][1], *dy10 = dy[1][0], *dy11 = dy[1][1];
    T* __restrict m = dM + t * C;
#pragma GCC ivdep
    for (int64_t c = 0; c < C; ++c) spread_2x2(dy00[c], dy01[c], dy10[c], dy11[c], m + c, stride);
  }
}
PYZSL_CLONES void output_transform_backward(const float* dout, const Geometry& g, int64_t C, const float* zeros,
                                            float* dM, int64_t t0, int64_t t1) {
  output_transform_backward<float>(dout, g, C, zeros, dM, t0, t1);
}

// dx = B dV B^T, gathered per input pixel so that threads never write the same pixel: row y = 2k is row 0 of tile
// row k and row 2 of tile row k - 1; row 2k + 1 is row 1 of tile row k (columns alike). Not on LESA's training path
// (its region features are fixed inputs), so kept plain.
template <typename T>
void input_transform_backward(const T* dV, const Geometry& g, int64_t C, T* dx, int64_t p0, int64_t p1) {
  const int64_t stride = g.tiles * C;
  std::vector<T> acc(C);
  for (int64_t pixel = p0; pixel < p1; ++pixel) {
    const int64_t b = pixel / (g.h * g.w), y = (pixel / g.w) % g.h, xx = pixel % g.w;
    std::fill(acc.begin(), acc.end(), T(0));
    // (tile index along the axis, position in the tile's 3 inputs)
    int64_t rows[2][2], cols[2][2];
    int nr = 0, nc = 0;
    auto place = [](int64_t v, int64_t tiles, int64_t out[2][2], int& n) {
      if (v % 2 == 1) {
        out[n][0] = v / 2, out[n][1] = 1, ++n;
        return;
      }
      if (v / 2 < tiles) out[n][0] = v / 2, out[n][1] = 0, ++n;
      if (v / 2 >= 1) out[n][0] = v / 2 - 1, out[n][1] = 2, ++n;
    };
    place(y, g.th, rows, nr);
    place(xx, g.tw, cols, nc);
    for (int r = 0; r < nr; ++r) {
      for (int s = 0; s < nc; ++s) {
        const int64_t t = (b * g.th + rows[r][0]) * g.tw + cols[s][0];
        const int i = static_cast<int>(rows[r][1]), j = static_cast<int>(cols[s][1]);
        for (int p = 0; p < 3; ++p) {
          for (int q = 0; q < 3; ++q) {
            const int coefficient = kBT[p][i] * kBT[q][j];
            if (coefficient == 0) continue;
            const T* v = dV + (3 * p + q) * stride + t * C;
            for (int64_t c = 0; c < C; ++c) acc[c] += coefficient * v[c];
          }
        }
      }
    }
    std::copy(acc.begin(), acc.end(), dx + pixel * C);
  }
}

// U[p, q][k] = sum_ab G[p, a] G[q, b] g[k, a, b] for the k = (co, ci) pairs k0..k1 of weight g [C_out C_in, 2, 2].
template <typename T>
PYZSL_INLINE void weight_transform(const T* __restrict g, T* __restrict u, int64_t plane, int64_t k0,
                                   int64_t k1) {
#pragma GCC ivdep
  for (int64_t k = k0; k < k1; ++k) spread_2x2(g[4 * k], g[4 * k + 1], g[4 * k + 2], g[4 * k + 3], u + k, plane);
}

// dweight[k, a, b] = sum_pq G[p, a] G[q, b] dU[p, q][k]: G's transpose picks p in {a, a + 1} and q in {b, b + 1}.
template <typename T>
PYZSL_INLINE void weight_transform_backward(const T* __restrict du, T* __restrict g, int64_t plane, int64_t k0,
                                            int64_t k1) {
#pragma GCC ivdep
  for (int64_t k = k0; k < k1; ++k) {
    const T r00 = du[k] + du[3 * plane + k], r01 = du[plane + k] + du[4 * plane + k],
            r02 = du[2 * plane + k] + du[5 * plane + k];
    const T r10 = du[3 * plane + k] + du[6 * plane + k], r11 = du[4 * plane + k] + du[7 * plane + k],
            r12 = du[5 * plane + k] + du[8 * plane + k];
    g[4 * k] = r00 + r01;
    g[4 * k + 1] = r01 + r02;
    g[4 * k + 2] = r10 + r11;
    g[4 * k + 3] = r11 + r12;
  }
}

PYZSL_CLONES void weight_transform(const float* g, float* u, int64_t plane, int64_t k0, int64_t k1) {
  weight_transform<float>(g, u, plane, k0, k1);
}
PYZSL_CLONES void weight_transform_backward(const float* du, float* g, int64_t plane, int64_t k0, int64_t k1) {
  weight_transform_backward<float>(du, g, plane, k0, k1);
}

// U [9, C_out, C_in] of weight [C_out, C_in, 2, 2].
at::Tensor weight_transform(const at::Tensor& weight) {
  const int64_t plane = weight.size(0) * weight.size(1);
  auto U = at::empty({9, weight.size(0), weight.size(1)}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "conv2x2_weight_transform", [&] {
    const scalar_t* g = weight.const_data_ptr<scalar_t>();
    scalar_t* u = U.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, plane, 4096, [&](int64_t k0, int64_t k1) { weight_transform(g, u, plane, k0, k1); });
  });
  return U;
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be [B, h, w, C_in], got ", x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(1) == x.size(3) && weight.size(2) == 2 && weight.size(3) == 2, op,
                    ": weight must be [C_out, ", x.size(3), ", 2, 2], got ", weight.sizes());
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == weight.size(0), op, ": bias must be [", weight.size(0),
                    "], got ", bias.sizes());
  TORCH_CHECK_VALUE(x.scalar_type() == weight.scalar_type() && x.scalar_type() == bias.scalar_type() &&
                        (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
                    op, ": x, weight and bias must all be float32 or all float64, got ", x.scalar_type(), ", ",
                    weight.scalar_type(), ", ", bias.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> conv2x2_same_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                    const at::Tensor& bias_in) {
  check_inputs(x_in, weight_in, bias_in, "conv2x2_same");
  const auto x = x_in.contiguous(), weight = weight_in.contiguous(), bias = bias_in.contiguous();
  const Geometry g(x.size(0), x.size(1), x.size(2));
  const int64_t Ci = x.size(3), Co = weight.size(0);
  auto V = at::empty({9, g.tiles, Ci}, x.options());
  auto out = at::empty({g.B, g.h, g.w, Co}, x.options());
  if (g.tiles == 0) return {out, V};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2x2_same_cpu", [&] {
    const std::vector<scalar_t> zeros(Ci, scalar_t(0));
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* vp = V.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.tiles, grain_rows(9 * Ci), [&](int64_t t0, int64_t t1) {
      input_transform(xp, g, Ci, zeros.data(), vp, t0, t1);
    });
  });
  const auto M = at::bmm(V, weight_transform(weight).transpose(1, 2));  // [9, tiles, C_out]
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2x2_same_cpu", [&] {
    const scalar_t* mp = M.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.tiles, grain_rows(9 * Co), [&](int64_t t0, int64_t t1) {
      output_transform(mp, bp, g, Co, op, t0, t1);
    });
  });
  return {out, V};
}

std::tuple<std::optional<at::Tensor>, at::Tensor, at::Tensor> conv2x2_same_backward_cpu(const at::Tensor& grad_in,
                                                                                         const at::Tensor& V_in,
                                                                                         const at::Tensor& weight_in,
                                                                                         bool x_needs_grad) {
  const char* op = "conv2x2_same_backward";
  TORCH_CHECK_VALUE(grad_in.dim() == 4 && weight_in.dim() == 4 && grad_in.size(3) == weight_in.size(0), op,
                    ": grad [B, h, w, C_out] and weight [C_out, C_in, 2, 2] disagree: ", grad_in.sizes(), " and ",
                    weight_in.sizes());
  const auto grad = grad_in.contiguous(), V = V_in.contiguous(), weight = weight_in.contiguous();
  const Geometry g(grad.size(0), grad.size(1), grad.size(2));
  const int64_t Co = weight.size(0), Ci = weight.size(1);
  TORCH_CHECK_VALUE(V.dim() == 3 && V.size(0) == 9 && V.size(1) == g.tiles && V.size(2) == Ci, op,
                    ": tiles must be [9, ", g.tiles, ", ", Ci, "], got ", V.sizes());
  auto dM = at::empty({9, g.tiles, Co}, grad.options());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "conv2x2_same_backward_cpu", [&] {
    const std::vector<scalar_t> zeros(Co, scalar_t(0));
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* mp = dM.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.tiles, grain_rows(9 * Co), [&](int64_t t0, int64_t t1) {
      output_transform_backward(gp, g, Co, zeros.data(), mp, t0, t1);
    });
  });
  const auto dU = at::bmm(dM.transpose(1, 2), V);  // [9, C_out, C_in]
  auto grad_weight = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "conv2x2_same_backward_cpu", [&] {
    const scalar_t* du = dU.const_data_ptr<scalar_t>();
    scalar_t* gw = grad_weight.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, Co * Ci, 4096, [&](int64_t k0, int64_t k1) {
      weight_transform_backward(du, gw, Co * Ci, k0, k1);
    });
  });
  auto grad_bias = grad.reshape({-1, Co}).sum(0);
  std::optional<at::Tensor> grad_x;
  if (x_needs_grad) {
    const auto dV = at::bmm(dM, weight_transform(weight));  // [9, tiles, C_in]
    grad_x = at::empty({g.B, g.h, g.w, Ci}, grad.options());
    AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "conv2x2_same_backward_cpu", [&] {
      const scalar_t* dv = dV.const_data_ptr<scalar_t>();
      scalar_t* dx = grad_x->mutable_data_ptr<scalar_t>();
      at::parallel_for(0, g.B * g.h * g.w, grain_rows(9 * Ci), [&](int64_t p0, int64_t p1) {
        input_transform_backward(dv, g, Ci, dx, p0, p1);
      });
    });
  }
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyzsl, CPU, m) {
  m.impl("conv2x2_same", &conv2x2_same_cpu);
  m.impl("_conv2x2_same_backward", &conv2x2_same_backward_cpu);
}

}  // namespace pyzsl
