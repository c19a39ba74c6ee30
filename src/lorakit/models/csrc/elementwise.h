// Loads and stores for the training kernels that take bf16 or fp32 tensors alike (rms_norm.cpp, swiglu.cpp,
// softmax_cross_entropy.cpp): 16 elements of T read as fp32, written back rounded to T, and the dispatch on a
// tensor's dtype; a bf16 tensor's data as bits and a tensor's rows (fused_ops.cpp, decode_attention.cpp,
// mixed_lora.cpp).
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <cstdint>

#include "bf16_vectors.h"

namespace lorakit_kernels {

// a bf16 tensor's data as the bits the kernels read and write
inline uint16_t* bits(const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

// a tensor's rows: its elements over its last dimension
inline int64_t rows_of(const at::Tensor& t) { return t.numel() / t.size(-1); }

// 16 elements at p (the first `m`; the rest 0) as fp32
template <class T>
BF16_INLINE __m512 load(const T* p, __mmask16 m) {
  if constexpr (sizeof(T) == 2)
    return widen(reinterpret_cast<const uint16_t*>(p), m);
  else
    return _mm512_maskz_loadu_ps(m, p);
}

// v rounded to T (bf16: to nearest even), stored at p (the first `m` of 16)
template <class T>
BF16_INLINE void store(T* p, __m512 v, __mmask16 m) {
  if constexpr (sizeof(T) == 2)
    store_bf16(reinterpret_cast<uint16_t*>(p), v, m);
  else
    _mm512_mask_storeu_ps(p, m, v);
}

// what a T tensor holds after an operation computed in fp32
template <class T>
BF16_INLINE __m512 rounded(__m512 v) {
  if constexpr (sizeof(T) == 2)
    return round_bf16(v);
  else
    return v;
}

// f(T{}) with T the element type of t: at::BFloat16 or float (the callers check it is one of them)
template <class F>
void by_dtype(const at::Tensor& t, const F& f) {
  if (t.scalar_type() == at::kBFloat16)
    f(at::BFloat16{});
  else
    f(float{});
}

}  // namespace lorakit_kernels
