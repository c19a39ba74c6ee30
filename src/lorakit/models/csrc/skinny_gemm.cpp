// Matrix products for decoding on CPU (few rows of x, memory-bound): see skinny_gemm.h.
//
// Each parallel task owns a disjoint range of output columns, i.e. of W rows, and walks it a few W rows at a time;
// for each such block it takes every row of x (in chunks that keep all the partial sums in zmm registers), so W
// streams from memory once while x, a few KB, stays in L1/L2.
//
// The products of bf16 weights are AVX-512 BF16's _mm512_dpbf16_ps (exact products, fp32 sums, 32 a instruction) or
// fp32 FMAs on the weights widened to fp32 in registers (a shift or a mask) against x widened once per call: the same
// arithmetic, at the rate each CPU retires it once the kernel is compute-bound (several rows of x). Intel's cores
// with AMX retire half a vdpbf16ps (32 products) a cycle against two FMAs (2x16): FMAs for several rows there. AMD's
// Zen 4 retires vdpbf16ps at twice its FMAs' products: dot products for any rows, and the kernel is faster than
// oneDNN's GEMM further (kMaxRowsDot). For a single row, which only waits on memory, dot products everywhere (the
// fewest instructions per byte of W). int8 weights are FMAs (a sign extension and a conversion to fp32 first).
//
// The kernels carry a target attribute so that this file compiles without global -mavx512 flags; skinny_supported()
// decides at run time whether they may be called.
#include "skinny_gemm.h"
#include "bf16_vectors.h"
#include "parallel.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

namespace {

using at::Tensor;
using lorakit_kernels::parallel_for;

#define SKINNY_TARGET __attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl,fma")))
#define SKINNY_INLINE SKINNY_TARGET __attribute__((always_inline)) inline

constexpr int kCols = 4;            // W rows per register block
constexpr int kMaxRowBlock = 6;     // x rows per register block: 6×4 accumulators + 4 W vectors + x <= 32 zmm
constexpr int64_t kMaxRows = 12;    // bf16 with FMAs: more rows than this, at::linear (oneDNN's GEMM, AMX) is faster
constexpr int64_t kMaxRowsDot = 24;  // bf16 with dot products: past this oneDNN's GEMM on packed weights is faster
// A product this narrow (an adapter's rank-r one) costs oneDNN ~20 us a call, mostly setting up: the kernel takes it
// up to kMaxRowsSmall rows, while the multiply-adds stay under kMaxSmallMacs (past that oneDNN is faster again)
constexpr int64_t kSmallDim = 64;
constexpr int64_t kMaxRowsSmall = 32;
constexpr int64_t kMaxSmallMacs = 3 << 19;
constexpr int64_t kMaxRowsInt8 = 32;  // int8: past this, bf16 GEMMs on rebuilt weights are faster
constexpr int64_t kRebuildRows = 4096;  // int8 weight rows rebuilt in bf16 at a time for those
constexpr int64_t kMaxRowsLogits = 32;  // skinny_logits: the kernel up to this many rows (fp32 GEMMs past it)
constexpr int64_t kMinColsPerTask = 64;  // W rows a parallel task takes at least, so a task's work outweighs its start
constexpr int64_t kPrefetchBytes = 16384;  // how far ahead of the W rows in work to prefetch (into L2), at least

// Layouts of a block of 32 consecutive elements (of a W row, and of an x row to match) as two vectors of 16 fp32.
// From 32 bf16 in a zmm: EvenOdd is the cheaper (one shift, one and: the even elements, then the odd ones), Halves
// the order of the int8 weights' sign extension (elements 0-15, then 16-31).
// kFloats: the floats a prepared x row holds for a block of 32 elements.
struct EvenOdd {
  static constexpr int kFloats = 32;
  SKINNY_INLINE static __m512 first(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
  SKINNY_INLINE static __m512 second(__m512i v) {
    return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
};

struct Halves {
  static constexpr int kFloats = 32;
  SKINNY_INLINE static __m512 first(__m512i v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
  }
  SKINNY_INLINE static __m512 second(__m512i v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
  }
};

// For _mm512_dpbf16_ps: the 32 bf16 as they are, in one vector (64 bytes a block: x stays in L1 for more rows).
struct Raw {
  static constexpr int kFloats = 16;
  SKINNY_INLINE static __m512 first(__m512i v) { return _mm512_castsi512_ps(v); }
  SKINNY_INLINE static __m512 second(__m512i) { return _mm512_setzero_ps(); }
};

// Weight loaders, kDot false: the two fp32 vectors (H = 0, 1) of the 32 weights at p, in the loader's Layout, for FMAs;
// kDot true: the 32 bf16 at p for _mm512_dpbf16_ps. With a mask, the lanes past the end of the row are zero (loads of
// masked-off lanes do not fault).
struct Bf16DotWeights {
  using T = uint16_t;
  using Layout = Raw;
  static constexpr bool kDot = true, kGrouped = false;
  SKINNY_INLINE static __m512bh load(const T* p) { return (__m512bh)_mm512_loadu_si512(p); }
  SKINNY_INLINE static __m512bh load(const T* p, __mmask32 mask) { return (__m512bh)_mm512_maskz_loadu_epi16(mask, p); }
};

struct Bf16Weights {
  using T = uint16_t;
  using Layout = EvenOdd;
  static constexpr bool kDot = false, kGrouped = false;
  template <int H>
  SKINNY_INLINE static __m512 load(const T* p) {
    const __m512i v = _mm512_loadu_si512(p);
    return H == 0 ? Layout::first(v) : Layout::second(v);
  }
  template <int H>
  SKINNY_INLINE static __m512 load(const T* p, __mmask32 mask) {
    const __m512i v = _mm512_maskz_loadu_epi16(mask, p);
    return H == 0 ? Layout::first(v) : Layout::second(v);
  }
};

struct Int8Weights {
  using T = int8_t;
  using Layout = Halves;
  static constexpr bool kDot = false, kGrouped = false;
  template <int H>
  SKINNY_INLINE static __m512 load(const T* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * H))));
  }
  template <int H>
  SKINNY_INLINE static __m512 load(const T* p, __mmask32 mask) {
    const __mmask16 m = static_cast<__mmask16>(mask >> (16 * H));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p + 16 * H)));
  }
};

