// CPU kernels of the multi-label evaluation ops.
//
// multilabel_ap never sorts a label's N scores. AP only needs, for each positive p, how many annotated entries
// score at least p. So per label we sort its P positives, drop every other annotated entry into the bucket
// "how many positives are <= its score", and suffix sums over the buckets give each positive its count:
// O(N + P) work per label (O(N + P log P) at worst) and no copy of the score matrix.
//   1. A row-major scan of the targets (with AVX-512, 64 per comparison) gathers each label's positive scores
//      (CSR over labels); the scores of a batch of positives are prefetched together, so their scattered cache
//      lines arrive in parallel. (multilabel_ap_given_positives takes them from multilabel_row_scan instead.)
//   2. Each label gets a table of G ~ 2P equal-width bins over [lowest, highest positive] that gives, per bin, how
//      many positives lie in lower bins. The bin function is monotone, so a score's bucket is that count plus a
//      comparison with the positives of its own bin (usually none to four, compared without branches): exact.
//      The same bins sort the positives: by bin, then within each bin, in O(P) but for lopsided bins.
//   3. Each thread owns a range of labels and reads its part of the rows in order, a tile at a time, copying the
//      tile column by column into a buffer. Entries that take no part are NaN (the portable loop, and with AVX-512
//      16 x 16 register transposes when most entries are annotated) or left out (AVX-512 scatters of only the
//      entries that take part, for mostly unannotated matrices; the dense copy writes with streaming stores). Then
//      each label's run of the buffer is classified into below / inside / above the positives' range, and the
//      scores inside are placed in their buckets. With AVX-512 they are first counted per bin (the label's bin
//      counts hot in cache), and only a score whose bin holds a positive (about one in six at the GZSL size) is
//      compared with that bin's positives; which bins hold one, the vector pass reads from a bitmap in registers
//      for up to 8,192 bins, and larger tables mark in their counts. The portable loop compares every score with
//      its bin's positives.
//
// multilabel_row_scan is the evaluation's one pass over the rows: multilabel_topk_hits, a check of every value,
// and the positives' CSR of step 1, each read from the row while it is in L1.
//
// multilabel_topk_hits keeps, per row, a sorted buffer of the k best (score, index) pairs in one pass, skipping
// whole chunks of the row that cannot beat the current k-th best. With AVX-512 and k <= 16 the buffer is a pair of
// registers and an insertion is a permute (GZSL size, k = 5: 0.046 -> 0.040 s), and a first pass bounds the k-th
// best by the 16 lane maxima, so that the scan offers only the few entries above it (-> 0.030 s); that pass also
// tests the scores for NaN and inf.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../checks.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define PYZSL_X86_SIMD 1
#define PYZSL_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,popcnt,bmi")))
#endif

namespace pyzsl {
namespace {

// The AP pass: a thread's tile of rows is copied into a column buffer of about kTileElements scores; its label
// range is at least kMinLabelSpan wide.
constexpr int64_t kMinLabelSpan = 16;
// Measured at NUS-WIDE's GZSL size (dense) and an Open-Images-like one (sparse): the transposed dense copy gains from
// tiles four times as tall (fewer table reloads per label: AP 0.34 -> 0.30 s at twice, 0.236 -> 0.223 s at four
// times, for 64 MiB per thread), the scattered sparse copy loses (0.16 -> 0.19 s at 40,000 x 7,586 at twice).
constexpr int64_t kTileElements = 1 << 22;  // 16 MiB of float per thread
constexpr int64_t kDenseTileElements = 1 << 24;
constexpr int64_t kMinTileRows = 256;
constexpr int64_t kMaxTileRows = 8192;
constexpr int64_t kDenseMaxTileRows = 32768;
constexpr int64_t kSmallCountRun = 65535;  // scores a run may count in 16 bits (LabelTable::hist16, count16)
static_assert(kMaxTileRows <= kSmallCountRun && kDenseMaxTileRows <= kSmallCountRun, "a tile's run fits 16-bit counts");
constexpr int32_t kInBinCompares = 4;  // positives of a score's bin compared without branches
constexpr int32_t kHoldsPositive = std::numeric_limits<int32_t>::min();  // marks a bin's entry in LabelTable::hist
constexpr int64_t kCountBlock = 512;  // the AVX-512 counts' block of scores: their scratch stays in L1
constexpr int64_t kGatherBatch = 256;    // positives whose scores are prefetched before any is read
constexpr size_t kMaxKeptTileBytes = size_t{256} << 20;  // tile buffers kept between calls, at most
constexpr int64_t kSpareSlots = 2;  // emit_set_bits may emit this many slots past the last set bit
constexpr int64_t kCandidateBlock = 1024;  // the bounded top-K's block of entries
constexpr int64_t kMaxBins = 1 << 16;
constexpr int64_t kBitmapBins = 8192;  // up to this many bins, their flags (holds a positive) fit in 16 registers
constexpr int64_t kBinsPerPositive = 2;
constexpr int32_t kLargeBin = 16;  // LabelTable::build sorts a bin of more positives by std::sort
constexpr int64_t kTopkChunk = 32;
constexpr int kLanes = 16;  // floats per AVX-512 vector
constexpr int kNaNOrInf = 0x01 | 0x08 | 0x10 | 0x80;  // VFPCLASSPS classes: quiet NaN, +inf, -inf, signalling NaN

// Exact comparisons need a type that holds every score value: float for half/bfloat16/float, double for double.
template <typename scalar_t>
using compare_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Positive scores of every label, gathered by one parallel row-major scan of the targets.
template <typename T>
struct PositivesByLabel {
  std::vector<int64_t> offsets;  // [L + 1]
  std::vector<T> values;         // label j's positives at [offsets[j], offsets[j + 1]), unsorted
};

// A positive found by a row scan: its label and score.
template <typename T>
struct PositiveHit {
  int32_t label;
  T value;
};

// A growing list of hits that appends without a check per element: room(n) makes space for n more and returns
// where they go; commit(m) keeps the first m written there. (std::vector::push_back per positive, whose size lives
// in memory: the row scan at the GZSL size 27.1 -> 25.3 ms with this.)
template <typename T>
class HitList {
 public:
  PositiveHit<T>* room(size_t n) {
    if (capacity_ - size_ < n) reserve(std::max(size_ + n, 2 * capacity_));
    return data_.get() + size_;
  }
  void commit(size_t m) { size_ += m; }
  void reserve(size_t n) {
    if (n <= capacity_) return;
    auto grown = std::make_unique_for_overwrite<PositiveHit<T>[]>(n);
    std::copy(begin(), end(), grown.get());
    data_ = std::move(grown);
    capacity_ = n;
  }
  const PositiveHit<T>* begin() const { return data_.get(); }
  const PositiveHit<T>* end() const { return data_.get() + size_; }

 private:
  std::unique_ptr<PositiveHit<T>[]> data_;
  size_t size_ = 0, capacity_ = 0;
};

// The CSR over labels of lists of hits (one list per chunk of rows): label j's positives are the lists' runs in list
// order. Each list counts its labels and later fills its own runs, both in parallel. allocate(total) returns the
// values' storage; offsets has L + 1 slots.
template <typename T, typename Allocate>
void hits_to_csr(const std::vector<HitList<T>>& lists, int64_t L, int64_t* offsets, Allocate&& allocate) {
  const int64_t num_lists = static_cast<int64_t>(lists.size());
  std::vector<int64_t> cursor(num_lists * L, 0);  // per (list, label): its count, then its next slot
  at::parallel_for(0, num_lists, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      for (const auto& h : lists[c]) ++cursor[c * L + h.label];
    }
  });
  int64_t total = 0;
  for (int64_t j = 0; j < L; ++j) {
    offsets[j] = total;
    for (int64_t c = 0; c < num_lists; ++c) {
      const int64_t in_list = cursor[c * L + j];
      cursor[c * L + j] = total;
      total += in_list;
    }
  }
  offsets[L] = total;
  T* const values = allocate(total);
  at::parallel_for(0, num_lists, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      for (const auto& h : lists[c]) values[cursor[c * L + h.label]++] = h.value;
    }
  });
}

// Whether any of the 8 int8 targets at p equals 1 (SWAR: a zero byte of x ^ 0x0101.. marks a 1).
inline bool any_byte_is_one(const int8_t* p) {
  uint64_t x;
  std::memcpy(&x, p, sizeof(x));
  x ^= 0x0101010101010101ULL;
  return ((x - 0x0101010101010101ULL) & ~x & 0x8080808080808080ULL) != 0;
}

// Finds the j < L with t[j] == 1 in increasing order, calls emit(c, j) for the c-th of them and returns how many
// there are; positives are sparse, so eight targets are skipped at a time.
template <typename Emit>
inline int64_t find_ones(const int8_t* t, int64_t L, Emit&& emit) {
  int64_t count = 0, j = 0;
  for (; j + 8 <= L; j += 8) {
    if (!any_byte_is_one(t + j)) continue;
    for (int64_t i = j; i < j + 8; ++i) {
      if (t[i] == 1) emit(count++, i);
    }
  }
  for (; j < L; ++j) {
    if (t[j] == 1) emit(count++, j);
  }
  return count;
}

#ifdef PYZSL_X86_SIMD
// PYZSL_NO_AVX512=1 forces the portable loops, so that the tests cover them on any machine.
inline bool avx512_enabled() {
  static const bool enabled = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                              __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                              __builtin_cpu_supports("bmi") && std::getenv("PYZSL_NO_AVX512") == nullptr;
  return enabled;
}

