// CPU kernels of the multi-label evaluation ops.
//
// multilabel_ap never sorts a label's N scores. AP only needs, for each positive p, how many annotated entries
// score at least p. So per label we sort its P positives, drop every other annotated entry into the bucket
// "how many positives are <= its score", and suffix sums over the buckets give each positive its count:
// O(N + P log P) work per label and no copy of the score matrix.
//   1. A row-major scan of the targets gathers each label's positive scores (CSR over labels).
//   2. Each label gets a table of G ~ 2P equal-width bins over [min positive, max positive] that gives, per bin, how
//      many positives lie in lower bins. The bin function is monotone, so a score's bucket is that count plus a
//      comparison with the (usually zero, one or two) positives of its own bin: exact, and branch-free.
//   3. Threads own contiguous label ranges and read the rows in tiles; a tile's scores are copied out per label into
//      a small buffer so that each label's table stays in L1 while its scores are counted.
//
// multilabel_topk_hits keeps, per row, a sorted buffer of the k best (score, index) pairs in one pass, skipping
// whole chunks of the row that cannot beat the current k-th best.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../checks.h"

namespace pyzsl {
namespace {

constexpr int64_t kMinLabelBlock = 16;
// Rows per tile: enough that reloading a label's table per tile is cheap, few enough that the tile buffer (about
// kTileElements scores per thread) stays small.
constexpr int64_t kMinRowTile = 256;
constexpr int64_t kMaxRowTile = 8192;
constexpr int64_t kTileElements = 1 << 22;
constexpr int64_t kMaxBins = 1 << 16;
constexpr int64_t kBinsPerPositive = 2;
constexpr int64_t kTopkChunk = 32;

// Exact comparisons need a type that holds every score value: float for half/bfloat16/float, double for double.
template <typename scalar_t>
using compare_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Positive scores of every label, gathered by one parallel row-major scan of the targets.
template <typename T>
struct PositivesByLabel {
  std::vector<int64_t> offsets;  // [L + 1]
  std::vector<T> values;         // label j's positives at [offsets[j], offsets[j + 1]), unsorted
};

// Whether any of the 8 int8 targets at p equals 1 (SWAR: a zero byte of x ^ 0x0101.. marks a 1).
inline bool any_byte_is_one(const int8_t* p) {
  uint64_t x;
  std::memcpy(&x, p, sizeof(x));
  x ^= 0x0101010101010101ULL;
  return ((x - 0x0101010101010101ULL) & ~x & 0x8080808080808080ULL) != 0;
}

template <typename scalar_t, typename T = compare_t<scalar_t>>
PositivesByLabel<T> gather_positives(const scalar_t* scores, const int8_t* targets, const bool* row_mask, int64_t N,
                                     int64_t L) {
  struct Hit {
    int32_t label;
    T value;
  };
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads() * 4, N));
  const int64_t rows_per_chunk = (N + chunks - 1) / chunks;
  std::vector<std::vector<Hit>> hits(chunks);
  // One row-major scan; positives are sparse, so eight targets are skipped at a time.
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t n = c * rows_per_chunk; n < std::min(N, (c + 1) * rows_per_chunk); ++n) {
        if (row_mask != nullptr && !row_mask[n]) continue;
        const int8_t* t = targets + n * L;
        const scalar_t* s = scores + n * L;
        int64_t j = 0;
        for (; j + 8 <= L; j += 8) {
          if (!any_byte_is_one(t + j)) continue;
          for (int64_t i = j; i < j + 8; ++i) {
            if (t[i] == 1) hits[c].push_back({static_cast<int32_t>(i), static_cast<T>(s[i])});
          }
        }
        for (; j < L; ++j) {
          if (t[j] == 1) hits[c].push_back({static_cast<int32_t>(j), static_cast<T>(s[j])});
        }
      }
    }
  });
  PositivesByLabel<T> out;
  out.offsets.assign(L + 1, 0);
  for (const auto& chunk : hits) {
    for (const Hit& h : chunk) ++out.offsets[h.label + 1];
  }
  for (int64_t j = 0; j < L; ++j) out.offsets[j + 1] += out.offsets[j];
  out.values.resize(out.offsets[L]);
  std::vector<int64_t> cursor(out.offsets.begin(), out.offsets.end() - 1);
  for (const auto& chunk : hits) {
    for (const Hit& h : chunk) out.values[cursor[h.label]++] = h.value;
  }
  return out;
}

