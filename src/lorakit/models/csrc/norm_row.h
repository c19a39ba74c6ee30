// One row of LlamaRMSNorm's formula, shared by the training kernel (rms_norm.cpp) and the decode step (fused_ops.cpp):
// y = w · (x · r) with r = 1 / sqrt(mean(x²) + eps), summed and multiplied in fp32.
//
// As the module rounds: x · r to x's dtype X first (nothing for fp32 x), the product with the weight to y's dtype Y.
// So a bf16 row gives LlamaRMSNorm's bf16 output, and an fp32 row (the decode step's fp32 residual stream,
// inference/residual_stream.py) with a bf16 weight gives the fp32 module's output rounded once to bf16, as the next
// product reads it. X, W, Y are float, or a 2-byte type (at::BFloat16, uint16_t) holding bf16 bits.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "bf16_vectors.h"
#include "elementwise.h"

namespace lorakit_kernels {

// writes the row's d outputs to y; returns r, which the training backward keeps
template <class X, class W, class Y>
BF16_TARGET inline float norm_row(const X* x, const W* w, int64_t d, float eps, Y* y) {
  __m512 squares = _mm512_setzero_ps();
  for (int64_t j = 0; j < d; j += 16) {
    const __m512 v = load(x + j, tail_mask(d - j));
    squares = _mm512_fmadd_ps(v, v, squares);
  }
  const float r = 1.f / std::sqrt(_mm512_reduce_add_ps(squares) / static_cast<float>(d) + eps);
  const __m512 rv = _mm512_set1_ps(r);
  for (int64_t j = 0; j < d; j += 16) {
    const __mmask16 m = tail_mask(d - j);
    const __m512 normed = rounded<X>(_mm512_mul_ps(load(x + j, m), rv));
    store(y + j, _mm512_mul_ps(load(w + j, m), normed), m);
  }
  return r;
}

}  // namespace lorakit_kernels