// 0, 1, ..., 15.
PYZSL_AVX512 inline __m512i lane_index() {
  return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

// Emits the set bits of `bits` as emit(c, base + bit) for c = count, count + 1, ... and returns count plus how many
// there are. The first kSpareSlots are emitted without a branch, so emit may also be called for up to kSpareSlots
// slots past the last set bit, with index `base` (the caller leaves room and overwrites or ignores them); a loop
// takes any more. (A loop over the set bits alone, whose trip count the data decides, mispredicts about once per
// word when set bits are sparse: the row scan at the GZSL size 25.7 -> 20.6 ms with this for the positives.)
template <typename Emit>
PYZSL_AVX512 inline int64_t emit_set_bits(uint64_t bits, int64_t base, int64_t count, Emit&& emit) {
  const int64_t total = count + __builtin_popcountll(bits);
  for (int64_t c = count; c < count + kSpareSlots; ++c) {
    emit(c, base + (_tzcnt_u64(bits) & 63));  // no bit left: tzcnt is 64
    bits = _blsr_u64(bits);
  }
  for (int64_t c = count + kSpareSlots; bits != 0; ++c, bits = _blsr_u64(bits)) emit(c, base + _tzcnt_u64(bits));
  return total;
}

// find_ones with AVX-512: one comparison per 64 targets, then emit_set_bits (so emit may see kSpareSlots slots past
// the last one, each with some j < L).
template <typename Emit>
PYZSL_AVX512 int64_t find_ones_avx512(const int8_t* t, int64_t L, Emit&& emit) {
  int64_t count = 0;
  for (int64_t j = 0; j < L; j += 64) {
    const __mmask64 lanes = L - j >= 64 ? ~__mmask64(0) : (__mmask64(1) << (L - j)) - 1;
    const uint64_t ones =
        _mm512_mask_cmpeq_epi8_mask(lanes, _mm512_maskz_loadu_epi8(lanes, t + j), _mm512_set1_epi8(1));
    count = emit_set_bits(ones, j, count, emit);
  }
  return count;
}
#endif

template <typename scalar_t, typename T = compare_t<scalar_t>>
PositivesByLabel<T> gather_positives(const scalar_t* scores, const int8_t* targets, const bool* row_mask, int64_t N,
                                     int64_t L) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads() * 4, N));
  const int64_t rows_per_chunk = (N + chunks - 1) / chunks;
  std::vector<HitList<T>> hits(chunks);
  // One row-major scan of the targets. The positives' scores are scattered over the rows' cache lines: each is
  // prefetched when found and read once kGatherBatch more have been found.
#ifdef PYZSL_X86_SIMD
  const bool use_avx512 = avx512_enabled();
#endif
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<std::pair<int32_t, int64_t>> pending;  // (label, flat index) of positives not read yet
    pending.reserve(kGatherBatch);
    std::vector<int32_t> ones(L + kSpareSlots);  // a row's positives' labels
    for (int64_t c = c0; c < c1; ++c) {
      auto flush = [&] {
        PositiveHit<T>* out = hits[c].room(pending.size());
        for (const auto& [label, index] : pending) *out++ = {label, static_cast<T>(scores[index])};
        hits[c].commit(pending.size());
        pending.clear();
      };
      auto found = [&](int64_t n, int64_t j) {
        __builtin_prefetch(scores + n * L + j);
        pending.emplace_back(static_cast<int32_t>(j), n * L + j);
        if (static_cast<int64_t>(pending.size()) == kGatherBatch) flush();
      };
      for (int64_t n = c * rows_per_chunk; n < std::min(N, (c + 1) * rows_per_chunk); ++n) {
        if (row_mask != nullptr && !row_mask[n]) continue;
        const auto emit = [&](int64_t slot, int64_t j) { ones[slot] = static_cast<int32_t>(j); };
#ifdef PYZSL_X86_SIMD
        const int64_t count =
            use_avx512 ? find_ones_avx512(targets + n * L, L, emit) : find_ones(targets + n * L, L, emit);
#else
        const int64_t count = find_ones(targets + n * L, L, emit);
#endif
        for (int64_t i = 0; i < count; ++i) found(n, ones[i]);
      }
      flush();
    }
  });
  PositivesByLabel<T> out;
  out.offsets.resize(L + 1);
  hits_to_csr(hits, L, out.offsets.data(), [&](int64_t total) {
    out.values.resize(total);
    return out.values.data();
  });
  return out;
}

// The bin of a score: monotone in v (sub, mul, clamp and truncation all preserve order), so bins never reorder
// scores. (v - lo) can overflow to inf, and inf * 0 is NaN when scale is 0 (one bin): max(0, NaN) is 0 here.
template <typename T>
inline int32_t bin_of(T v, T lo, T scale, T last_bin) {
  return static_cast<int32_t>(std::min(std::max(T(0), (v - lo) * scale), last_bin));
}

// Working arrays of LabelTable::build and average_precision, one set per thread for the call's labels (freed with
// the call, unlike thread_local ones, which a label of millions of positives would leave allocated).
struct TableScratch {
  std::vector<int32_t> bin_of_positive, bin_start, crowded_bins;
  std::vector<int64_t> before, placed;
};

// One label's table: its sorted positives and G ~ 2P equal-width bins over [lowest, highest positive].
template <typename T>
struct LabelTable {
  int64_t P = 0;
  // Scores in [lo, hi) are placed through the bins; scores >= hi are above every positive and only counted.
  T lo = std::numeric_limits<T>::infinity();
  T hi = std::numeric_limits<T>::infinity();
  T scale = 0;
  T last_bin = 0;
  std::vector<T> pos;         // ascending, then kInBinCompares +inf sentinels (branch-free reads past the end)
  std::vector<int32_t> bins;  // per bin: (#positives in lower bins) << 3 | min(#positives in the bin, 5)
  // The AVX-512 count's per-bin counts. A bin without positives counts its other annotated entries, which all share
  // the bucket of the positives in lower bins; the entries of a bin with positives go through place(). Up to
  // kBitmapBins bins, `holds_positive` flags those bins (a bit per bin), and only the in-range scores of the other
  // bins are counted. Beyond, such a bin's count is its entry with the top bit set, and kLanes spare slots after the
  // bins take the lanes outside [lo, hi), so that the loop needs no branch per lane. (The portable count places
  // every entry and leaves these counts at zero.)
  std::vector<int32_t> hist;
  std::vector<uint32_t> holds_positive;  // kBitmapBins bits when G <= kBitmapBins, else empty
  // count[m] = #other annotated entries placed with exactly m positives <= them, for m <= P.
  std::vector<int32_t> count;
  int64_t above = 0;          // other annotated entries >= hi
  // With the bitmap (P <= 4,096), the float AVX-512 count uses 16-bit copies: the bin entries (below << 3 fits), and
  // the counts of one run (a tile's column, at most kSmallCountRun scores), added into hist and count after it.
  // Half the bytes keep the placing's lookups in L1 (AP op at the GZSL size 122.3 -> 117.8 and 123.4 -> 117.2 ms).
  std::vector<uint16_t> bins16;
  std::vector<uint16_t> hist16, count16;

