// CPU kernels of LESA's ranking loss without the B x L x L pair tensor.
//
// Per image, with key_n = margin + s_n for each negative and the positives sorted: a pair (p, n) violates when
// s_p < key_n, so negative n violates with the c_n smallest positives and contributes c_n * key_n - (their sum),
// a prefix sum. Gradients: d/ds_n = c_n / (V + eps), d/ds_p = -#{n : key_n > s_p} / (V + eps), with V = sum c_n
// (the violating-pair count, a constant for autograd as in the published code). O(L log L) per image.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../checks.h"

namespace pyzsl {
namespace {

constexpr double kEps = 1e-8;

// One image's sorted positives and negative keys, reused across the images of a thread.
template <typename T>
struct ImagePairs {
  std::vector<T> pos;             // ascending
  std::vector<double> pos_prefix;  // pos_prefix[c] = sum of the c smallest positives
  std::vector<T> keys;            // margin + s_n for each negative, ascending
  int64_t violating = 0;
  double hinge_sum = 0;

  void build(const T* s, const int8_t* t, int64_t L, T margin) {
    pos.clear();
    keys.clear();
    for (int64_t j = 0; j < L; ++j) {
      if (t[j] == 1) pos.push_back(s[j]);
      else if (t[j] == -1) keys.push_back(static_cast<T>(margin + s[j]));  // rounded as the pairwise form rounds it
    }
    std::sort(pos.begin(), pos.end());
    std::sort(keys.begin(), keys.end());
    pos_prefix.assign(pos.size() + 1, 0.0);
    for (size_t i = 0; i < pos.size(); ++i) pos_prefix[i + 1] = pos_prefix[i] + static_cast<double>(pos[i]);
    violating = 0;
    hinge_sum = 0;
    for (T key : keys) {
      const int64_t c = std::lower_bound(pos.begin(), pos.end(), key) - pos.begin();  // positives < key
      violating += c;
      hinge_sum += static_cast<double>(c) * static_cast<double>(key) - pos_prefix[c];
    }
  }

  double loss() const { return hinge_sum / (static_cast<double>(violating) + kEps); }
};

void check_rank_loss_inputs(const at::Tensor& scores, const at::Tensor& targets, const char* op) {
  check_scores_targets(scores, targets, op);
  TORCH_CHECK_VALUE(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble, op,
                    ": scores must be float32 or float64 (the Python wrapper upcasts half types), got ",
                    scores.scalar_type());
}

at::Tensor lesa_rank_loss_cpu(const at::Tensor& scores_in, const at::Tensor& targets_in, double margin) {
  check_rank_loss_inputs(scores_in, targets_in, "lesa_rank_loss");
  const auto scores = scores_in.contiguous();
  const auto targets = targets_in.contiguous();
  const int64_t B = scores.size(0), L = scores.size(1);
  std::vector<double> per_image(B, 0.0);
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "lesa_rank_loss_cpu", [&] {
    const scalar_t* s = scores.const_data_ptr<scalar_t>();
    const int8_t* t = targets.const_data_ptr<int8_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      ImagePairs<scalar_t> image;
      for (int64_t i = begin; i < end; ++i) {
        image.build(s + i * L, t + i * L, L, static_cast<scalar_t>(margin));
        per_image[i] = image.loss();
      }
    });
  });
  double total = 0.0;
  for (double v : per_image) total += v;
  // The mean over an empty batch is NaN, as torch.mean gives.
  return at::full({}, B > 0 ? total / static_cast<double>(B) : std::numeric_limits<double>::quiet_NaN(),
                  scores.options());
}

at::Tensor lesa_rank_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& scores_in,
                                       const at::Tensor& targets_in, double margin) {
  check_rank_loss_inputs(scores_in, targets_in, "lesa_rank_loss_backward");
  const auto scores = scores_in.contiguous();
  const auto targets = targets_in.contiguous();
  const int64_t B = scores.size(0), L = scores.size(1);
  auto grad_scores = at::zeros_like(scores);
  if (B == 0) return grad_scores;
  const double scale = grad.item<double>() / static_cast<double>(B);
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "lesa_rank_loss_backward_cpu", [&] {
    const scalar_t* s = scores.const_data_ptr<scalar_t>();
    const int8_t* t = targets.const_data_ptr<int8_t>();
    scalar_t* g = grad_scores.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      ImagePairs<scalar_t> image;
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* si = s + i * L;
        const int8_t* ti = t + i * L;
        image.build(si, ti, L, static_cast<scalar_t>(margin));
        const double w = scale / (static_cast<double>(image.violating) + kEps);
        const int64_t num_keys = static_cast<int64_t>(image.keys.size());
        for (int64_t j = 0; j < L; ++j) {
          if (ti[j] == 1) {
            // negatives whose key exceeds this positive
            const int64_t above = num_keys - (std::upper_bound(image.keys.begin(), image.keys.end(), si[j]) -
                                              image.keys.begin());
            g[i * L + j] = static_cast<scalar_t>(-w * static_cast<double>(above));
          } else if (ti[j] == -1) {
            const scalar_t key = static_cast<scalar_t>(static_cast<scalar_t>(margin) + si[j]);
            const int64_t below = std::lower_bound(image.pos.begin(), image.pos.end(), key) - image.pos.begin();
            g[i * L + j] = static_cast<scalar_t>(w * static_cast<double>(below));
          }
        }
      }
    });
  });
  return grad_scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyzsl, CPU, m) {
  m.impl("lesa_rank_loss", &lesa_rank_loss_cpu);
  m.impl("_lesa_rank_loss_backward", &lesa_rank_loss_backward_cpu);
}

}  // namespace pyzsl