// One label's sorted positives, bins and bucket counts (thread-local storage, reused across labels).
template <typename T>
struct LabelBuckets {
  std::vector<T> pos;          // ascending, followed by two +inf sentinels
  std::vector<int32_t> bins;   // per bin: (#positives in lower bins) << 2 | min(#positives in the bin, 3)
  std::vector<int32_t> count;  // count[m] = #other annotated entries with exactly m positives <= them
  int64_t P = 0;
  T lo = 0;
  T scale = 0;
  T last_bin = 0;

  // Monotone in v (sub, mul, clamp and truncation all preserve order), so bins never reorder scores.
  int32_t bin(T v) const {
    // (v - lo) can overflow to inf, and inf * 0 is NaN when scale is 0 (one bin): max(0, NaN) is 0 here.
    const T x = std::min(std::max(T(0), (v - lo) * scale), last_bin);
    return static_cast<int32_t>(x);
  }

  void build(const T* first, int64_t n) {
    P = n;
    pos.assign(first, first + n);
    std::sort(pos.begin(), pos.end());
    pos.push_back(std::numeric_limits<T>::infinity());
    pos.push_back(std::numeric_limits<T>::infinity());
    count.assign(P + 1, 0);
    if (P == 0) return;
    lo = pos.front();
    const T hi = pos[P - 1];
    const int64_t G = std::min<int64_t>(kBinsPerPositive * P, kMaxBins);
    last_bin = static_cast<T>(G - 1);
    scale = hi > lo ? static_cast<T>(G) / (hi - lo) : T(0);
    if (!std::isfinite(static_cast<double>(scale))) scale = 0;  // positives too close for the bin width: one bin
    bins.assign(G, 0);
    for (int64_t i = 0; i < P; ++i) ++bins[bin(pos[i])];  // positives per bin, for now
    int32_t below = 0;
    for (int32_t& entry : bins) {
      const int32_t in_bin = entry;
      entry = (below << 2) | std::min(in_bin, 3);
      below += in_bin;
    }
  }

  // Counts a run of non-positive annotated scores: their bins first, in a loop the compiler vectorises, then the
  // dependent lookups.
  void add_all(const T* values, int64_t n, int32_t* bin_of) {
    for (int64_t i = 0; i < n; ++i) bin_of[i] = bin(values[i]);
    for (int64_t i = 0; i < n; ++i) add_in_bin(values[i], bin_of[i]);
  }

  // Counts one score v of bin b: its bucket is how many positives are <= v. Positives of lower bins are < v and of
  // higher bins > v (monotone bins), so only the positives of v's own bin are compared: the first two without
  // branches (a mispredicted branch here costs more than the two comparisons), any further ones (rare with two bins
  // per positive) in a bounded loop.
  inline void add_in_bin(T v, int32_t b) {
    const int32_t entry = bins[b];
    const int32_t in_bin = entry & 3;
    int32_t g = entry >> 2;
    g += (in_bin >= 1) & (pos[g] <= v);
    g += (in_bin >= 2) & (pos[g] <= v);
    if (in_bin == 3) {
      while (g < P && pos[g] <= v) ++g;  // bounded: the +inf sentinels do not stop a score of +inf
    }
    ++count[g];
  }

  // (1/P) * sum over positives p of pos(>= p) / annotated(>= p), walking tie groups from the top.
  double average_precision() const {
    if (P == 0) return 0.0;
    double sum = 0.0;
    int64_t negatives_at_or_above = count[P];
    int64_t end = P;
    while (end > 0) {
      int64_t begin = end - 1;
      while (begin > 0 && pos[begin - 1] == pos[end - 1]) --begin;
      const double positives_at_or_above = static_cast<double>(P - begin);
      sum += static_cast<double>(end - begin) * positives_at_or_above /
             (positives_at_or_above + static_cast<double>(negatives_at_or_above));
      for (int64_t m = begin; m < end; ++m) negatives_at_or_above += count[m];
      end = begin;
    }
    return sum / static_cast<double>(P);
  }
};