  // Sorts the positives by bin first: bins are monotone in the score, so the positives are then out of order only
  // within a bin (about two per bin). One pass of compare-exchanges, carrying the running maximum, sorts every bin of
  // one or two positives and leaves each bin's positives within the bin; the bins of three or more ("crowded") are
  // then sorted each on its own, by insertion, or by std::sort beyond kLargeBin positives (lopsided scores). The
  // loops run over the positives or straight over the bins, without branches the data decides (every label's table
  // and AP, without the counting, at the GZSL size: 17.8 -> 12.1 ms against sorting bin by bin and flagging bins in
  // a branch; 11.6 -> 10.7 ms against one insertion sort over all positives, whose inner loop's exit mispredicts).
  void build(const T* first, int64_t n, TableScratch& scratch) {
    P = n;
    pos.resize(P + kInBinCompares);
    std::fill(pos.begin() + P, pos.end(), std::numeric_limits<T>::infinity());
    count.assign(P + 1, 0);
    above = 0;
    lo = hi = std::numeric_limits<T>::infinity();
    if (P == 0) return;
    lo = hi = first[0];
    for (int64_t i = 1; i < P; ++i) {
      lo = std::min(lo, first[i]);
      hi = std::max(hi, first[i]);
    }
    const int64_t G = std::min<int64_t>(kBinsPerPositive * P, kMaxBins);
    last_bin = static_cast<T>(G - 1);
    scale = hi > lo ? static_cast<T>(G) / (hi - lo) : T(0);
    if (!std::isfinite(static_cast<double>(scale))) scale = 0;  // positives too close for the bin width: one bin
    std::vector<int32_t>& bin_of_positive = scratch.bin_of_positive;
    std::vector<int32_t>& bin_start = scratch.bin_start;
    std::vector<int32_t>& crowded_bins = scratch.crowded_bins;
    bins.assign(G, 0);
    bin_of_positive.resize(P);
    for (int64_t i = 0; i < P; ++i) {
      bin_of_positive[i] = bin_of(first[i], lo, scale, last_bin);
      ++bins[bin_of_positive[i]];  // positives per bin, for now
    }
    bin_start.resize(G);
    crowded_bins.resize(G);
    int64_t num_crowded = 0;
    int32_t below = 0;
    for (int64_t b = 0; b < G; ++b) {
      const int32_t in_bin = bins[b];
      crowded_bins[num_crowded] = static_cast<int32_t>(b);
      num_crowded += in_bin > 2;
      bins[b] = (below << 3) | std::min(in_bin, kInBinCompares + 1);
      bin_start[b] = below;
      below += in_bin;
    }
    hist.assign(G + kLanes, 0);
    if (G <= kBitmapBins) {
      if constexpr (std::is_same_v<T, float>) {  // only the float count (AVX-512) uses the 16-bit copies
        static_assert(((kBitmapBins / kBinsPerPositive) << 3 | 7) <= std::numeric_limits<uint16_t>::max(),
                      "a bin entry of a bitmap table fits 16 bits");
        bins16.assign(bins.begin(), bins.end());
        hist16.assign(G, 0);
        count16.assign(P + 1, 0);
      }
      holds_positive.assign(kBitmapBins / 32, 0);
      for (int64_t i = 0; i < P; ++i) {
        holds_positive[bin_of_positive[i] >> 5] |= uint32_t{1} << (bin_of_positive[i] & 31);
      }
    } else {
      bins16.clear();
      hist16.clear();
      count16.clear();
      holds_positive.clear();
      for (int64_t i = 0; i < P; ++i) hist[bin_of_positive[i]] = bins[bin_of_positive[i]] | kHoldsPositive;
    }
    for (int64_t i = 0; i < P; ++i) pos[bin_start[bin_of_positive[i]]++] = first[i];  // bin_start: now the ends
    if (P > 1) {  // a lower bin's positives are all below a higher bin's: the maximum carried stays in its bin
      T carry = pos[0];
      for (int64_t i = 1; i < P; ++i) {
        const T v = pos[i];
        pos[i - 1] = std::min(carry, v);
        carry = std::max(carry, v);
      }
      pos[P - 1] = carry;
    }
    for (int64_t c = 0; c < num_crowded; ++c) {
      T* const begin = pos.data() + (bins[crowded_bins[c]] >> 3);
      T* const end = pos.data() + bin_start[crowded_bins[c]];
      if (end - begin > kLargeBin) {
        std::sort(begin, end);
        continue;
      }
      for (T* p = begin + 1; p < end; ++p) {  // insertion sort
        const T v = *p;
        T* q = p;
        for (; q > begin && q[-1] > v; --q) *q = q[-1];
        *q = v;
      }
    }
  }

  // The bucket of a score v in [lo, hi) whose bin has this entry: how many positives are <= v. Lower bins'
  // positives are < v and higher bins' > v (the bin function is monotone), so only v's own bin is compared: its
  // first kInBinCompares positives without branches, any further ones (rare) in a loop that stops at hi > v. The
  // compared slots past the bin hold higher bins' positives or the +inf sentinels, all > v, so they need no mask;
  // and as the positives ascend, those <= v are a prefix: for float, one SSE comparison of four and the length of
  // its run of ones (AP at the GZSL size 182.7 -> 167.4 ms against three masked scalar comparisons).
  inline int64_t bucket(T v, int32_t entry) const {
    int64_t g = entry >> 3;
    const T* p = pos.data() + g;
#ifdef PYZSL_X86_SIMD
    if constexpr (std::is_same_v<T, float>) {
      static_assert(kInBinCompares == 4, "one SSE comparison of four");
      const int at_most_v = _mm_movemask_ps(_mm_cmple_ps(_mm_loadu_ps(p), _mm_set1_ps(v)));
      g += __builtin_ctz(~at_most_v);
    } else
#endif
    {
      for (int32_t i = 0; i < kInBinCompares; ++i) g += p[i] <= v;
    }
    if ((entry & 7) > kInBinCompares) {
      while (pos[g] <= v) ++g;
    }
    return g;
  }
  inline void place(T v, int32_t entry) { ++count[bucket(v, entry)]; }

  // Adds the 16-bit counts into hist and count, and zeroes them.
  void flush_small_counts() {
    for (size_t b = 0; b < hist16.size(); ++b) hist[b] += hist16[b];
    for (size_t m = 0; m < count16.size(); ++m) count[m] += count16[m];
    std::fill(hist16.begin(), hist16.end(), uint16_t{0});
    std::fill(count16.begin(), count16.end(), uint16_t{0});
  }

  // (1/P) * sum over positives p of pos(>= p) / annotated(>= p), walking tie groups from the top.
  double average_precision(TableScratch& scratch) const {
    if (P == 0) return 0.0;
    // The bins between two bins that hold positives share the bucket of the upper one's lowest positive; with
    // before[b] the counts of the bins below b that hold none, the positive pos[i] first in its bin takes
    // before[its bin] - before[pos[i - 1]'s bin], and the others of the bin take 0 (lo's bin holds a positive, so
    // nothing lies below it).
    std::vector<int64_t>& before = scratch.before;
    std::vector<int64_t>& placed = scratch.placed;
    const size_t G = bins.size();
    before.resize(G);
    int64_t running = 0;
    for (size_t b = 0; b < G; ++b) {
      before[b] = running;
      running += hist[b] * int64_t{(bins[b] & 7) == 0};  // a product, not a branch the data would mispredict
    }
    placed.assign(count.begin(), count.end());
    int64_t previous = 0;
    for (int64_t i = 0; i < P; ++i) {
      const int64_t here = before[bin_of(pos[i], lo, scale, last_bin)];
      placed[i] += here - previous;
      previous = here;
    }
    double sum = 0.0;
    int64_t negatives_at_or_above = above;  // count[P] stays 0: in-range scores are < hi
    int64_t end = P;
    while (end > 0) {
      int64_t begin = end - 1;
      while (begin > 0 && pos[begin - 1] == pos[end - 1]) --begin;
      const double positives_at_or_above = static_cast<double>(P - begin);
      sum += static_cast<double>(end - begin) * positives_at_or_above /
             (positives_at_or_above + static_cast<double>(negatives_at_or_above));
      for (int64_t m = begin; m < end; ++m) negatives_at_or_above += placed[m];
      end = begin;
    }
    return sum / static_cast<double>(P);
  }
};

// Counts a label's run of n buffered scores (NaN marks an entry that takes no part): above-range ones in `above`,
// in-range ones placed through the table. (A branch per score on whether its bin holds a positive, as the AVX-512
// count has it without branches, made this loop 15% slower.)
template <typename T>
void count_run(LabelTable<T>& table, const T* values, int64_t n) {
  int64_t above = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T v = values[i];
    above += v >= table.hi;
    if (v >= table.lo && v < table.hi) table.place(v, table.bins[bin_of(v, table.lo, table.scale, table.last_bin)]);
  }
  table.above += above;
}

#ifdef PYZSL_X86_SIMD

// A label's bin function for 16 scores at a time with AVX-512: the same IEEE operations as bin_of (subtract,
// multiply, max with 0, min, truncate), so every bin equals the scalar one the table was built with.
struct VectorBins {
  __m512 lo, hi, scale, last_bin;
  PYZSL_AVX512 explicit VectorBins(const LabelTable<float>& table)
      : lo(_mm512_set1_ps(table.lo)), hi(_mm512_set1_ps(table.hi)), scale(_mm512_set1_ps(table.scale)),
        last_bin(_mm512_set1_ps(table.last_bin)) {}
  // The bins of x's lanes; `inside` gets the lanes in [lo, hi) (not NaN) and `above` the count of those >= hi.
  PYZSL_AVX512 __m512i operator()(__m512 x, __mmask16 lanes, __mmask16& inside, int64_t& above) const {
    const __mmask16 at_least_lo = _mm512_mask_cmp_ps_mask(lanes, x, lo, _CMP_GE_OQ);  // false for NaN
    const __mmask16 at_least_hi = _mm512_mask_cmp_ps_mask(lanes, x, hi, _CMP_GE_OQ);
    above += __builtin_popcount(at_least_hi);
    inside = at_least_lo & ~at_least_hi;
    // MAXPS returns its second operand when the first is NaN, as std::max(0, NaN) returns 0. (Zero-masked forms
    // with every lane kept: the plain intrinsics pass an undefined vector that GCC 12 warns about.)
    const __m512 scaled = _mm512_mul_ps(_mm512_sub_ps(x, lo), scale);
    const __m512 t = _mm512_maskz_min_ps(0xFFFF, _mm512_maskz_max_ps(0xFFFF, scaled, _mm512_setzero_ps()), last_bin);
    return _mm512_maskz_cvttps_epi32(0xFFFF, t);
  }
};

