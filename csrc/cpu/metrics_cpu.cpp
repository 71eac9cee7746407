// CPU kernels of the multi-label evaluation ops.
//
// multilabel_ap never sorts a label's N scores. AP only needs, for each positive p, how many annotated entries
// score at least p. So per label we sort the P positives, then drop every other annotated entry into the bucket
// "how many positives are <= its score" (a search among P sorted values, started from a coarse lookup table), and
// suffix sums over the buckets give each positive its count: O(N + P log P) work per label, O(N) workspace.
// Labels are processed in blocks of kLabelBlock adjacent columns so that each row's cache line is read once
// per pass; blocks run in parallel.
//
// multilabel_topk_hits keeps, per row, a sorted buffer of the k best (score, index) pairs in one pass.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../checks.h"

namespace pyzsl {
namespace {

constexpr int64_t kLabelBlock = 16;
constexpr int64_t kMaxTable = 1 << 14;

// Exact comparisons need a type that holds every score value: float for half/bfloat16/float, double for double.
template <typename scalar_t>
using compare_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// One label's sorted positives plus a table that maps a score to a first guess of
// upper_bound(positives, score). The guess only speeds up the search; the result is exact.
template <typename T>
struct PositiveIndex {
  std::vector<T> pos;          // ascending
  std::vector<int64_t> table;  // table[b] = #positives <= lo + b * width
  std::vector<int64_t> count;  // count[m] = #non-positive annotated entries with exactly m positives <= them
  T lo = 0, hi = 0;
  double inv_width = 0;

  void build() {
    std::sort(pos.begin(), pos.end());
    const int64_t P = static_cast<int64_t>(pos.size());
    count.assign(P + 1, 0);
    if (P == 0) return;
    lo = pos.front();
    hi = pos.back();
    const int64_t G = std::min<int64_t>(2 * P + 1, kMaxTable);
    inv_width = hi > lo ? static_cast<double>(G) / (static_cast<double>(hi) - static_cast<double>(lo)) : 0.0;
    table.resize(G + 1);
    int64_t i = 0;
    for (int64_t b = 0; b <= G; ++b) {
      const double edge = static_cast<double>(lo) + (inv_width > 0 ? b / inv_width : 0.0);
      while (i < P && static_cast<double>(pos[i]) <= edge) ++i;
      table[b] = i;
    }
  }

  // #positives <= v, for v in [lo, hi).
  int64_t upper_bound(T v) const {
    const int64_t G = static_cast<int64_t>(table.size()) - 1;
    int64_t b = static_cast<int64_t>((static_cast<double>(v) - static_cast<double>(lo)) * inv_width);
    b = std::clamp<int64_t>(b, 0, G - 1);
    auto first = pos.begin() + table[b];
    auto last = pos.begin() + table[b + 1];
    int64_t g = std::upper_bound(first, last, v) - pos.begin();
    // Rounding in the bucket arithmetic can put v one bucket off: walk to the exact answer.
    const int64_t P = static_cast<int64_t>(pos.size());
    while (g < P && pos[g] <= v) ++g;
    while (g > 0 && pos[g - 1] > v) --g;
    return g;
  }

  void add_negative(T v) {
    if (v < lo) return;  // ranks below every positive: it never counts
    if (v >= hi) {
      ++count[pos.size()];
      return;
    }
    ++count[upper_bound(v)];
  }

  // (1/P) * sum over positives p of pos(>= p) / annotated(>= p), walking tie groups from the top.
  double average_precision() const {
    const int64_t P = static_cast<int64_t>(pos.size());
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
  const int64_t num_blocks = (L + kLabelBlock - 1) / kLabelBlock;
  at::parallel_for(0, num_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<PositiveIndex<T>> index(kLabelBlock);
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t j0 = block * kLabelBlock;
      const int64_t width = std::min(kLabelBlock, L - j0);
      for (int64_t b = 0; b < width; ++b) index[b].pos.clear();
      // Pass 1: gather each label's positive scores.
      for (int64_t n = 0; n < N; ++n) {
        if (row_mask != nullptr && !row_mask[n]) continue;
        const scalar_t* s = scores + n * L + j0;
        const int8_t* t = targets + n * L + j0;
        for (int64_t b = 0; b < width; ++b) {
          if (t[b] == 1) index[b].pos.push_back(static_cast<T>(s[b]));
        }
      }
      for (int64_t b = 0; b < width; ++b) index[b].build();
      // Pass 2: bucket every other annotated entry by how many positives it outranks or ties.
      const int8_t lowest_negative = unannotated_is_negative ? 0 : -1;
      for (int64_t n = 0; n < N; ++n) {
        if (row_mask != nullptr && !row_mask[n]) continue;
        const scalar_t* s = scores + n * L + j0;
        const int8_t* t = targets + n * L + j0;
        for (int64_t b = 0; b < width; ++b) {
          if (t[b] <= lowest_negative && t[b] != 1 && !index[b].pos.empty()) {
            index[b].add_negative(static_cast<T>(s[b]));
          }
        }
      }
      for (int64_t b = 0; b < width; ++b) {
        ap[j0 + b] = index[b].average_precision();
        num_positives[j0 + b] = static_cast<int64_t>(index[b].pos.size());
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
      for (int64_t j = 0; j < L; ++j) {
        const T v = static_cast<T>(s[j]);
        // A later index loses ties, so it enters only when strictly better than the current k-th.
        if (filled == kept && !(v > best[kept - 1])) continue;
        int64_t pos = filled < kept ? filled++ : kept - 1;
        while (pos > 0 && best[pos - 1] < v) {
          best[pos] = best[pos - 1];
          best_index[pos] = best_index[pos - 1];
          --pos;
        }
        best[pos] = v;
        best_index[pos] = j;
      }
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