template <typename scalar_t>
void ap_kernel(const scalar_t* scores, const int8_t* targets, const bool* row_mask, int64_t N, int64_t L,
               bool unannotated_is_negative, double* ap, int64_t* num_positives) {
  using T = compare_t<scalar_t>;
  const auto positives = gather_positives<scalar_t>(scores, targets, row_mask, N, L);
  // Entries with target <= this value are "other annotated": -1 always, 0 when unannotated counts as negative.
  const int8_t max_negative = unannotated_is_negative ? 0 : -1;
  // Each thread takes a contiguous range of labels, so it reads every row as one contiguous run. Rows come in
  // tiles: the tile's other annotated scores are first copied out label by label into a small thread-local buffer,
  // then each label drops them into its buckets while its structures are hot in L1. (Walking the label structures
  // row by row instead thrashes the cache; walking the score matrix column by column defeats the prefetcher.)
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t width_per_block = std::max<int64_t>(kMinLabelBlock, (L + threads - 1) / threads);
  const int64_t num_blocks = (L + width_per_block - 1) / width_per_block;
  at::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<LabelBuckets<T>> buckets(width_per_block);
    const int64_t row_tile = std::clamp<int64_t>(kTileElements / width_per_block, kMinRowTile, kMaxRowTile);
    // Distance between two labels' runs in the buffer: not a power of two, or the runs would share cache sets.
    const int64_t tile_stride = row_tile + 16;
    std::vector<T> tile(width_per_block * tile_stride);
    std::vector<int32_t> tile_fill(width_per_block);
    std::vector<int32_t> bin_scratch(row_tile);
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t j0 = block * width_per_block;
      const int64_t width = std::min(width_per_block, L - j0);
      for (int64_t b = 0; b < width; ++b) {
        const int64_t first = positives.offsets[j0 + b], last = positives.offsets[j0 + b + 1];
        buckets[b].build(positives.values.data() + first, last - first);
      }
      for (int64_t n0 = 0; n0 < N; n0 += row_tile) {
        std::fill(tile_fill.begin(), tile_fill.begin() + width, 0);
        for (int64_t n = n0; n < std::min(N, n0 + row_tile); ++n) {
          if (row_mask != nullptr && !row_mask[n]) continue;
          const scalar_t* s = scores + n * L + j0;
          const int8_t* t = targets + n * L + j0;
          for (int64_t b = 0; b < width; ++b) {
            if (t[b] <= max_negative) tile[b * tile_stride + tile_fill[b]++] = static_cast<T>(s[b]);
          }
        }
        for (int64_t b = 0; b < width; ++b) {
          LabelBuckets<T>& label = buckets[b];
          if (label.P == 0) continue;  // AP 0: its scores need no counting
          const T* values = tile.data() + b * tile_stride;
          label.add_all(values, tile_fill[b], bin_scratch.data());
        }
      }
      for (int64_t b = 0; b < width; ++b) {
        ap[j0 + b] = buckets[b].average_precision();
        num_positives[j0 + b] = buckets[b].P;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> multilabel_ap_cpu(const at::Tensor& scores_in, const at::Tensor& targets_in,
                                                     const std::optional<at::Tensor>& row_mask_in,
                                                     bool unannotated_is_negative) {
  check_scores_targets(scores_in, targets_in, "multilabel_ap");
  check_row_mask(row_mask_in, scores_in, "multilabel_ap");
  const auto scores = scores_in.contiguous();
  const auto targets = targets_in.contiguous();
  std::optional<at::Tensor> row_mask;
  if (row_mask_in.has_value()) row_mask = row_mask_in->contiguous();
  const int64_t N = scores.size(0), L = scores.size(1);
  // Bucket counts are int32 and bin entries pack a positive count shifted by 2 bits.
  TORCH_CHECK_VALUE(N < (int64_t{1} << 29), "multilabel_ap: at most 2^29 rows per call, got ", N);
  auto ap = at::zeros({L}, scores.options().dtype(at::kDouble));
  auto num_positives = at::zeros({L}, scores.options().dtype(at::kLong));
  if (N == 0 || L == 0) return {ap, num_positives};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "multilabel_ap_cpu", [&] {
    ap_kernel<scalar_t>(scores.const_data_ptr<scalar_t>(), targets.const_data_ptr<int8_t>(),
                        row_mask.has_value() ? row_mask->const_data_ptr<bool>() : nullptr, N, L,
                        unannotated_is_negative, ap.mutable_data_ptr<double>(),
                        num_positives.mutable_data_ptr<int64_t>());
  });
  return {ap, num_positives};
}

template <typename scalar_t>
void topk_kernel(const scalar_t* scores, const int8_t* targets, int64_t N, int64_t L, int64_t k, bool* hits,
                 int64_t* row_positives) {
  using T = compare_t<scalar_t>;
  const int64_t kept = std::min(k, L);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(L, 1));
  at::parallel_for(0, N, grain, [&](int64_t row_begin, int64_t row_end) {
    std::vector<T> best(kept);
    std::vector<int64_t> best_index(kept);
    for (int64_t n = row_begin; n < row_end; ++n) {
      const scalar_t* s = scores + n * L;
      const int8_t* t = targets + n * L;
      int64_t filled = 0;
      auto offer = [&](int64_t j) {
        const T v = static_cast<T>(s[j]);
        // A later index loses ties, so it enters only when strictly better than the current k-th.
        if (filled == kept && !(v > best[kept - 1])) return;
        int64_t pos = filled < kept ? filled++ : kept - 1;
        while (pos > 0 && best[pos - 1] < v) {
          best[pos] = best[pos - 1];
          best_index[pos] = best_index[pos - 1];
          --pos;
        }
        best[pos] = v;
        best_index[pos] = j;
      };
      int64_t j = 0;
      for (; j < L && filled < kept; ++j) offer(j);
      // Most chunks hold nothing above the k-th best: test a whole chunk with a vectorisable reduction first.
      for (; j + kTopkChunk <= L; j += kTopkChunk) {
        const T threshold = best[kept - 1];
        int32_t above = 0;
        for (int64_t i = 0; i < kTopkChunk; ++i) above += static_cast<T>(s[j + i]) > threshold;
        if (above > 0) {
          for (int64_t i = 0; i < kTopkChunk; ++i) offer(j + i);
        }
      }
      for (; j < L; ++j) offer(j);
      bool* h = hits + n * k;
      for (int64_t r = 0; r < k; ++r) h[r] = r < kept && t[best_index[r]] == 1;
      int64_t positives = 0;
      for (int64_t j = 0; j < L; ++j) positives += t[j] == 1;
      row_positives[n] = positives;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> multilabel_topk_hits_cpu(const at::Tensor& scores_in,
                                                            const at::Tensor& targets_in, int64_t k) {
  check_scores_targets(scores_in, targets_in, "multilabel_topk_hits");
  TORCH_CHECK_VALUE(k >= 1, "multilabel_topk_hits: k must be >= 1, got ", k);
  const auto scores = scores_in.contiguous();
  const auto targets = targets_in.contiguous();
  const int64_t N = scores.size(0), L = scores.size(1);
  auto hits = at::zeros({N, k}, scores.options().dtype(at::kBool));
  auto row_positives = at::zeros({N}, scores.options().dtype(at::kLong));
  if (N == 0 || L == 0) return {hits, row_positives};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "multilabel_topk_hits_cpu", [&] {
    topk_kernel<scalar_t>(scores.const_data_ptr<scalar_t>(), targets.const_data_ptr<int8_t>(), N, L, k,
                          hits.mutable_data_ptr<bool>(), row_positives.mutable_data_ptr<int64_t>());
  });
  return {hits, row_positives};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyzsl, CPU, m) {
  m.impl("multilabel_ap", &multilabel_ap_cpu);
  m.impl("multilabel_topk_hits", &multilabel_topk_hits_cpu);
}

}  // namespace pyzsl