// count_run with AVX-512 for a table of more than kBitmapBins bins, a block of kCountBlock scores at a time, in four
// passes over the block:
//   1. bins, 16 scores per vector; lanes outside [lo, hi) get spare slots (G + lane);
//   2. one scalar increment per score of its bin's count, without a branch: a bin holding a positive keeps its
//      entry (negative) and only hands it on;
//   3. the scores that met a negative count, with those entries, packed into a queue (AVX-512 compress);
//   4. the queued scores compared with their bin's positives and placed (LabelTable::place).
// About one score in six is queued at the GZSL size. The form before, which placed every score through gathers of
// its bin's entry and positives, took the AP op 0.204 s there against 0.177 s: a gather of 16 costs about 19 cycles
// on this machine's Zen 4 cores.
PYZSL_AVX512 void count_run_avx512(LabelTable<float>& table, const float* values, int64_t n) {
  alignas(64) int32_t bins[kCountBlock], prior[kCountBlock], queue_entry[kCountBlock + kLanes];
  alignas(64) float queue_x[kCountBlock + kLanes];
  const VectorBins bin_of16(table);
  const int32_t G = static_cast<int32_t>(table.bins.size());
  const __m512i spare = _mm512_add_epi32(_mm512_set1_epi32(G), lane_index());
  int32_t* const hist = table.hist.data();
  int64_t above = 0;
  for (int64_t b0 = 0; b0 < n; b0 += kCountBlock) {
    const float* const x0 = values + b0;
    const int64_t m = std::min(kCountBlock, n - b0);
    const int64_t vectors = (m + kLanes - 1) / kLanes;
    for (int64_t v = 0; v < vectors; ++v) {
      const int64_t i0 = v * kLanes;
      const __mmask16 lanes = m - i0 >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << (m - i0)) - 1);
      __mmask16 inside;
      const __m512i bin = bin_of16(_mm512_maskz_loadu_ps(lanes, x0 + i0), lanes, inside, above);
      _mm512_store_si512(bins + i0, _mm512_mask_mov_epi32(spare, inside, bin));
    }
    for (int64_t i = 0; i < vectors * kLanes; ++i) {
      const int32_t old = hist[bins[i]];
      hist[bins[i]] = old + 1 + (old >> 31);  // + 0 for a negative entry
      prior[i] = old;
    }
    int64_t num_queued = 0;
    for (int64_t v = 0; v < vectors; ++v) {
      const int64_t i0 = v * kLanes;
      const __m512i old = _mm512_load_si512(prior + i0);
      const __mmask16 queued = _mm512_movepi32_mask(old);  // spare slots and tail lanes never are
      _mm512_storeu_ps(queue_x + num_queued, _mm512_maskz_compress_ps(queued, _mm512_maskz_loadu_ps(queued, x0 + i0)));
      _mm512_storeu_si512(queue_entry + num_queued, _mm512_maskz_compress_epi32(queued, old));
      num_queued += __builtin_popcount(queued);
    }
    for (int64_t q = 0; q < num_queued; ++q) table.place(queue_x[q], queue_entry[q] & ~kHoldsPositive);
  }
  table.above += above;
}

// count_run with AVX-512 for a table of at most 512 * Pairs <= kBitmapBins bins. The flags of the bins that hold a
// positive stay in 2 * Pairs registers, so the vector pass itself picks the scores to place (a two-source permute
// per 1,024 bins brings each lane its flag word), packs them into the queue, and packs the bins of the other
// in-range scores for the scalar pass, which only increments: no prior count stored per score, no pass over the
// block to find the queued ones (AP op at the GZSL size 170.4 -> 159.9 ms against count_run_avx512 for every table),
// and no increment for a score below the range or queued, a third of them at the GZSL size (AP op 137.2 -> 128.6
// and 141.1 -> 127.6 ms against incrementing every score, the outside ones in spare slots). It counts in the table's
// 16-bit arrays (bins16, hist16, count16) and adds them into the 32-bit ones at the end of the run. Since those, the
// bitmap covers 8,192 bins in 16 registers, not 4,096 in 8 (AP op at the GZSL size 117.8 -> 114.1 ms; its labels of
// 2,048 to 4,096 positives 19.4 -> 16.8 ms): the 32-bit counts of count_run_avx512 leave L1 at that size.
template <int Pairs>
PYZSL_AVX512 void count_run_flagged_avx512(LabelTable<float>& table, const float* values, int64_t n) {
  static_assert(Pairs == 1 || Pairs == 2 || Pairs == 4 || Pairs == 8, "1,024, 2,048, 4,096 or 8,192 bins");
  alignas(64) int32_t counted_bin[kCountBlock + kLanes], queue_bin[kCountBlock + kLanes];
  alignas(64) float queue_x[kCountBlock + kLanes];
  const VectorBins bin_of16(table);
  const __m512i low5 = _mm512_set1_epi32(31), one = _mm512_set1_epi32(1);
  __m512i words[2 * Pairs];  // word w of the bitmap: register w / 16, lane w % 16
  for (int r = 0; r < 2 * Pairs; ++r) words[r] = _mm512_loadu_si512(table.holds_positive.data() + kLanes * r);
  TORCH_INTERNAL_ASSERT(n <= kSmallCountRun, "a run's 16-bit counts could overflow");
  uint16_t* const hist16 = table.hist16.data();
  uint16_t* const count16 = table.count16.data();
  const uint16_t* const entries16 = table.bins16.data();
  int64_t above = 0;
  for (int64_t b0 = 0; b0 < n; b0 += kCountBlock) {
    const float* const x0 = values + b0;
    const int64_t m = std::min(kCountBlock, n - b0);
    const int64_t vectors = (m + kLanes - 1) / kLanes;
    int64_t num_queued = 0, num_counted = 0;
    for (int64_t v = 0; v < vectors; ++v) {
      const int64_t i0 = v * kLanes;
      const __mmask16 lanes = m - i0 >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << (m - i0)) - 1);
      const __m512 x = _mm512_maskz_loadu_ps(lanes, x0 + i0);
      __mmask16 inside;
      const __m512i bin = bin_of16(x, lanes, inside, above);
      // The lane's flag word: bits 0-4 of its index pick a lane of a register pair (one permute per pair), then
      // bit 5 picks between pairs 2q and 2q + 1, bit 6 between those picks, and so on.
      const __m512i w = _mm512_maskz_srli_epi32(0xFFFF, bin, 5);
      __m512i word[Pairs];
      for (int q = 0; q < Pairs; ++q) word[q] = _mm512_permutex2var_epi32(words[2 * q], w, words[2 * q + 1]);
      for (int bit = 5, left = Pairs; left > 1; ++bit, left /= 2) {
        const __mmask16 upper = _mm512_test_epi32_mask(w, _mm512_set1_epi32(1 << bit));
        for (int q = 0; q < left / 2; ++q) word[q] = _mm512_mask_mov_epi32(word[2 * q], upper, word[2 * q + 1]);
      }
      const __m512i flags = _mm512_maskz_srlv_epi32(0xFFFF, word[0], _mm512_and_si512(bin, low5));
      const __mmask16 queued = _mm512_mask_test_epi32_mask(inside, flags, one);
      // Only the in-range scores whose bin holds no positive are counted per bin: the others' counts would go unused.
      const __mmask16 counted = inside & ~queued;
      _mm512_storeu_si512(counted_bin + num_counted, _mm512_maskz_compress_epi32(counted, bin));
      num_counted += __builtin_popcount(counted);
      _mm512_storeu_ps(queue_x + num_queued, _mm512_maskz_compress_ps(queued, x));
      _mm512_storeu_si512(queue_bin + num_queued, _mm512_maskz_compress_epi32(queued, bin));
      num_queued += __builtin_popcount(queued);
    }
    for (int64_t i = 0; i < num_counted; ++i) ++hist16[counted_bin[i]];
    for (int64_t q = 0; q < num_queued; ++q) ++count16[table.bucket(queue_x[q], entries16[queue_bin[q]])];
  }
  table.flush_small_counts();
  table.above += above;
}

// The AVX-512 count for this table's size.
PYZSL_AVX512 void count_run_any_avx512(LabelTable<float>& table, const float* values, int64_t n) {
  const size_t G = table.bins.size();
  if (G <= 1024) {
    count_run_flagged_avx512<1>(table, values, n);
  } else if (G <= 2048) {
    count_run_flagged_avx512<2>(table, values, n);
  } else if (G <= 4096) {
    count_run_flagged_avx512<4>(table, values, n);
  } else if (G <= kBitmapBins) {
    count_run_flagged_avx512<8>(table, values, n);
  } else {
    count_run_avx512(table, values, n);
  }
}
#endif

// Copies rows [n0, n1) of columns [j0, j0 + width) into `buffer` column by column (column b at b * stride) and sets
// run[b] to the length of column b's run. Here every kept row gets a slot: an entry that takes no part (a positive,
// or unannotated under the ignore rule) becomes NaN, which count_run passes over.
template <typename scalar_t, typename T>
void fill_tile(const scalar_t* scores, const int8_t* targets, const bool* row_mask, int64_t L, int64_t n0, int64_t n1,
               int64_t j0, int64_t width, int8_t max_negative, T* buffer, int64_t stride, int32_t* run) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  int32_t r = 0;
  for (int64_t n = n0; n < n1; ++n) {
    if (row_mask != nullptr && !row_mask[n]) continue;
    const scalar_t* s = scores + n * L + j0;
    const int8_t* t = targets + n * L + j0;
    for (int64_t b = 0; b < width; ++b) buffer[b * stride + r] = t[b] <= max_negative ? static_cast<T>(s[b]) : nan;
    ++r;
  }
  std::fill(run, run + width, r);
}

