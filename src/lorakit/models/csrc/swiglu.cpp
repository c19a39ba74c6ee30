// silu(gate) · up forward and backward on CPU for training: see swiglu.h.
//
// With s = sigmoid(gate): the output silu(gate) · up = gate · s · up; d up = grad · gate · s;
// d gate = grad · up · s · (1 + gate · (1 − s)), silu's derivative as torch's silu_backward writes it.
#include "swiglu.h"

#include <immintrin.h>

#include <cstdint>

#include "bf16_vectors.h"
#include "elementwise.h"
#include "parallel.h"

namespace {

using at::Tensor;
using lorakit_kernels::load;
using lorakit_kernels::rounded;
using lorakit_kernels::store;
using lorakit_kernels::tail_mask;

constexpr int64_t kGrain = 16384;  // elements a thread's chunk takes at least

BF16_INLINE __m512 sigmoid(__m512 x) {  // 1 / (1 + e^-x); exp_ps keeps e^-x finite
  const __m512 one = _mm512_set1_ps(1.f);
  return _mm512_div_ps(one, _mm512_add_ps(one, lorakit_kernels::exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

template <class T>
BF16_TARGET void forward_span(const T* gate, const T* up, int64_t n, T* out) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    const __m512 g = load(gate + j, m);
    const __m512 silu = rounded<T>(_mm512_mul_ps(g, sigmoid(g)));
    store(out + j, _mm512_mul_ps(silu, load(up + j, m)), m);
  }
}

template <class T>
BF16_TARGET void backward_span(const T* grad, const T* gate, const T* up, int64_t n, T* d_gate, T* d_up) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    const __m512 dy = load(grad + j, m), g = load(gate + j, m), s = sigmoid(g);
    store(d_up + j, _mm512_mul_ps(dy, _mm512_mul_ps(g, s)), m);
    const __m512 slope = _mm512_mul_ps(s, _mm512_fmadd_ps(g, _mm512_sub_ps(one, s), one));
    store(d_gate + j, _mm512_mul_ps(_mm512_mul_ps(dy, load(up + j, m)), slope), m);
  }
}

template <class F>
void spans(int64_t n, const F& f) {  // f(begin, count) over [0, n) in chunks, one per thread
  lorakit_kernels::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { f(b, e - b); });
}

}  // namespace

bool swiglu_applies(const Tensor& gate, const Tensor& up) {
  const at::ScalarType dt = gate.scalar_type();
  return lorakit_kernels::bf16_kernels_supported() && gate.device().is_cpu() && up.device().is_cpu() &&
         (dt == at::kBFloat16 || dt == at::kFloat) && up.scalar_type() == dt && gate.sizes() == up.sizes() &&
         gate.is_contiguous() && up.is_contiguous();
}

Tensor swiglu_forward(const Tensor& gate, const Tensor& up) {
  TORCH_CHECK(swiglu_applies(gate, up), "swiglu_forward: inputs it does not take (see swiglu.h)");
  Tensor out = at::empty_like(gate);
  lorakit_kernels::by_dtype(gate, [&](auto tag) {
    using T = decltype(tag);
    const T *g = gate.data_ptr<T>(), *u = up.data_ptr<T>();
    T* o = out.data_ptr<T>();
    spans(gate.numel(), [&](int64_t b, int64_t n) { forward_span(g + b, u + b, n, o + b); });
  });
  return out;
}

std::tuple<Tensor, Tensor> swiglu_backward(const Tensor& grad, const Tensor& gate, const Tensor& up) {
  TORCH_CHECK(swiglu_applies(gate, up) && grad.sizes() == gate.sizes() && grad.scalar_type() == gate.scalar_type(),
              "swiglu_backward: inputs it does not take (see swiglu.h)");
  const Tensor dy = grad.contiguous();
  Tensor d_gate = at::empty_like(gate), d_up = at::empty_like(up);
  lorakit_kernels::by_dtype(gate, [&](auto tag) {
    using T = decltype(tag);
    const T *y = dy.data_ptr<T>(), *g = gate.data_ptr<T>(), *u = up.data_ptr<T>();
    T *dg = d_gate.data_ptr<T>(), *du = d_up.data_ptr<T>();
    spans(gate.numel(), [&](int64_t b, int64_t n) { backward_span(y + b, g + b, u + b, n, dg + b, du + b); });
  });
  return {d_gate, d_up};
}