// int8 weights with an fp32 scale for each block of 32 along a row (the block a kernel step takes): each step's
// weights are multiplied by their block's scale in registers, before the products.
struct Int8GroupWeights : Int8Weights {
  static constexpr bool kGrouped = true;
};

__mmask32 tail_mask(int64_t n) { return n >= 32 ? ~__mmask32(0) : __mmask32((1u << n) - 1u); }

// x prepared once per call: fp32 (or bf16 for the Raw layout), block-major so that a kernel walks all its rows with
// one pointer: block b (elements 32b .. 32b+31) of row m at xs[(b * M + m) * Layout::kFloats], in the weight loader's
// Layout, zero past K. Rounded to bf16 first where x is fp32.
template <class Layout>
SKINNY_TARGET void prepare_x(const void* x, bool fp32, int64_t M, int64_t K, float* xs) {
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 mask = tail_mask(K - k);
    for (int64_t m = 0; m < M; ++m, xs += Layout::kFloats) {
      __m512i v;
      if (fp32) {
        const float* p = static_cast<const float*>(x) + m * K + k;
        v = (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(static_cast<__mmask16>(mask >> 16), p + 16),
                                         _mm512_maskz_loadu_ps(static_cast<__mmask16>(mask), p));
      } else {
        v = _mm512_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(x) + m * K + k);
      }
      _mm512_storeu_ps(xs, Layout::first(v));
      if constexpr (Layout::kFloats == 32) _mm512_storeu_ps(xs + 16, Layout::second(v));
    }
  }
}

// A per-column vector (bias or scales) read as fp32, stored as bf16 or fp32; none reads as `absent`.
struct ColumnVector {
  const void* data = nullptr;
  bool is_bf16 = false;
  float absent = 0.f;