#ifdef PYZSL_X86_SIMD
// The same for float with AVX-512, keeping only the entries that take part: 16 columns per instruction, each
// appended at its own run length (a masked scatter), so a mostly unannotated matrix leaves short runs to count.
PYZSL_AVX512 void fill_tile_avx512(const float* scores, const int8_t* targets, const bool* row_mask, int64_t L,
                                   int64_t n0, int64_t n1, int64_t j0, int64_t width, int8_t max_negative,
                                   float* buffer, int64_t stride, int32_t* run) {
  const __m128i max_neg = _mm_set1_epi8(max_negative);
  const __m512i column = _mm512_mullo_epi32(lane_index(), _mm512_set1_epi32(static_cast<int32_t>(stride)));
  const __m512i one = _mm512_set1_epi32(1);
  std::fill(run, run + width, 0);
  for (int64_t n = n0; n < n1; ++n) {
    if (row_mask != nullptr && !row_mask[n]) continue;
    const float* s = scores + n * L + j0;
    const int8_t* t = targets + n * L + j0;
    for (int64_t b = 0; b < width; b += 16) {
      const __mmask16 lanes = width - b >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (width - b)) - 1);
      const __mmask16 take = _mm_mask_cmple_epi8_mask(lanes, _mm_maskz_loadu_epi8(lanes, t + b), max_neg);
      if (take == 0) continue;
      const __m512i length = _mm512_maskz_loadu_epi32(lanes, run + b);
      _mm512_mask_i32scatter_ps(buffer + b * stride, take, _mm512_add_epi32(column, length),
                                _mm512_maskz_loadu_ps(lanes, s + b), 4);
      _mm512_mask_storeu_epi32(run + b, lanes, _mm512_mask_add_epi32(length, take, length, one));
    }
  }
}

// r[i] becomes the i-th column of the 16 x 16 block r: 32-bit, 64-bit, then two 128-bit interleaves.
PYZSL_AVX512 inline void transpose16(__m512 r[16]) {
  // Zero-masked forms with every lane kept, as in classify16.
  constexpr __mmask16 all16 = 0xFFFF;
  constexpr __mmask8 all8 = 0xFF;
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_maskz_unpacklo_ps(all16, r[i], r[i + 1]);
    t[i + 1] = _mm512_maskz_unpackhi_ps(all16, r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    for (int j = 0; j < 2; ++j) {  // 64-bit pairs of t[i + j] and t[i + j + 2]
      const __m512d x = _mm512_castps_pd(t[i + j]), y = _mm512_castps_pd(t[i + j + 2]);
      r[i + 2 * j] = _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(all8, x, y));
      r[i + 2 * j + 1] = _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(all8, x, y));
    }
  }
  for (int h = 0; h < 16; h += 8) {
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_maskz_shuffle_f32x4(all16, r[h + i], r[h + 4 + i], 0x88);
      t[h + 4 + i] = _mm512_maskz_shuffle_f32x4(all16, r[h + i], r[h + 4 + i], 0xdd);
    }
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_maskz_shuffle_f32x4(all16, t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_maskz_shuffle_f32x4(all16, t[i], t[8 + i], 0xdd);
  }
}

// fill_tile for a densely annotated matrix with AVX-512: every kept row gets a slot in every column (an entry that
// takes no part is NaN, as in fill_tile), so the copy is a transpose of 16 x 16 blocks instead of scatters. The tile
// is far larger than the caches, so whole lines are written with streaming stores, which skip reading each line
// before writing it (AP at the GZSL size 0.246 -> 0.223 s); `buffer` and `stride` keep every line aligned.
PYZSL_AVX512 void fill_tile_dense_avx512(const float* scores, const int8_t* targets, const bool* row_mask, int64_t L,
                                         int64_t n0, int64_t n1, int64_t j0, int64_t width, int8_t max_negative,
                                         float* buffer, int64_t stride, int32_t* run) {
  thread_local std::vector<int64_t> rows;
  rows.clear();
  for (int64_t n = n0; n < n1; ++n) {
    if (row_mask == nullptr || row_mask[n]) rows.push_back(n);
  }
  const int64_t kept = static_cast<int64_t>(rows.size());
  const __m512 nan = _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN());
  const __m128i max_neg = _mm_set1_epi8(max_negative);
  __m512 block[16];
  for (int64_t r0 = 0; r0 < kept; r0 += 16) {
    const int64_t height = std::min<int64_t>(16, kept - r0);
    const __mmask16 filled = height == 16 ? __mmask16(0xFFFF) : __mmask16((1u << height) - 1);
    for (int64_t b = 0; b < width; b += 16) {
      const __mmask16 lanes = width - b >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (width - b)) - 1);
      for (int k = 0; k < 16; ++k) {
        if (k >= height) {
          block[k] = nan;
          continue;
        }
        const int64_t offset = rows[r0 + k] * L + j0 + b;
        const __mmask16 take = _mm_mask_cmple_epi8_mask(lanes, _mm_maskz_loadu_epi8(lanes, targets + offset), max_neg);
        block[k] = _mm512_mask_loadu_ps(nan, take, scores + offset);
      }
      transpose16(block);
      for (int64_t c = 0; c < std::min<int64_t>(16, width - b); ++c) {
        float* const line = buffer + (b + c) * stride + r0;
        if (height == kLanes) {
          _mm512_stream_ps(line, block[c]);
        } else {
          _mm512_mask_storeu_ps(line, filled, block[c]);
        }
      }
    }
  }
  _mm_sfence();  // the streaming stores are weakly ordered: complete them before the buffer is read
  std::fill(run, run + width, static_cast<int32_t>(kept));
}
#endif

// A thread's tile buffer: uninitialised (the tile copy writes every slot that is read) and 2 MiB-aligned, so that
// Linux may back it with huge pages. The copy writes 16 columns at once, each in another 4 KiB page; huge pages
// spare those TLB misses (AP at the GZSL size 0.255 -> 0.240 s).
class TileBuffer {
 public:
  explicit TileBuffer(size_t bytes) {
    constexpr size_t kHugePage = size_t{1} << 21;
    bytes_ = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    data_.reset(std::aligned_alloc(kHugePage, bytes_));
    TORCH_CHECK(data_ != nullptr, "multilabel_ap: could not allocate a tile buffer of ", bytes_, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(data_.get(), bytes_, MADV_HUGEPAGE);  // a hint: without huge pages the buffer works the same
#endif
  }
  size_t bytes() const { return bytes_; }
  template <typename T>
  T* data() const {
    return static_cast<T*>(data_.get());
  }

 private:
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<void, Free> data_;
  size_t bytes_;
};

// The tile buffers outlive the call: a thread lends one for its span and gives it back, so that the next evaluation
// does not fault in, and have the kernel zero, some 64 MiB per thread again (AP op at the GZSL size 123.3 -> 119.1
// ms). The pool keeps at most one buffer per thread that ran the AP kernel at once, and kMaxKeptTileBytes in all
// (a buffer given back beyond that is freed); empty_cache() frees them all (pyzsl.metrics.empty_cache()).
class TileBufferPool {
 public:
  static TileBufferPool& instance() {
    static TileBufferPool pool;
    return pool;
  }
  // The smallest kept buffer of at least `bytes`, else a new one (and a kept one too small goes, so that growing
  // inputs do not pile up buffers).
  std::unique_ptr<TileBuffer> lend(size_t bytes) {
    std::unique_ptr<TileBuffer> too_small;  // freed after the lock is released
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto fit = kept_.end();
      for (auto it = kept_.begin(); it != kept_.end(); ++it) {
        if ((*it)->bytes() >= bytes && (fit == kept_.end() || (*it)->bytes() < (*fit)->bytes())) fit = it;
      }
      if (fit != kept_.end()) {
        std::unique_ptr<TileBuffer> lent = std::move(*fit);
        kept_.erase(fit);
        return lent;
      }
      if (!kept_.empty()) {
        too_small = std::move(kept_.back());
        kept_.pop_back();
      }
    }
    return std::make_unique<TileBuffer>(bytes);
  }
  void give_back(std::unique_ptr<TileBuffer> buffer) {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t kept_bytes = buffer->bytes();
    for (const auto& kept : kept_) kept_bytes += kept->bytes();
    if (kept_bytes <= kMaxKeptTileBytes) kept_.push_back(std::move(buffer));
  }
  // Frees the kept buffers and returns their size in bytes.
  int64_t clear() {
    std::vector<std::unique_ptr<TileBuffer>> freed;
    std::lock_guard<std::mutex> lock(mutex_);
    freed.swap(kept_);
    int64_t bytes = 0;
    for (const auto& buffer : freed) bytes += static_cast<int64_t>(buffer->bytes());
    return bytes;
  }

 private:
  std::mutex mutex_;
  std::vector<std::unique_ptr<TileBuffer>> kept_;
};

// A buffer lent by the pool for a scope.
class TileLease {
 public:
  explicit TileLease(size_t bytes) : buffer_(TileBufferPool::instance().lend(bytes)) {}
  ~TileLease() { TileBufferPool::instance().give_back(std::move(buffer_)); }
  TileLease(const TileLease&) = delete;
  TileLease& operator=(const TileLease&) = delete;
  template <typename T>
  T* data() const {
    return buffer_->data<T>();
  }

 private:
  std::unique_ptr<TileBuffer> buffer_;
};

// Whether most entries take part in AP (target <= max_negative), judged on up to 256 evenly spaced rows: then the
// tile copy gives every row a slot (a transpose), else it keeps only the entries that take part.
inline bool mostly_annotated(const int8_t* targets, int64_t N, int64_t L, int8_t max_negative) {
  if (max_negative >= 0) return true;  // unannotated entries count as negatives: only positives take no part
  const int64_t sample = std::min<int64_t>(N, 256);
  int64_t taking = 0;
  for (int64_t i = 0; i < sample; ++i) {
    const int8_t* t = targets + (i * N / sample) * L;
    for (int64_t j = 0; j < L; ++j) taking += t[j] <= max_negative;
  }
  return 2 * taking > sample * L;
}

