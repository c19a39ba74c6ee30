// transformers' RMSNorm forward and backward on CPU for training: see rms_norm.h.
//
// Each row of d elements is read as fp32 16 at a time. The forward sums its squares, takes r = 1 / sqrt(mean + eps)
// and writes weight · (x · r), the product x · r rounded to x's dtype first as the module does; it keeps r. The
// backward, for y = w · x · r with r depending on x: dx = r · g − x · r³ · Σ(g · x) / d, where g = dy · w, all in fp32.
#include "rms_norm.h"

#include <immintrin.h>

#include <cstdint>

#include "bf16_vectors.h"
#include "elementwise.h"
#include "norm_row.h"
#include "parallel.h"

namespace {

using at::Tensor;
using lorakit_kernels::load;
using lorakit_kernels::norm_row;
using lorakit_kernels::store;
using lorakit_kernels::tail_mask;

constexpr int64_t kGrain = 16;  // rows a thread's chunk takes at least

template <class T>
BF16_TARGET void grad_row(const T* dy, const T* x, const T* w, int64_t d, float r, T* dx) {
  __m512 gx = _mm512_setzero_ps();
  for (int64_t j = 0; j < d; j += 16) {
    const __mmask16 m = tail_mask(d - j);
    gx = _mm512_fmadd_ps(_mm512_mul_ps(load(dy + j, m), load(w + j, m)), load(x + j, m), gx);
  }
  const __m512 rv = _mm512_set1_ps(r);
  const __m512 c = _mm512_set1_ps(r * r * r * _mm512_reduce_add_ps(gx) / static_cast<float>(d));
  for (int64_t j = 0; j < d; j += 16) {
    const __mmask16 m = tail_mask(d - j);
    const __m512 g = _mm512_mul_ps(load(dy + j, m), load(w + j, m));
    store(dx + j, _mm512_fnmadd_ps(load(x + j, m), c, _mm512_mul_ps(g, rv)), m);
  }
}

template <class T>
void forward_rows(const Tensor& x, const Tensor& w, float eps, Tensor& y, Tensor& rstd) {
  const int64_t d = x.size(-1);
  const T *px = x.data_ptr<T>(), *pw = w.data_ptr<T>();
  T* py = y.data_ptr<T>();
  float* pr = rstd.data_ptr<float>();
  lorakit_kernels::parallel_for(0, rstd.numel(), kGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) pr[r] = norm_row(px + r * d, pw, d, eps, py + r * d);
  });
}

template <class T>
void backward_rows(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& dx) {
  const int64_t d = x.size(-1);
  const T *pg = dy.data_ptr<T>(), *px = x.data_ptr<T>(), *pw = w.data_ptr<T>();
  T* pd = dx.data_ptr<T>();
  const float* pr = rstd.data_ptr<float>();
  lorakit_kernels::parallel_for(0, rstd.numel(), kGrain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) grad_row(pg + r * d, px + r * d, pw, d, pr[r], pd + r * d);
  });
}

}  // namespace

bool rms_norm_applies(const Tensor& x, const Tensor& weight) {
  const at::ScalarType dt = x.scalar_type();
  return lorakit_kernels::bf16_kernels_supported() && x.device().is_cpu() && weight.device().is_cpu() &&
         (dt == at::kBFloat16 || dt == at::kFloat) && weight.scalar_type() == dt && x.dim() >= 1 &&
         x.size(-1) > 0 && weight.dim() == 1 && weight.size(0) == x.size(-1) && x.is_contiguous() &&
         weight.is_contiguous();
}

std::tuple<Tensor, Tensor> rms_norm_forward(const Tensor& x, const Tensor& weight, double eps) {
  TORCH_CHECK(rms_norm_applies(x, weight), "rms_norm_forward: inputs it does not take (see rms_norm.h)");
  Tensor y = at::empty_like(x);
  Tensor rstd = at::empty({x.numel() / x.size(-1)}, x.options().dtype(at::kFloat));
  lorakit_kernels::by_dtype(x, [&](auto tag) {
    forward_rows<decltype(tag)>(x, weight, static_cast<float>(eps), y, rstd);
  });
  return {y, rstd};
}

Tensor rms_norm_backward(const Tensor& grad, const Tensor& x, const Tensor& weight, const Tensor& rstd) {
  TORCH_CHECK(rms_norm_applies(x, weight) && grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() &&
                  rstd.numel() == x.numel() / x.size(-1) && rstd.scalar_type() == at::kFloat && rstd.is_contiguous(),
              "rms_norm_backward: inputs it does not take (see rms_norm.h)");
  const Tensor dy = grad.contiguous();
  Tensor dx = at::empty_like(x);
  lorakit_kernels::by_dtype(x, [&](auto tag) { backward_rows<decltype(tag)>(dy, x, weight, rstd, dx); });
  return dx;
}
