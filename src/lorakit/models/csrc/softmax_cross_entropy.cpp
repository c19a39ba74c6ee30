// The LM head's softmax cross-entropy, a row at a time: see softmax_cross_entropy.h.
//
// A row's max, then exp(logit − max) into a per-thread fp32 buffer with its sum (the row read again, from cache),
// then, where the softmax is wanted, the buffer times 1 / sum written over the logits, rounded once to their dtype.
// The arithmetic is ATen's for the same operations in fp32 (bf16 logits widened exactly) but for the order of the
// sum and the last bits of exp (exp_ps in bf16_vectors.h). A row holding a NaN or +inf, or only -inf, gives a NaN
// loss (and softmax), as ATen's would: a diverged run's loss must show it.
#include "softmax_cross_entropy.h"

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "bf16_vectors.h"
#include "elementwise.h"
#include "parallel.h"

namespace {

using at::Tensor;
using lorakit_kernels::load;
using lorakit_kernels::store;
using lorakit_kernels::tail_mask;

// the row's loss; with `softmax`, the row overwritten by its softmax. `exps`: room for n floats
template <class T>
BF16_TARGET float row_loss(T* row, int64_t n, int64_t target, bool softmax, float* exps) {
  const float lowest = -std::numeric_limits<float>::infinity();
  __m512 top = _mm512_set1_ps(lowest);
  __mmask16 nan = 0;
  for (int64_t j = 0; j < n; j += 16) {  // the lanes past the row's end (loaded as 0) left out of the max
    const __mmask16 m = tail_mask(n - j);
    const __m512 v = load(row + j, m);
    nan |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
    top = _mm512_mask_max_ps(top, m, top, v);
  }
  const float max = _mm512_reduce_max_ps(top);
  if (nan || !std::isfinite(max)) {  // exp_ps clamps its input: NaN and inf would come out finite
    const float quiet = std::numeric_limits<float>::quiet_NaN();
    if (softmax)
      for (int64_t j = 0; j < n; ++j) row[j] = static_cast<T>(quiet);
    return quiet;
  }
  const __m512 shift = _mm512_set1_ps(max);
  __m512 sums = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    const __m512 e = _mm512_maskz_mov_ps(m, lorakit_kernels::exp_ps(_mm512_sub_ps(load(row + j, m), shift)));
    _mm512_mask_storeu_ps(exps + j, m, e);
    sums = _mm512_add_ps(sums, e);
  }
  const float sum = _mm512_reduce_add_ps(sums);
  const float picked = static_cast<float>(row[target]);
  if (softmax) {
    const __m512 inverse = _mm512_set1_ps(1.f / sum);
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = tail_mask(n - j);
      store(row + j, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, exps + j), inverse), m);
    }
  }
  return max + std::log(sum) - picked;
}

template <class T>
void rows_loss(Tensor& logits, const int64_t* targets, bool softmax, float* out) {
  const int64_t n = logits.size(1);
  T* base = logits.data_ptr<T>();
  lorakit_kernels::parallel_for(0, logits.size(0), 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> exps(n);
    for (int64_t r = r0; r < r1; ++r) out[r] = row_loss(base + r * n, n, targets[r], softmax, exps.data());
  });
}

}  // namespace

bool softmax_cross_entropy_applies(const Tensor& logits, const Tensor& targets) {
  const at::ScalarType dt = logits.scalar_type();
  return lorakit_kernels::bf16_kernels_supported() && logits.device().is_cpu() && logits.dim() == 2 &&
         (dt == at::kBFloat16 || dt == at::kFloat) && logits.is_contiguous() && logits.size(1) > 0 &&
         targets.device().is_cpu() && targets.scalar_type() == at::kLong && targets.dim() == 1 &&
         targets.size(0) == logits.size(0);
}

Tensor softmax_cross_entropy(Tensor logits, const Tensor& targets, bool softmax) {
  TORCH_CHECK(softmax_cross_entropy_applies(logits, targets),
              "softmax_cross_entropy: inputs it does not take (see softmax_cross_entropy.h)");
  const Tensor picks = targets.contiguous();
  const int64_t* t = picks.data_ptr<int64_t>();
  for (int64_t r = 0; r < logits.size(0); ++r)
    TORCH_CHECK(t[r] >= 0 && t[r] < logits.size(1), "softmax_cross_entropy: a target outside the vocabulary");
  Tensor loss = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  lorakit_kernels::by_dtype(
      logits, [&](auto tag) { rows_loss<decltype(tag)>(logits, t, softmax, loss.data_ptr<float>()); });
  return loss;
}
