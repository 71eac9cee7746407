// CUDA kernels of the multi-label evaluation ops (same semantics as csrc/cpu/metrics_cpu.cpp).
//
// multilabel_ap, exact and without sorting, in three launches:
//   1. positive_scan_kernel (count): one warp per label counts the kept rows with target 1 -> num_positives.
//      Offsets of each label's positives in a scratch buffer are the exclusive cumsum of these counts (ATen).
//   2. positive_scan_kernel (write): the same warp compacts those positive scores, in row order, into the scratch
//      buffer (ballot + popc, so the layout is deterministic).
//   3. ap_count_kernel: grid (label, chunk). A block gives each thread one positive p of its label (chunks of
//      kApThreads positives, strided over gridDim.y), streams the label's column through shared memory in tiles
//      of kApTile rows (score + annotated/positive flag) and counts annotated and positive entries >= p.
//      sum over its positives of pos_ge / ann_ge in double, block-reduced into partial[label, chunk].
//   ap = partial.sum(1) / max(P, 1). O(N * P) comparisons per label; deterministic.
//
// multilabel_topk_hits: one warp per row, min(k, L) rounds of a warp-wide argmax under the order
// (score descending, label index ascending), each round excluding the pairs that rank at or above the pair the
// previous round chose.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../checks.h"