  float operator[](int64_t n) const {
    if (!data) return absent;
    return is_bf16 ? float(static_cast<const c10::BFloat16*>(data)[n]) : static_cast<const float*>(data)[n];
  }
  // elements n .. n+3
  SKINNY_INLINE __m128 load4(int64_t n) const {
    if (!data) return _mm_set1_ps(absent);
    if (!is_bf16) return _mm_loadu_ps(static_cast<const float*>(data) + n);
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(data) + n));
    return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(b), 16));
  }
};

// Where the products go: y[m, n] = bf16(sum · scale[n] + bias[n]), each output rounded once, to nearest even.
// group_scales: for Int8GroupWeights, W row n's block b scale at group_scales[n * groups + b].
struct Output {
  c10::BFloat16* y;
  int64_t ldy;
  ColumnVector scale, bias;
  const float* group_scales = nullptr;
  int64_t groups = 0;
  float* y_fp32 = nullptr;  // where set, the outputs go here unrounded (fp32 logits) instead of to y
};

// The sums of the 16 lanes of a, b, c, d, as the 4 lanes of one __m128: a transposing reduction, cheaper than four
// _mm512_reduce_add_ps.
SKINNY_INLINE __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // within each 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] and the same for c, d
  __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  // within each 128-bit lane: [a, b, c, d] summed over that lane
  __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
  __m512 s = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                           _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
  // sum the four 128-bit lanes
  s = _mm512_add_ps(s, _mm512_shuffle_f32x4(s, s, 0x4E));
  s = _mm512_add_ps(s, _mm512_shuffle_f32x4(s, s, 0xB1));
  return _mm512_castps512_ps128(s);
}

// Half H of one step of dot_block: that half of 32 weights of each of the NC W rows, then each of the MR x rows
// against all of them (only NC weight vectors live at a time). kMasked: the last K % 32 elements, the lanes in mask.
template <class WL, int MR, int NC, int H, bool kMasked>
SKINNY_INLINE void dot_half(__m512 (&acc)[MR][NC], const float* x, const typename WL::T* w, int64_t K,
                            __mmask32 mask, const __m512 (&block_scale)[NC]) {
  __m512 wv[NC];
#pragma GCC unroll 8
  for (int j = 0; j < NC; ++j) {
    wv[j] = kMasked ? WL::template load<H>(w + j * K, mask) : WL::template load<H>(w + j * K);
    if constexpr (WL::kGrouped) wv[j] = _mm512_mul_ps(wv[j], block_scale[j]);
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const __m512 xv = _mm512_loadu_ps(x + i * 32 + 16 * H);
#pragma GCC unroll 8
    for (int j = 0; j < NC; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
  }
}

// One step of dot_block for one row of x and block-scaled weights (Int8GroupWeights, MR = 1): the 32 products of
// each W row summed in a vector, which is then scaled into the accumulator (three operations a W row, not the four
// of scaling the weights first, which pays only with several rows of x to share them).
template <class WL, int NC, bool kMasked>
SKINNY_INLINE void dot_one_row_scaled(__m512 (&acc)[1][NC], const float* x, const typename WL::T* w, int64_t K,
                                      __mmask32 mask, const __m512 (&block_scale)[NC]) {
  const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
#pragma GCC unroll 8
  for (int j = 0; j < NC; ++j) {
    const __m512 w0 = kMasked ? WL::template load<0>(w + j * K, mask) : WL::template load<0>(w + j * K);
    const __m512 w1 = kMasked ? WL::template load<1>(w + j * K, mask) : WL::template load<1>(w + j * K);
    acc[0][j] = _mm512_fmadd_ps(_mm512_fmadd_ps(x1, w1, _mm512_mul_ps(x0, w0)), block_scale[j], acc[0][j]);
  }
}

// Int8GroupWeights: the scales of block b of each of the NC W rows (from gs, a row's scales `groups` apart), broadcast
// (straight from memory: a load, no shuffle); nothing for other weights
template <class WL, int NC>
SKINNY_INLINE void block_scales(__m512 (&block_scale)[NC], const float* gs, int64_t groups, int64_t b) {
  if constexpr (WL::kGrouped) {
#pragma GCC unroll 8
    for (int j = 0; j < NC; ++j) block_scale[j] = _mm512_set1_ps(gs[j * groups + b]);
  }
}

// One step of dot_block with _mm512_dpbf16_ps (WL::kDot): 32 weights of each of the NC W rows, then each of the MR x
// rows against all of them.
template <class WL, int MR, int NC, bool kMasked>
SKINNY_INLINE void dot_pairs(__m512 (&acc)[MR][NC], const float* x, const typename WL::T* w, int64_t K,
                             __mmask32 mask) {
  __m512bh wv[NC];
#pragma GCC unroll 8
  for (int j = 0; j < NC; ++j) wv[j] = kMasked ? WL::load(w + j * K, mask) : WL::load(w + j * K);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i * Raw::kFloats);
#pragma GCC unroll 8
    for (int j = 0; j < NC; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
  }
}

