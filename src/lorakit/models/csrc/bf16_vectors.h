// AVX-512 helpers shared by the bf16 kernels (decode_attention.cpp, fused_ops.cpp, causal_attention.cpp): the CPU check, 16 bf16 widened to fp32 and
// rounded back (to nearest even, as c10::BFloat16 rounds, but values below the normal range flushed to zero), a mask
// for a row's last few elements, and e^x in fp32.
// Each carries a target attribute, so the files compile without global -mavx512 flags; the callers check the CPU
// (skinny_supported) before calling them.
#pragma once

#include <immintrin.h>

#include <cstdint>

#define BF16_TARGET __attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl,fma")))
#define BF16_INLINE BF16_TARGET __attribute__((always_inline)) inline

namespace lorakit_kernels {

// whether this CPU runs the kernels built on these helpers (AVX-512 with BF16)
inline bool bf16_kernels_supported() {
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("fma");
  }();
  return supported;
}

BF16_INLINE __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

// 16 bf16 at p (the first `mask` of them; the rest 0), widened to fp32 in order
BF16_INLINE __m512 widen(const uint16_t* p, __mmask16 mask = 0xFFFF) {
  const __m256i v = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// v rounded to bf16, stored at p (the first `mask` of 16)
BF16_INLINE void store_bf16(uint16_t* p, __m512 v, __mmask16 mask = 0xFFFF) {
  _mm256_mask_storeu_epi16(p, mask, (__m256i)_mm512_cvtneps_pbh(v));
}

// v rounded to bf16 and widened again: what a bf16 tensor holds after an operation computed in fp32
BF16_INLINE __m512 round_bf16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

// e^x: x (kept within [-104, 89], where e^x is 0 or past fp32's largest) = n·ln 2 + r with n an integer and
// |r| <= ln 2 / 2 (ln 2 in two parts, so r is exact to fp32), e^r by its Taylor series to r^7 (relative error
// < 1e-8), times 2^n by scalef.
BF16_INLINE __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(89.f)), _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  for (float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

}  // namespace lorakit_kernels