// `given_offsets` / `given_values`: the positives of the rows in row_mask as a CSR over labels, or null to gather them.
template <typename scalar_t, typename T = compare_t<scalar_t>>
void ap_kernel(const scalar_t* scores, const int8_t* targets, const bool* row_mask, int64_t N, int64_t L,
               bool unannotated_is_negative, const int64_t* given_offsets, const T* given_values, double* ap,
               int64_t* num_positives) {
  PositivesByLabel<T> gathered;
  if (given_offsets == nullptr) gathered = gather_positives<scalar_t>(scores, targets, row_mask, N, L);
  const int64_t* offsets = given_offsets != nullptr ? given_offsets : gathered.offsets.data();
  const T* values = given_offsets != nullptr ? given_values : gathered.values.data();
  // Entries with target <= this value are "other annotated": -1 always, 0 when unannotated counts as negative.
  const int8_t max_negative = unannotated_is_negative ? 0 : -1;
#ifdef PYZSL_X86_SIMD
  const bool use_avx512 = avx512_enabled();
#endif
  // Each thread owns a contiguous range of labels and reads its part of the rows in order, a tile of rows at a
  // time, which the hardware prefetchers follow. The tile is first copied column by column into a thread-local
  // buffer; then each label's run of the buffer is counted with its table hot in cache. (Reading the score matrix
  // column-wise instead stalls on memory; keeping every label's table busy at once thrashes the cache.)
  const bool dense = N > 0 && mostly_annotated(targets, N, L, max_negative);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t span = std::max<int64_t>(kMinLabelSpan, (L + threads - 1) / threads);
  const int64_t num_spans = (L + span - 1) / span;
  at::parallel_for(0, num_spans, 1, [&](int64_t span_begin, int64_t span_end) {
    // No taller than the matrix: a small input would otherwise fault in (and have zeroed) a whole tile buffer.
    const int64_t tile_rows = std::min(
        (dense ? std::clamp<int64_t>(kDenseTileElements / span, kMinTileRows, kDenseMaxTileRows)
               : std::clamp<int64_t>(kTileElements / span, kMinTileRows, kMaxTileRows)) / kLanes * kLanes,
        (N + kLanes - 1) / kLanes * kLanes);
    // Not a power of two, so that columns do not share cache sets; a multiple of 16, so that every column starts
    // on a cache line (the dense copy's streaming stores need whole aligned lines).
    const int64_t stride = tile_rows + kLanes;
    const TileLease buffer(static_cast<size_t>(span * stride) * sizeof(T));
    std::vector<LabelTable<T>> tables(span);
    TableScratch scratch;
    std::vector<int32_t> run(span);  // per column of the tile: how many of its buffer slots are filled
    for (int64_t s = span_begin; s < span_end; ++s) {
      const int64_t j0 = s * span, width = std::min(span, L - j0);
      for (int64_t b = 0; b < width; ++b) {
        tables[b].build(values + offsets[j0 + b], offsets[j0 + b + 1] - offsets[j0 + b], scratch);
      }
      for (int64_t n0 = 0; n0 < N; n0 += tile_rows) {
        const int64_t n1 = std::min(N, n0 + tile_rows);
#ifdef PYZSL_X86_SIMD
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (use_avx512 && dense) {
            fill_tile_dense_avx512(scores, targets, row_mask, L, n0, n1, j0, width, max_negative, buffer.data<T>(),
                                   stride, run.data());
          } else if (use_avx512) {
            fill_tile_avx512(scores, targets, row_mask, L, n0, n1, j0, width, max_negative, buffer.data<T>(), stride,
                             run.data());
          } else {
            fill_tile(scores, targets, row_mask, L, n0, n1, j0, width, max_negative, buffer.data<T>(), stride,
                      run.data());
          }
        } else
#endif
        {
          fill_tile(scores, targets, row_mask, L, n0, n1, j0, width, max_negative, buffer.data<T>(), stride,
                    run.data());
        }
        for (int64_t b = 0; b < width; ++b) {
          if (tables[b].P == 0) continue;  // AP 0: its scores need no counting
#ifdef PYZSL_X86_SIMD
          if constexpr (std::is_same_v<T, float>) {
            if (use_avx512) {
              count_run_any_avx512(tables[b], buffer.data<T>() + b * stride, run[b]);
              continue;
            }
          }
#endif
          count_run(tables[b], buffer.data<T>() + b * stride, run[b]);
        }
      }
      for (int64_t b = 0; b < width; ++b) {
        ap[j0 + b] = tables[b].average_precision(scratch);
        num_positives[j0 + b] = tables[b].P;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> ap_cpu(const at::Tensor& scores_in, const at::Tensor& targets_in,
                                          const std::optional<at::Tensor>& row_mask_in, bool unannotated_is_negative,
                                          const at::Tensor* positive_scores, const at::Tensor* positive_offsets,
                                          const char* op) {
  check_scores_targets(scores_in, targets_in, op);
  check_row_mask(row_mask_in, scores_in, op);
  const auto scores = scores_in.contiguous();
  const auto targets = targets_in.contiguous();
  std::optional<at::Tensor> row_mask;
  if (row_mask_in.has_value()) row_mask = row_mask_in->contiguous();
  const int64_t N = scores.size(0), L = scores.size(1);
  // Bucket counts are int32, and bin entries pack a count of positives (at most N) shifted left by 3 bits.
  TORCH_CHECK_VALUE(N < (int64_t{1} << 28), op, ": at most 2^28 rows per call, got ", N);
  at::Tensor values, offsets;
  if (positive_scores != nullptr) {
    const auto compare_type = scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK_VALUE(positive_scores->dim() == 1 && positive_scores->scalar_type() == compare_type, op,
                      ": positive_scores must be 1-D ", compare_type, ", got ", positive_scores->scalar_type(),
                      " of shape ", positive_scores->sizes());
    TORCH_CHECK_VALUE(positive_offsets->dim() == 1 && positive_offsets->scalar_type() == at::kLong &&
                          positive_offsets->size(0) == L + 1,
                      op, ": positive_offsets must be 1-D int64 of size L + 1 = ", L + 1, ", got ",
                      positive_offsets->scalar_type(), " of shape ", positive_offsets->sizes());
    values = positive_scores->contiguous();
    offsets = positive_offsets->contiguous();
    const int64_t* o = offsets.const_data_ptr<int64_t>();
    TORCH_CHECK_VALUE(o[0] == 0 && o[L] == values.numel(), op, ": positive_offsets must run from 0 to ",
                      values.numel(), " (the size of positive_scores), got ", o[0], " to ", o[L]);
    for (int64_t j = 0; j < L; ++j) {
      TORCH_CHECK_VALUE(o[j] <= o[j + 1] && o[j + 1] - o[j] <= N, op,
                        ": positive_offsets must be non-decreasing steps of at most N, got ", o[j], " then ",
                        o[j + 1], " at label ", j);
    }
  }
  auto ap = at::zeros({L}, scores.options().dtype(at::kDouble));
  auto num_positives = at::zeros({L}, scores.options().dtype(at::kLong));
  if (N == 0 || L == 0) return {ap, num_positives};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "multilabel_ap_cpu", [&] {
    using T = compare_t<scalar_t>;
    ap_kernel<scalar_t>(scores.const_data_ptr<scalar_t>(), targets.const_data_ptr<int8_t>(),
                        row_mask.has_value() ? row_mask->const_data_ptr<bool>() : nullptr, N, L,
                        unannotated_is_negative, values.defined() ? offsets.const_data_ptr<int64_t>() : nullptr,
                        values.defined() ? values.const_data_ptr<T>() : nullptr, ap.mutable_data_ptr<double>(),
                        num_positives.mutable_data_ptr<int64_t>());
  });
  return {ap, num_positives};
}

std::tuple<at::Tensor, at::Tensor> multilabel_ap_cpu(const at::Tensor& scores, const at::Tensor& targets,
                                                     const std::optional<at::Tensor>& row_mask,
                                                     bool unannotated_is_negative) {
  return ap_cpu(scores, targets, row_mask, unannotated_is_negative, nullptr, nullptr, "multilabel_ap");
}

std::tuple<at::Tensor, at::Tensor> multilabel_ap_given_positives_cpu(const at::Tensor& scores,
                                                                     const at::Tensor& targets,
                                                                     const std::optional<at::Tensor>& row_mask,
                                                                     bool unannotated_is_negative,
                                                                     const at::Tensor& positive_scores,
                                                                     const at::Tensor& positive_offsets) {
  return ap_cpu(scores, targets, row_mask, unannotated_is_negative, &positive_scores, &positive_offsets,
                "multilabel_ap_given_positives");
}

// The k best (score, index) pairs of a row so far, best first; ties keep the lower index first.
template <typename T>
struct TopKBuffer {
  std::vector<T> best;
  std::vector<int64_t> index;
  int64_t kept, filled = 0;
  explicit TopKBuffer(int64_t k) : best(k), index(k), kept(k) {}
  bool full() const { return filled == kept; }
  T kth() const { return best[kept - 1]; }  // the k-th best, once full

  // Scores must be offered in increasing index order: a later index enters only when strictly better than the k-th.
  inline void offer(T v, int64_t j) {
    if (filled == kept && !(v > best[kept - 1])) return;
    int64_t pos = filled < kept ? filled++ : kept - 1;
    while (pos > 0 && best[pos - 1] < v) {
      best[pos] = best[pos - 1];
      index[pos] = index[pos - 1];
      --pos;
    }
    best[pos] = v;
    index[pos] = j;
  }
};

// Portable row scan: once k scores are in, one comparison of each chunk with the k-th best gives the lanes to offer.
template <typename scalar_t, typename T>
void topk_row(const scalar_t* s, int64_t L, TopKBuffer<T>& top) {
  int64_t j = 0;
  for (; j < L && !top.full(); ++j) top.offer(static_cast<T>(s[j]), j);
  for (; j + kTopkChunk <= L; j += kTopkChunk) {
    const T threshold = top.kth();
    uint32_t above = 0;
    for (int64_t i = 0; i < kTopkChunk; ++i) above |= static_cast<uint32_t>(static_cast<T>(s[j + i]) > threshold) << i;
    for (; above != 0; above &= above - 1) {
      const int64_t i = j + __builtin_ctz(above);
      top.offer(static_cast<T>(s[i]), i);
    }
  }
  for (; j < L; ++j) top.offer(static_cast<T>(s[j]), j);
}

#ifdef PYZSL_X86_SIMD
// The k <= 16 best of a row in registers, for float rows with AVX-512: scores best first in `best`, their indices
// in `index`. Entries must be offered in index order.
struct TopKRegisters {
  __m512 best;
  __m512i index;
  int64_t kept, filled = 0;
  PYZSL_AVX512 explicit TopKRegisters(int64_t k)
      : best(_mm512_set1_ps(-std::numeric_limits<float>::infinity())), index(_mm512_setzero_si512()), kept(k) {}
  // An offered score's place is the number of kept scores >= it (equal ones keep their lower index first); the
  // kept lanes from that place on move one lane up by a permute, so no branch depends on the place.
  PYZSL_AVX512 void offer(float v, int64_t j) {
    const __m512 value = _mm512_set1_ps(v);
    const int place = __builtin_popcount(_mm512_mask_cmp_ps_mask(__mmask16((1u << filled) - 1), best, value,
                                                                 _CMP_GE_OQ));
    if (place >= kept) return;
    const __m512i lane = lane_index();
    const __mmask16 at = __mmask16(1u << place);
    const __m512i from = _mm512_mask_sub_epi32(lane, __mmask16(~0u << (place + 1)), lane, _mm512_set1_epi32(1));
    best = _mm512_mask_mov_ps(_mm512_maskz_permutexvar_ps(0xFFFF, from, best), at, value);
    index = _mm512_mask_mov_epi32(_mm512_maskz_permutexvar_epi32(0xFFFF, from, index), at,
                                  _mm512_set1_epi32(static_cast<int32_t>(j)));
    filled += filled < kept;
  }

  PYZSL_AVX512 void copy_indices_to(TopKBuffer<float>& out) const {
    alignas(64) int32_t lanes[16];
    _mm512_store_si512(lanes, index);
    for (int64_t r = 0; r < filled; ++r) out.index[r] = lanes[r];
    out.filled = filled;
  }
};

static_assert(kTopkChunk == 32, "topk_row_avx512 reads a chunk as two vectors of 16");
// topk_row for a float row with AVX-512 (k > 16): the same scan, with the chunk comparison inline.
PYZSL_AVX512 void topk_row_avx512(const float* s, int64_t L, TopKBuffer<float>& top) {
  int64_t j = 0;
  for (; j < L && !top.full(); ++j) top.offer(s[j], j);
  __m512 threshold = _mm512_set1_ps(top.kth());
  for (; j + kTopkChunk <= L; j += kTopkChunk) {
    const uint32_t high = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + j + 16), threshold, _CMP_GT_OQ);
    uint32_t above = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + j), threshold, _CMP_GT_OQ) | (high << 16);
    if (above == 0) continue;
    for (; above != 0; above &= above - 1) {
      const int64_t i = j + __builtin_ctz(above);
      top.offer(s[i], i);
    }
    threshold = _mm512_set1_ps(top.kth());
  }
  for (; j < L; ++j) top.offer(s[j], j);
}