// Outputs (m0 .. m0+MR-1, n0 .. n0+NC-1) = MR rows of x times NC rows of W (from w, stride K), fp32 sums.
// x: the prepared rows' first block; the next block is x_step floats on. pf: where to prefetch (into L2) as much as
// the block reads, spread over its steps (or null).
template <class WL, int MR, int NC>
SKINNY_TARGET void dot_block(const float* x, int64_t x_step, const typename WL::T* w, int64_t K, const Output& out,
                             int64_t m0, int64_t n0, const char* pf) {
  __m512 acc[MR][NC];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NC; ++j) acc[i][j] = _mm512_setzero_ps();

  int64_t k = 0;
  constexpr int kPfBytes = NC * 32 * sizeof(typename WL::T);
  __m512 block_scale[NC];  // Int8GroupWeights: the scale of each W row's block at k
  const float* gs = WL::kGrouped ? out.group_scales + n0 * out.groups : nullptr;
  for (; k + 32 <= K; k += 32, x += x_step) {
    if (pf) {
#pragma GCC unroll 8
      for (int l = 0; l < kPfBytes; l += 64) _mm_prefetch(pf + l, _MM_HINT_T1);
      pf += kPfBytes;
    }
    block_scales<WL>(block_scale, gs, out.groups, k / 32);
    if constexpr (WL::kDot) {
      dot_pairs<WL, MR, NC, false>(acc, x, w + k, K, 0);
    } else if constexpr (WL::kGrouped && MR == 1) {
      dot_one_row_scaled<WL, NC, false>(acc, x, w + k, K, 0, block_scale);
    } else {
      dot_half<WL, MR, NC, 0, false>(acc, x, w + k, K, 0, block_scale);
      dot_half<WL, MR, NC, 1, false>(acc, x, w + k, K, 0, block_scale);
    }
  }
  if (k < K) {
    const __mmask32 mask = tail_mask(K - k);
    block_scales<WL>(block_scale, gs, out.groups, k / 32);
    if constexpr (WL::kDot) {
      dot_pairs<WL, MR, NC, true>(acc, x, w + k, K, mask);
    } else if constexpr (WL::kGrouped && MR == 1) {
      dot_one_row_scaled<WL, NC, true>(acc, x, w + k, K, mask, block_scale);
    } else {
      dot_half<WL, MR, NC, 0, true>(acc, x, w + k, K, mask, block_scale);
      dot_half<WL, MR, NC, 1, true>(acc, x, w + k, K, mask, block_scale);
    }
  }

  if constexpr (NC == 4) {  // four outputs of a row at a time: reduce, scale, add the bias, round, store 8 bytes
    const __m128 scale = out.scale.load4(n0), bias = out.bias.load4(n0);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m128 v = _mm_fmadd_ps(reduce4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]), scale, bias);
      if (out.y_fp32)
        _mm_storeu_ps(out.y_fp32 + (m0 + i) * out.ldy + n0, v);
      else
        _mm_storel_epi64(reinterpret_cast<__m128i*>(out.y + (m0 + i) * out.ldy + n0), (__m128i)_mm_cvtneps_pbh(v));
    }
  } else {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < NC; ++j) {
        const int64_t n = n0 + j;
        const float v = std::fma(_mm512_reduce_add_ps(acc[i][j]), out.scale[n], out.bias[n]);
        if (out.y_fp32)
          out.y_fp32[(m0 + i) * out.ldy + n] = v;
        else
          out.y[(m0 + i) * out.ldy + n] = c10::BFloat16(v);
      }
  }
}