namespace pyzsl {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;
constexpr int kScanWarps = 8;     // labels per block in positive_scan_kernel
constexpr int kApThreads = 256;   // positives per chunk in ap_count_kernel
constexpr int kApTile = 2048;     // rows per shared-memory tile in ap_count_kernel
constexpr int kTopkWarps = 8;     // rows per block in topk_hits_kernel
constexpr int kMaxApChunksPerLabel = 65535;  // grid.y limit

// Exact comparisons need a type that holds every score value: float for half/bfloat16/float, double for double.
template <typename scalar_t>
using compare_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Rows kept by row_mask with target 1 in column `label`. Mode kCount writes the count to num_positives[label];
// mode kWrite writes their scores, in row order, to positives[offsets[label] ...].
enum class ScanMode { kCount, kWrite };

template <ScanMode mode, typename scalar_t, typename T>
__global__ void positive_scan_kernel(const scalar_t* __restrict__ scores, const int8_t* __restrict__ targets,
                                     const bool* __restrict__ row_mask, int64_t N, int64_t L,
                                     int64_t* __restrict__ num_positives, const int64_t* __restrict__ offsets,
                                     T* __restrict__ positives) {
  const int lane = threadIdx.x;  // blockDim = (32, kScanWarps)
  const int64_t label = static_cast<int64_t>(blockIdx.x) * kScanWarps + threadIdx.y;
  if (label >= L) return;  // uniform across the warp; this kernel has no block-wide barrier
  const unsigned lanes_below = (1u << lane) - 1u;
  T* out = mode == ScanMode::kWrite ? positives + offsets[label] : nullptr;
  int64_t count = 0;
  for (int64_t base = 0; base < N; base += kWarp) {  // every lane runs the same iterations
    const int64_t n = base + lane;
    const bool positive = n < N && (row_mask == nullptr || row_mask[n]) && targets[n * L + label] == 1;
    const unsigned ballot = __ballot_sync(kFullMask, positive);
    if (mode == ScanMode::kWrite && positive) {
      out[count + __popc(ballot & lanes_below)] = static_cast<T>(scores[n * L + label]);
    }
    count += __popc(ballot);
  }
  if (mode == ScanMode::kCount && lane == 0) num_positives[label] = count;
}

// Flags of a tile entry: bit 0 = annotated (and kept), bit 1 = positive (and kept).
template <typename scalar_t, typename T>
__global__ void __launch_bounds__(kApThreads)
    ap_count_kernel(const scalar_t* __restrict__ scores, const int8_t* __restrict__ targets,
                    const bool* __restrict__ row_mask, int64_t N, int64_t L, bool unannotated_is_negative,
                    const T* __restrict__ positives, const int64_t* __restrict__ offsets,
                    const int64_t* __restrict__ num_positives, double* __restrict__ partial) {
  __shared__ T tile_score[kApTile];
  __shared__ uint8_t tile_flag[kApTile];
  __shared__ double reduce[kApThreads];

  const int tid = threadIdx.x;
  const int64_t label = blockIdx.x;
  const int64_t P = num_positives[label];
  const T* label_positives = positives + offsets[label];
  const int64_t chunk_stride = static_cast<int64_t>(gridDim.y) * kApThreads;

  double sum = 0.0;
  // The chunk loop and the tile loop are uniform across the block, so the barriers inside are safe.
  for (int64_t chunk = static_cast<int64_t>(blockIdx.y) * kApThreads; chunk < P; chunk += chunk_stride) {
    const int64_t q = chunk + tid;
    const bool active = q < P;
    const T p = active ? label_positives[q] : T(0);
    int64_t positives_ge = 0, annotated_ge = 0;
    for (int64_t row0 = 0; row0 < N; row0 += kApTile) {
      const int rows = static_cast<int>(std::min<int64_t>(kApTile, N - row0));
      __syncthreads();  // everyone is done with the previous tile
      for (int r = tid; r < rows; r += kApThreads) {
        const int64_t n = row0 + r;
        const int64_t idx = n * L + label;
        uint8_t flag = 0;
        T score = T(0);
        if (row_mask == nullptr || row_mask[n]) {
          const int8_t t = targets[idx];
          flag = t == 1 ? 3 : ((unannotated_is_negative || t != 0) ? 1 : 0);
          if (flag != 0) score = static_cast<T>(scores[idx]);
        }
        tile_flag[r] = flag;  // flag 0 adds nothing below, whatever the score
        tile_score[r] = score;
      }
      __syncthreads();
      if (active) {
        for (int r = 0; r < rows; ++r) {
          if (tile_score[r] >= p) {
            const uint8_t flag = tile_flag[r];
            annotated_ge += flag & 1;
            positives_ge += flag >> 1;
          }
        }
      }
    }
    // The positive itself is counted, so annotated_ge >= positives_ge >= 1.
    if (active) sum += static_cast<double>(positives_ge) / static_cast<double>(annotated_ge);
  }

  reduce[tid] = sum;
  __syncthreads();
  for (int width = kApThreads / 2; width > 0; width /= 2) {
    if (tid < width) reduce[tid] += reduce[tid + width];
    __syncthreads();
  }
  if (tid == 0) partial[label * gridDim.y + blockIdx.y] = reduce[0];
}

std::tuple<at::Tensor, at::Tensor> multilabel_ap_cuda(const at::Tensor& scores_in, const at::Tensor& targets_in,
                                                      const std::optional<at::Tensor>& row_mask_in,
                                                      bool unannotated_is_negative) {
  check_scores_targets(scores_in, targets_in, "multilabel_ap");
  check_row_mask(row_mask_in, scores_in, "multilabel_ap");
  TORCH_CHECK_VALUE(scores_in.is_cuda(), "multilabel_ap: expected CUDA tensors, got ", scores_in.device());
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const auto scores = scores_in.contiguous();
  const auto targets = targets_in.contiguous();
  std::optional<at::Tensor> row_mask;
  if (row_mask_in.has_value()) row_mask = row_mask_in->contiguous();
  const int64_t N = scores.size(0), L = scores.size(1);
  auto num_positives = at::zeros({L}, scores.options().dtype(at::kLong));
  if (N == 0 || L == 0) return {at::zeros({L}, scores.options().dtype(at::kDouble)), num_positives};

  const auto stream = at::cuda::getCurrentCUDAStream();
  const bool* mask_ptr = row_mask.has_value() ? row_mask->const_data_ptr<bool>() : nullptr;
  const dim3 scan_block(kWarp, kScanWarps);
  const dim3 scan_grid(static_cast<unsigned>((L + kScanWarps - 1) / kScanWarps));
  at::Tensor ap;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "multilabel_ap_cuda", [&] {
    using T = compare_t<scalar_t>;
    const scalar_t* scores_ptr = scores.const_data_ptr<scalar_t>();
    const int8_t* targets_ptr = targets.const_data_ptr<int8_t>();

    positive_scan_kernel<ScanMode::kCount, scalar_t, T><<<scan_grid, scan_block, 0, stream>>>(
        scores_ptr, targets_ptr, mask_ptr, N, L, num_positives.mutable_data_ptr<int64_t>(), nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const auto ends = at::cumsum(num_positives, 0);
    const auto offsets = ends.sub(num_positives).contiguous();
    const int64_t total = ends[L - 1].item<int64_t>();  // synchronises; sizes the scratch buffer
    if (total == 0) {
      ap = at::zeros({L}, scores.options().dtype(at::kDouble));
      return;
    }
    auto positives = at::empty({total}, scores.options().dtype(std::is_same_v<T, double> ? at::kDouble : at::kFloat));
    positive_scan_kernel<ScanMode::kWrite, scalar_t, T><<<scan_grid, scan_block, 0, stream>>>(
        scores_ptr, targets_ptr, mask_ptr, N, L, nullptr, offsets.const_data_ptr<int64_t>(),
        positives.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // Enough chunks per label to give every SM a few blocks; a label with fewer positives leaves some idle
    // (they write 0). Never more chunks than N rows could fill.
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    int64_t chunks = (4 * sms + L - 1) / L;
    chunks = std::min<int64_t>(chunks, (N + kApThreads - 1) / kApThreads);
    chunks = std::clamp<int64_t>(chunks, 1, kMaxApChunksPerLabel);
    auto partial = at::empty({L, chunks}, scores.options().dtype(at::kDouble));
    const dim3 ap_grid(static_cast<unsigned>(L), static_cast<unsigned>(chunks));
    ap_count_kernel<scalar_t, T><<<ap_grid, kApThreads, 0, stream>>>(
        scores_ptr, targets_ptr, mask_ptr, N, L, unannotated_is_negative, positives.const_data_ptr<T>(),
        offsets.const_data_ptr<int64_t>(), num_positives.const_data_ptr<int64_t>(),
        partial.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ap = partial.sum(1).div_(num_positives.clamp_min(1).to(at::kDouble));
  });
  return {ap, num_positives};
}

// Does (a_score, a_index) rank before (b_score, b_index)? Score descending, then label index ascending.
template <typename T>
__device__ __forceinline__ bool ranks_before(T a_score, int64_t a_index, T b_score, int64_t b_index) {
  return a_score > b_score || (a_score == b_score && a_index < b_index);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kWarp* kTopkWarps)
    topk_hits_kernel(const scalar_t* __restrict__ scores, const int8_t* __restrict__ targets, int64_t N,
                     int64_t L, int64_t k, int64_t rounds, bool* __restrict__ hits,
                     int64_t* __restrict__ row_positives) {
  using T = compare_t<scalar_t>;
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();  // ranks after every real (score, index)
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kTopkWarps + threadIdx.x / kWarp;
  if (row >= N) return;  // uniform across the warp; no block-wide barrier below
  const scalar_t* s = scores + row * L;
  const int8_t* t = targets + row * L;

  int64_t positives = 0;
  for (int64_t j = lane; j < L; j += kWarp) positives += t[j] == 1;
  for (int offset = kWarp / 2; offset > 0; offset /= 2) positives += __shfl_xor_sync(kFullMask, positives, offset);
  if (lane == 0) row_positives[row] = positives;

  // (last_score, last_index): the pair chosen by the previous round; everything ranking at or above it is taken.
  T last_score = T(0);
  int64_t last_index = -1;  // -1: nothing chosen yet
  for (int64_t r = 0; r < rounds; ++r) {
    T best_score = -std::numeric_limits<T>::infinity();
    int64_t best_index = kNone;
    for (int64_t j = lane; j < L; j += kWarp) {
      const T v = static_cast<T>(s[j]);
      if (last_index >= 0 && !ranks_before(last_score, last_index, v, j)) continue;
      if (ranks_before(v, j, best_score, best_index)) {
        best_score = v;
        best_index = j;
      }
    }
    // The order is strict and total, so after the butterfly every lane holds the same best pair.
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const T other_score = __shfl_xor_sync(kFullMask, best_score, offset);
      const int64_t other_index = __shfl_xor_sync(kFullMask, best_index, offset);
      if (ranks_before(other_score, other_index, best_score, best_index)) {
        best_score = other_score;
        best_index = other_index;
      }
    }
    if (best_index == kNone) break;  // only reachable with NaN scores (checked in Python); leaves hits false
    if (lane == 0) hits[row * k + r] = t[best_index] == 1;
    last_score = best_score;
    last_index = best_index;
  }
}

std::tuple<at::Tensor, at::Tensor> multilabel_topk_hits_cuda(const at::Tensor& scores_in,
                                                             const at::Tensor& targets_in, int64_t k) {
  check_scores_targets(scores_in, targets_in, "multilabel_topk_hits");
  TORCH_CHECK_VALUE(k >= 1, "multilabel_topk_hits: k must be >= 1, got ", k);
  TORCH_CHECK_VALUE(scores_in.is_cuda(), "multilabel_topk_hits: expected CUDA tensors, got ", scores_in.device());
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const auto scores = scores_in.contiguous();
  const auto targets = targets_in.contiguous();
  const int64_t N = scores.size(0), L = scores.size(1);
  auto hits = at::zeros({N, k}, scores.options().dtype(at::kBool));
  auto row_positives = at::zeros({N}, scores.options().dtype(at::kLong));
  if (N == 0 || L == 0) return {hits, row_positives};
  const int64_t rounds = std::min(k, L);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>((N + kTopkWarps - 1) / kTopkWarps));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "multilabel_topk_hits_cuda", [&] {
    topk_hits_kernel<scalar_t><<<grid, kWarp * kTopkWarps, 0, stream>>>(
        scores.const_data_ptr<scalar_t>(), targets.const_data_ptr<int8_t>(), N, L, k, rounds,
        hits.mutable_data_ptr<bool>(), row_positives.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {hits, row_positives};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyzsl, CUDA, m) {
  m.impl("multilabel_ap", &multilabel_ap_cuda);
  m.impl("multilabel_topk_hits", &multilabel_topk_hits_cuda);
}

}  // namespace pyzsl