// The k-th largest (k <= 16) of a float row's 16 lane maxima (lane i: entries i, i + 16, ...; NaN ignored). Those
// maxima are 16 distinct entries, so at least k entries are >= it and none below it can be among the k best. The same
// pass sets `finite` to whether every entry is finite: the row scan's check of the scores costs no read of its own
// (row scan at the GZSL size 29.5 -> 26.8 ms).
PYZSL_AVX512 float lane_maxima_bound(const float* s, int64_t L, int64_t k, bool& finite) {
  __m512 maxima = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 nonfinite = 0;
  for (int64_t j = 0; j < L; j += kLanes) {
    const __mmask16 lanes = L - j >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << (L - j)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(lanes, s + j);
    nonfinite |= _mm512_mask_fpclass_ps_mask(lanes, x, kNaNOrInf);
    // MAXPS returns its second operand when either is NaN: the running maxima stay numbers.
    maxima = _mm512_mask_max_ps(maxima, lanes, x, maxima);
  }
  finite = nonfinite == 0;
  // Each lane's rank: how many lanes hold more (the others come round by a rotating permute). The lanes ranked
  // below k are the k best with any ties of the k-th, whose smallest is the k-th largest. No branch, unlike
  // std::nth_element (the row scan at the GZSL size 38.3 -> 30.5 ms). MAXPS above returns its second operand
  // when either is NaN, so the maxima are numbers (-inf for a lane past a short row) and the comparisons exact.
  __m512i greater = _mm512_setzero_si512(), from = lane_index();
  const __m512i one = _mm512_set1_epi32(1), last = _mm512_set1_epi32(kLanes - 1);
  for (int r = 1; r < kLanes; ++r) {
    from = _mm512_and_si512(_mm512_add_epi32(from, one), last);
    const __m512 other = _mm512_maskz_permutexvar_ps(0xFFFF, from, maxima);
    greater = _mm512_mask_add_epi32(greater, _mm512_cmp_ps_mask(other, maxima, _CMP_GT_OQ), greater, one);
  }
  const __mmask16 among_best = _mm512_cmplt_epi32_mask(greater, _mm512_set1_epi32(static_cast<int32_t>(k)));
  // Their minimum, by halving (zero-masked forms with every lane kept, as above).
  __m512 v = _mm512_mask_mov_ps(_mm512_set1_ps(std::numeric_limits<float>::infinity()), among_best, maxima);
  v = _mm512_maskz_min_ps(0xFFFF, v, _mm512_maskz_shuffle_f32x4(0xFFFF, v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm512_maskz_min_ps(0xFFFF, v, _mm512_maskz_shuffle_f32x4(0xFFFF, v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  v = _mm512_maskz_min_ps(0xFFFF, v, _mm512_maskz_permute_ps(0xFFFF, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm512_maskz_min_ps(0xFFFF, v, _mm512_maskz_permute_ps(0xFFFF, v, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_cvtss_f32(v);
}

// topk_row_avx512 for k <= 16 in two passes: the lane maxima give a bound on the k-th best first, so the scan offers
// only the few entries >= it, in index order, instead of raising its threshold entry by entry from the row's start.
// At k = 5, against the one pass with the threshold in registers: 0.042 -> 0.030 s at the GZSL size (1,006 labels).
// Since the bound takes no std::nth_element, it is also faster on long rows, whose second pass reads them from L2
// (60M entries: 19.4 -> 14.3 ms at 3,000 labels, 16.8 -> 15.3 ms at 12,000, 19.3 -> 17.4 ms at 30,000; 40,000 x
// 7,586 Open-Images-like: 66.0 -> 53.7 ms), so it serves every row length. The entries >= the bound are gathered
// by emit_set_bits a block at a time, then offered (the row scan at the GZSL size 20.7 -> 18.6 ms against a loop
// over each 32 entries' set bits).
// Returns whether every score of the row is finite.
PYZSL_AVX512 bool topk_row_bounded_avx512(const float* s, int64_t L, int64_t k, TopKRegisters& top) {
  bool finite;
  const float bound = lane_maxima_bound(s, L, k, finite);
  const __m512 bound16 = _mm512_set1_ps(bound);
  // A block's entries >= bound, in index order, by emit_set_bits, then offered.
  int32_t candidates[kCandidateBlock + kSpareSlots];
  const auto emit = [&](int64_t c, int64_t j) { candidates[c] = static_cast<int32_t>(j); };
  for (int64_t j0 = 0; j0 < L; j0 += kCandidateBlock) {
    const int64_t j1 = std::min(L, j0 + kCandidateBlock);
    int64_t count = 0;
    for (int64_t j = j0; j < j1; j += 64) {
      uint64_t at_least = 0;
      for (int64_t q = 0; q < 4; ++q) {
        const int64_t i = j + q * kLanes;
        const __mmask16 lanes = j1 - i >= kLanes ? __mmask16(0xFFFF) : j1 > i ? __mmask16((1u << (j1 - i)) - 1) : 0;
        at_least |= uint64_t{_mm512_mask_cmp_ps_mask(lanes, _mm512_maskz_loadu_ps(lanes, s + i), bound16, _CMP_GE_OQ)}
                    << (q * kLanes);
      }
      count = emit_set_bits(at_least, j, count, emit);
    }
    for (int64_t c = 0; c < count; ++c) top.offer(s[candidates[c]], candidates[c]);
  }
  return finite;
}
#endif

// Whether a row holds only finite scores and targets in {-1, 0, 1}: one pass over the row the top-K scan just
// read (in L1), written so that the compiler vectorizes it (x - x is 0 for a finite x, NaN for NaN and inf; a
// target t is valid when t + 1, as a byte, is at most 2).
template <typename scalar_t>
bool row_is_valid(const scalar_t* s, const int8_t* t, int64_t L) {
  using T = compare_t<scalar_t>;
  int32_t bad = 0;
  for (int64_t j = 0; j < L; ++j) {
    const T x = static_cast<T>(s[j]);
    bad |= static_cast<int32_t>(!((x - x) == T(0)));
    bad |= static_cast<int32_t>(static_cast<uint8_t>(t[j] + 1) > 2);
  }
  return bad == 0;
}

#ifdef PYZSL_X86_SIMD
// row_is_valid's target half with AVX-512, 64 targets per instruction.
PYZSL_AVX512 bool targets_are_valid_avx512(const int8_t* t, int64_t L) {
  __mmask64 outside = 0;
  for (int64_t j = 0; j < L; j += 64) {
    const __mmask64 lanes = L - j >= 64 ? ~__mmask64(0) : (__mmask64(1) << (L - j)) - 1;
    const __m512i shifted = _mm512_add_epi8(_mm512_maskz_loadu_epi8(lanes, t + j), _mm512_set1_epi8(1));
    outside |= _mm512_mask_cmpgt_epu8_mask(lanes, shifted, _mm512_set1_epi8(2));
  }
  return outside == 0;
}

// row_is_valid for a float row with AVX-512: 16 scores per class test for NaN and inf, then the targets.
PYZSL_AVX512 bool row_is_valid_avx512(const float* s, const int8_t* t, int64_t L) {
  __mmask16 nonfinite = 0;
  for (int64_t j = 0; j < L; j += kLanes) {
    const __mmask16 lanes = L - j >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << (L - j)) - 1);
    nonfinite |= _mm512_mask_fpclass_ps_mask(lanes, _mm512_maskz_loadu_ps(lanes, s + j), kNaNOrInf);
  }
  return nonfinite == 0 && targets_are_valid_avx512(t, L);
}
#endif

// Appends a row's positives (label, score) to `found` and returns how many there are: what multilabel_row_scan
// collects besides the top-K. Kept out of line: inlined, it made the top-K scan around it 1.5x slower.
template <typename scalar_t, typename T = compare_t<scalar_t>>
__attribute__((noinline)) int64_t collect_row_positives(const scalar_t* s, const int8_t* t, int64_t L,
                                                        HitList<T>& found) {
  PositiveHit<T>* const out = found.room(static_cast<size_t>(L + kSpareSlots));
  const auto emit = [&](int64_t c, int64_t j) { out[c] = {static_cast<int32_t>(j), static_cast<T>(s[j])}; };
  int64_t count;
#ifdef PYZSL_X86_SIMD
  if (avx512_enabled()) {
    count = find_ones_avx512(t, L, emit);
  } else
#endif
  {
    count = find_ones(t, L, emit);
  }
  found.commit(static_cast<size_t>(count));
  return count;
}

// With check_inputs, *inputs_valid becomes whether every score is finite and every target in {-1, 0, 1}; with
// `positives_out` (a list per thread), the row scan also collects the positives' scores, which the row is in L1 for.
template <typename scalar_t>
void topk_kernel(const scalar_t* scores, const int8_t* targets, int64_t N, int64_t L, int64_t k, bool* hits,
                 int64_t* row_positives, bool check_inputs, bool* inputs_valid,
                 std::vector<HitList<compare_t<scalar_t>>>* positives_out) {
  using T = compare_t<scalar_t>;
  std::atomic<bool> valid{true};
  const int64_t kept = std::min(k, L);
#ifdef PYZSL_X86_SIMD
  const bool use_avx512 = avx512_enabled();
#endif
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(L, 1));
  at::parallel_for(0, N, grain, [&](int64_t row_begin, int64_t row_end) {
    TopKBuffer<T> top(kept);
    for (int64_t n = row_begin; n < row_end; ++n) {
      const scalar_t* s = scores + n * L;
      const int8_t* t = targets + n * L;
      top.filled = 0;
      bool scores_checked = false, scores_finite = true;  // the bounded top-K checks the scores as it reads them
#ifdef PYZSL_X86_SIMD
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (use_avx512 && kept <= 16 && L <= std::numeric_limits<int32_t>::max()) {
          TopKRegisters registers(kept);
          scores_finite = topk_row_bounded_avx512(s, L, kept, registers);
          scores_checked = true;
          registers.copy_indices_to(top);
        } else if (use_avx512) {
          topk_row_avx512(s, L, top);
        } else {
          topk_row(s, L, top);
        }
      } else
#endif
      {
        topk_row(s, L, top);
      }
      if (positives_out != nullptr) {
        row_positives[n] = collect_row_positives(s, t, L, (*positives_out)[at::get_thread_num()]);
      } else {
        int64_t positives = 0;
        for (int64_t j = 0; j < L; ++j) positives += t[j] == 1;
        row_positives[n] = positives;
      }
      if (check_inputs) {
        bool row_valid;
#ifdef PYZSL_X86_SIMD
        if constexpr (std::is_same_v<scalar_t, float>) {
          row_valid = scores_checked ? scores_finite && targets_are_valid_avx512(t, L)
                      : use_avx512     ? row_is_valid_avx512(s, t, L)
                                       : row_is_valid(s, t, L);
        } else
#endif
        {
          row_valid = row_is_valid(s, t, L);
        }
        if (!row_valid) valid.store(false, std::memory_order_relaxed);
      }
      // Last: the passes above read the row's targets in order, so these few reads at the k best find them in L1
      // (the row scan at the GZSL size 39.9-40.3 -> 38.4-39.4 ms, hits first against last).
      bool* h = hits + n * k;
      for (int64_t r = 0; r < k; ++r) h[r] = r < kept && t[top.index[r]] == 1;
    }
  });
  if (inputs_valid != nullptr) *inputs_valid = valid.load();
}

std::tuple<at::Tensor, at::Tensor> multilabel_topk_hits_cpu(const at::Tensor& scores_in, const at::Tensor& targets_in,
                                                            int64_t k) {
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
                          hits.mutable_data_ptr<bool>(), row_positives.mutable_data_ptr<int64_t>(), false, nullptr,
                          nullptr);
  });
  return {hits, row_positives};
}

// multilabel_topk_hits, the check of every value and the positives' CSR, in one pass over the rows.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> multilabel_row_scan_cpu(
    const at::Tensor& scores_in, const at::Tensor& targets_in, int64_t k) {
  constexpr const char* op = "multilabel_row_scan";
  check_scores_targets(scores_in, targets_in, op);
  TORCH_CHECK_VALUE(k >= 1, op, ": k must be >= 1, got ", k);
  const auto scores = scores_in.contiguous();
  const auto targets = targets_in.contiguous();
  const int64_t N = scores.size(0), L = scores.size(1);
  auto hits = at::zeros({N, k}, scores.options().dtype(at::kBool));
  auto row_positives = at::zeros({N}, scores.options().dtype(at::kLong));
  auto inputs_valid = at::ones({}, scores.options().dtype(at::kBool));
  auto positive_offsets = at::zeros({L + 1}, scores.options().dtype(at::kLong));
  const auto compare_type = scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor positive_scores;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "multilabel_row_scan_cpu", [&] {
    using T = compare_t<scalar_t>;
    const int64_t threads = std::max(1, at::get_num_threads());
    std::vector<HitList<T>> found(threads);  // per thread
    // Room for one positive in 64 entries per thread (growing the lists cost 6 of 47 ms at the GZSL size, whose
    // density is 1 in 100); denser targets grow them.
    for (auto& list : found) list.reserve(static_cast<size_t>(N * L / threads / 64 + 1));
    if (N > 0 && L > 0) {
      topk_kernel<scalar_t>(scores.const_data_ptr<scalar_t>(), targets.const_data_ptr<int8_t>(), N, L, k,
                            hits.mutable_data_ptr<bool>(), row_positives.mutable_data_ptr<int64_t>(), true,
                            inputs_valid.mutable_data_ptr<bool>(), &found);
    }
    hits_to_csr(found, L, positive_offsets.mutable_data_ptr<int64_t>(), [&](int64_t total) {
      positive_scores = at::empty({total}, scores.options().dtype(compare_type));
      return positive_scores.mutable_data_ptr<T>();
    });
  });
  return {hits, row_positives, inputs_valid, positive_scores, positive_offsets};
}

}  // namespace

// Frees the tile buffers the CPU AP kernel keeps between calls and returns their size in bytes (pyzsl::_empty_cache).
int64_t empty_cache() { return TileBufferPool::instance().clear(); }

TORCH_LIBRARY_IMPL(pyzsl, CPU, m) {
  m.impl("multilabel_ap", &multilabel_ap_cpu);
  m.impl("multilabel_topk_hits", &multilabel_topk_hits_cpu);
  m.impl("multilabel_row_scan", &multilabel_row_scan_cpu);
  m.impl("multilabel_ap_given_positives", &multilabel_ap_given_positives_cpu);
}

}  // namespace pyzsl