template <class WL>
using BlockFn = void (*)(const float*, int64_t, const typename WL::T*, int64_t, const Output&, int64_t, int64_t,
                         const char*);

// dot_block<WL, MR, NC> for MR = 1 .. kMaxRowBlock, indexed by MR
template <class WL, int NC, int... MR>
BlockFn<WL> block_fn(int mr, std::integer_sequence<int, MR...>) {
  static constexpr BlockFn<WL> fns[] = {nullptr, &dot_block<WL, MR + 1, NC>...};
  return fns[mr];
}
template <class WL, int NC>
BlockFn<WL> block_fn(int mr) {
  return block_fn<WL, NC>(mr, std::make_integer_sequence<int, kMaxRowBlock>{});
}

// y (M, N) bf16 = (x (M, K) · W (N, K)ᵀ) · scale + bias, parallel over blocks of W rows; x contiguous, bf16 or fp32.
template <class WL>
void skinny_gemm(const Tensor& x, const typename WL::T* w, const Output& out, int64_t M, int64_t N, int64_t K) {
  // the prepared x, in a per-thread buffer that is only ever grown: no allocation per call
  constexpr int64_t floats = WL::Layout::kFloats;  // a prepared row's floats for a block of 32 elements
  thread_local std::vector<float> xs;
  xs.resize(std::max<size_t>(xs.size(), static_cast<size_t>((K + 31) / 32 * floats * M)));
  prepare_x<typename WL::Layout>(x.data_ptr(), x.scalar_type() == at::kFloat, M, K, xs.data());
  const float* xp = xs.data();

  const int64_t blocks = (N + kCols - 1) / kCols;
  // prefetch distance, in blocks of W rows: a few KB ahead of the block in work
  const int64_t block_bytes = kCols * K * static_cast<int64_t>(sizeof(typename WL::T));
  const int64_t pf_blocks = std::max<int64_t>(1, at::divup(kPrefetchBytes, block_bytes));
  parallel_for(0, blocks, kMinColsPerTask / kCols, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kCols;
      const int nc = static_cast<int>(std::min<int64_t>(kCols, N - n0));
      // all rows of x against this block of W, which stays in L1 after the first chunk of rows
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRowBlock) {
        const int mr = static_cast<int>(std::min<int64_t>(kMaxRowBlock, M - m0));
        // with the first chunk of rows, prefetch a later block of this task's W rows: the hardware prefetcher alone
        // keeps too few loads in flight for the four interleaved row streams
        const char* pf =
            m0 == 0 && b + pf_blocks < b1 ? reinterpret_cast<const char*>(w + (n0 + pf_blocks * kCols) * K) : nullptr;
        if (nc == kCols) {
          block_fn<WL, kCols>(mr)(xp + m0 * floats, M * floats, w + n0 * K, K, out, m0, n0, pf);
        } else {  // the last N % kCols W rows, one at a time
          for (int j = 0; j < nc; ++j)
            block_fn<WL, 1>(mr)(xp + m0 * floats, M * floats, w + (n0 + j) * K, K, out, m0, n0 + j, nullptr);
        }
      }
    }
  });
}

bool is_column_vector(const Tensor& t, int64_t N) {
  return t.device().is_cpu() && t.dim() == 1 && t.size(0) == N && t.is_contiguous() &&
         (t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat);
}

ColumnVector column_vector(const c10::optional<Tensor>& t, float absent) {
  ColumnVector v;
  v.absent = absent;
  if (t && t->defined()) {
    v.data = t->data_ptr();
    v.is_bf16 = t->scalar_type() == at::kBFloat16;
  }
  return v;
}

// Whether the kernel applies to x (at most max_rows rows), an (N, K) weight of dtype `wtype`, and the bias.
bool kernel_applies(const Tensor& x, const Tensor& weight, at::ScalarType wtype, const c10::optional<Tensor>& bias,
                    int64_t max_rows) {
  if (!skinny_supported()) return false;
  if (!x.device().is_cpu() || !weight.device().is_cpu()) return false;
  if (x.scalar_type() != at::kBFloat16 && x.scalar_type() != at::kFloat) return false;
  if (weight.scalar_type() != wtype || weight.dim() != 2 || !weight.is_contiguous()) return false;
  const int64_t N = weight.size(0), K = weight.size(1);
  if (x.dim() < 1 || x.size(-1) != K || K == 0 || N == 0) return false;
  const int64_t M = x.numel() / K;
  if (M == 0 || M > max_rows) return false;
  if (bias && bias->defined() && !is_column_vector(*bias, N)) return false;
  return true;
}

std::vector<int64_t> output_shape(const Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

// Block scales as the int8 kernel reads them: (N, ceil(K / 32)) fp32, contiguous, on the CPU.
bool block_scales_fit(const Tensor& scales, int64_t N, int64_t K) {
  return scales.dim() == 2 && scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
         scales.device().is_cpu() && scales.size(0) == N && scales.size(1) == (K + 31) / 32;
}

// Rows n0 .. n1-1 of W in fp32 (exactly): int8 codes times their scales (one per row, or per block of 32 along it), or
// bf16 weights (no scales) widened. The products past the kernels' rows run on these, a chunk at a time.
Tensor widened_rows(const Tensor& weight, const c10::optional<Tensor>& scales, int64_t n0, int64_t n1) {
  Tensor w = weight.slice(0, n0, n1).to(at::kFloat);
  if (scales && scales->defined()) {
    const Tensor s = scales->slice(0, n0, n1).to(at::kFloat);
    w.mul_(s.dim() == 2 ? s.repeat_interleave(32, 1).slice(1, 0, weight.size(1)) : s.unsqueeze(1));
  }
  return w;
}

// y = x·Wᵀ for bf16 weights through the kernel: dot products for one row, and for several where the CPU retires them
// faster than FMAs (the note at the top).
void bf16_gemm(const Tensor& x2, const uint16_t* w, const Output& out, int64_t M, int64_t N, int64_t K) {
  if (M == 1 || skinny_dot_rows())
    skinny_gemm<Bf16DotWeights>(x2, w, out, M, N, K);
  else
    skinny_gemm<Bf16Weights>(x2, w, out, M, N, K);
}

}  // namespace

bool skinny_supported() { return lorakit_kernels::bf16_kernels_supported(); }

bool skinny_dot_rows() {
  static const bool dot = [] {
    const char* set = std::getenv("LORAKIT_SKINNY_DOT");
    const std::string choice = set ? set : "";
    if (choice == "0" || choice == "1") return choice == "1";
    if (!choice.empty())
      std::fprintf(stderr, "lorakit: LORAKIT_SKINNY_DOT=%s is neither 0 nor 1; the CPU's default form is used\n", set);
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") != 0;
  }();
  return dot;
}

int64_t skinny_max_rows() { return skinny_dot_rows() ? kMaxRowsDot : kMaxRows; }

Tensor skinny_linear(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias) {
  int64_t max_rows = skinny_max_rows();
  if (weight.dim() == 2 && weight.numel() > 0 && std::min(weight.size(0), weight.size(1)) <= kSmallDim)
    max_rows = std::max(max_rows, std::min(kMaxRowsSmall, kMaxSmallMacs / weight.numel()));
  if (!kernel_applies(x, weight, at::kBFloat16, bias, max_rows)) {
    // at::linear wants x and bias in the weight's dtype: an fp32 x is rounded to bf16 as the kernel would
    const auto wtype = weight.scalar_type();
    const bool cast_bias = bias && bias->defined() && bias->scalar_type() != wtype;
    return at::linear(x.scalar_type() == wtype ? x : x.to(wtype), weight,
                      cast_bias ? c10::optional<Tensor>(bias->to(wtype)) : bias);
  }
  const int64_t N = weight.size(0), K = weight.size(1);
  const Tensor x2 = x.reshape({-1, K}).contiguous();
  Tensor y = at::empty({x2.size(0), N}, x.options().dtype(at::kBFloat16));
  const Output out{y.data_ptr<c10::BFloat16>(), N, column_vector(c10::nullopt, 1.f), column_vector(bias, 0.f)};
  const auto* w = static_cast<const uint16_t*>(weight.data_ptr());
  bf16_gemm(x2, w, out, x2.size(0), N, K);
  return y.view(output_shape(x, N));
}

Tensor skinny_linear_int8(const Tensor& x, const Tensor& weight, const Tensor& scales,
                          const c10::optional<Tensor>& bias) {
  const int64_t N = weight.dim() == 2 ? weight.size(0) : 0, K = weight.dim() == 2 ? weight.size(1) : 0;
  const bool grouped = scales.dim() == 2;
  const bool scales_fit = grouped ? block_scales_fit(scales, N, K) : is_column_vector(scales, N);
  if (!kernel_applies(x, weight, at::kChar, bias, kMaxRowsInt8) || !scales_fit) {
    // bf16 GEMMs on the weight rebuilt a chunk of rows at a time (int8.py's dequantized_linear)
    const Tensor xb = x.to(at::kBFloat16).reshape({-1, K});
    std::vector<Tensor> parts;
    for (int64_t n0 = 0; n0 < N; n0 += kRebuildRows) {
      const Tensor w = widened_rows(weight, scales, n0, std::min(N, n0 + kRebuildRows));
      parts.push_back(at::linear(xb, w.to(at::kBFloat16)));
    }
    Tensor y = at::cat(parts, 1);
    if (bias && bias->defined()) y.add_(bias->to(at::kBFloat16));
    return y.view(output_shape(x, N));
  }
  const Tensor x2 = x.reshape({-1, K}).contiguous();
  Tensor y = at::empty({x2.size(0), N}, x.options().dtype(at::kBFloat16));
  const auto* codes = static_cast<const int8_t*>(weight.data_ptr());
  if (grouped) {
    const Output out{y.data_ptr<c10::BFloat16>(), N, column_vector(c10::nullopt, 1.f), column_vector(bias, 0.f),
                     static_cast<const float*>(scales.data_ptr()), scales.size(1)};
    skinny_gemm<Int8GroupWeights>(x2, codes, out, x2.size(0), N, K);
  } else {
    const Output out{y.data_ptr<c10::BFloat16>(), N, column_vector(scales, 1.f), column_vector(bias, 0.f)};
    skinny_gemm<Int8Weights>(x2, codes, out, x2.size(0), N, K);
  }
  return y.view(output_shape(x, N));
}

Tensor skinny_logits(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& scales) {
  const bool int8 = scales && scales->defined();
  const int64_t N = weight.dim() == 2 ? weight.size(0) : 0, K = weight.dim() == 2 ? weight.size(1) : 0;
  const bool scales_fit = !int8 || block_scales_fit(*scales, N, K);
  if (!kernel_applies(x, weight, int8 ? at::kChar : at::kBFloat16, c10::nullopt, kMaxRowsLogits) || !scales_fit) {
    // fp32 GEMMs on the weight widened to fp32 (exactly) a chunk of rows at a time, x rounded to bf16 first
    const Tensor xf = x.to(at::kBFloat16).to(at::kFloat).reshape({-1, K});
    std::vector<Tensor> parts;
    for (int64_t n0 = 0; n0 < N; n0 += kRebuildRows)
      parts.push_back(at::linear(xf, widened_rows(weight, scales, n0, std::min(N, n0 + kRebuildRows))));
    return at::cat(parts, 1).view(output_shape(x, N));
  }
  const Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  Output out{nullptr, N, column_vector(c10::nullopt, 1.f), column_vector(c10::nullopt, 0.f)};
  out.y_fp32 = y.data_ptr<float>();
  if (int8) {
    out.group_scales = static_cast<const float*>(scales->data_ptr());
    out.groups = scales->size(1);
    skinny_gemm<Int8GroupWeights>(x2, static_cast<const int8_t*>(weight.data_ptr()), out, M, N, K);
  } else {
    bf16_gemm(x2, static_cast<const uint16_t*>(weight.data_ptr()), out, M, N, K);
  }
  return y.view(output_shape(x, N));
}
