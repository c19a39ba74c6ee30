// Attention for a decode step on CPU (one query per row, bf16 cache): see decode_attention.h.
//
// A task is one (row, kv head): the query heads that share that kv head score every cached position against their
// queries (vdpbf16ps on 32 bf16 at a time; the 16 lanes of 16 positions' products summed together, one vector of
// 16 scores), take the softmax of their scores in fp32 (a vectorised exp), then sum the values weighted by it,
// widened to fp32 once for a block of heads, in registers, and round once to bf16. The kernels carry a target
// attribute, as skinny_gemm.cpp's do; decode_attention_applies checks the CPU at run time.
#include "decode_attention.h"

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "bf16_vectors.h"
#include "elementwise.h"
#include "parallel.h"
#include "skinny_gemm.h"

namespace {

using at::Tensor;
using lorakit_kernels::bits;
using lorakit_kernels::exp_ps;
using lorakit_kernels::parallel_for;
using lorakit_kernels::tail_mask;
using lorakit_kernels::widen;

#define ATTENTION_TARGET BF16_TARGET
#define ATTENTION_INLINE BF16_INLINE

constexpr int64_t kMaxChunks = 8;  // head_dim / 32: up to 256
constexpr int64_t kMaxGroup = 16;  // query heads per kv head

// The sums of the 16 lanes of v[0], ..., v[15], as lanes 0..15 of one vector: pairs of vectors interleaved and
// added (their 128-bit lanes' halves), then quarters, then the four 128-bit lanes, 45 instructions for 16 sums.
ATTENTION_INLINE __m512 sum16(const __m512* v) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i)
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // each 128-bit lane: the partial sums of vectors 4i..4i+3 over that lane
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88),
                                   _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88),
                                   _mm512_shuffle_f32x4(quads[2], quads[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}

// scores[h·n + j] = scaling · q_h·k_j for the group's query heads h and positions j < n, 16 positions at a time
template <int64_t CH>
ATTENTION_TARGET void score(const uint16_t* q, const uint16_t* keys, int64_t key_stride, int64_t n, int64_t group,
                            float scaling, float* scores) {
  const __m512 scale = _mm512_set1_ps(scaling);
  for (int64_t h = 0; h < group; ++h) {
    __m512bh qv[CH];
#pragma GCC unroll 8
    for (int64_t c = 0; c < CH; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(q + h * CH * 32 + c * 32);
    int64_t j0 = 0;
    for (; j0 + 16 <= n; j0 += 16) {
      __m512 acc[16];
      const uint16_t* k = keys + j0 * key_stride;
#pragma GCC unroll 16
      for (int64_t p = 0; p < 16; ++p) {
        acc[p] = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[0], (__m512bh)_mm512_loadu_si512(k + p * key_stride));
#pragma GCC unroll 8
        for (int64_t c = 1; c < CH; ++c)
          acc[p] = _mm512_dpbf16_ps(acc[p], qv[c], (__m512bh)_mm512_loadu_si512(k + p * key_stride + c * 32));
      }
      _mm512_storeu_ps(scores + h * n + j0, _mm512_mul_ps(sum16(acc), scale));
    }
    for (; j0 < n; ++j0) {  // the last positions, one at a time
      __m512 acc = _mm512_setzero_ps();
#pragma GCC unroll 8
      for (int64_t c = 0; c < CH; ++c)
        acc = _mm512_dpbf16_ps(acc, qv[c], (__m512bh)_mm512_loadu_si512(keys + j0 * key_stride + c * 32));
      scores[h * n + j0] = _mm512_reduce_add_ps(acc) * scaling;
    }
  }
}

// scores of one head -> their softmax weights, in place; returns 1 / their sum before normalising
ATTENTION_TARGET float softmax(float* s, int64_t n) {
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    top = _mm512_mask_max_ps(top, m, top, _mm512_maskz_loadu_ps(m, s + j));
  }
  const __m512 most = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), most));
    _mm512_mask_storeu_ps(s + j, m, e);
    sum = _mm512_mask_add_ps(sum, m, sum, e);
  }
  return 1.f / _mm512_reduce_add_ps(sum);
}

// out_h = Σ_j w_h,j · v_j / Σ_j w_h,j for a block of HB heads (HB · 2·CH pieces of 16 fp32 in registers), each
// value widened once for the block, rounded to bf16
template <int64_t CH, int64_t HB>
ATTENTION_TARGET void weigh(const float* w, int64_t w_stride, const float* inverse_sums, const uint16_t* values,
                            int64_t value_stride, int64_t n, uint16_t* out) {
  __m512 acc[HB][2 * CH];
#pragma GCC unroll 32
  for (int64_t h = 0; h < HB; ++h)
#pragma GCC unroll 32
    for (int64_t p = 0; p < 2 * CH; ++p) acc[h][p] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t* v = values + j * value_stride;
    __m512 wide[2 * CH];
#pragma GCC unroll 32
    for (int64_t p = 0; p < 2 * CH; ++p) wide[p] = widen(v + 16 * p);
#pragma GCC unroll 32
    for (int64_t h = 0; h < HB; ++h) {
      const __m512 weight = _mm512_set1_ps(w[h * w_stride + j]);
#pragma GCC unroll 32
      for (int64_t p = 0; p < 2 * CH; ++p) acc[h][p] = _mm512_fmadd_ps(weight, wide[p], acc[h][p]);
    }
  }
#pragma GCC unroll 32
  for (int64_t h = 0; h < HB; ++h) {
    const __m512 scale = _mm512_set1_ps(inverse_sums[h]);
#pragma GCC unroll 32
    for (int64_t p = 0; p < 2 * CH; ++p) {
      const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[h][p], scale));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + h * CH * 32 + 16 * p), (__m256i)rounded);
    }
  }
}

struct Task {
  const uint16_t *q, *keys, *values;
  int64_t key_stride, value_stride, n, group;
  float scaling;
  uint16_t* out;
};

// Heads weighed together: as many as keep their sums in 16 registers, at most 4
template <int64_t CH>
constexpr int64_t kHeadBlock = std::max<int64_t>(1, std::min<int64_t>(4, 8 / CH));

template <int64_t CH>
void attend(const Task& t, std::vector<float>& scores) {
  scores.resize(t.group * t.n);
  float inverse_sums[kMaxGroup];
  score<CH>(t.q, t.keys, t.key_stride, t.n, t.group, t.scaling, scores.data());
  for (int64_t h = 0; h < t.group; ++h) inverse_sums[h] = softmax(scores.data() + h * t.n, t.n);
  for (int64_t h = 0; h < t.group; h += kHeadBlock<CH>) {
    const float* w = scores.data() + h * t.n;
    uint16_t* out = t.out + h * CH * 32;
    switch (std::min<int64_t>(kHeadBlock<CH>, t.group - h)) {
      case 1: weigh<CH, 1>(w, t.n, inverse_sums + h, t.values, t.value_stride, t.n, out); break;
      case 2: weigh<CH, 2>(w, t.n, inverse_sums + h, t.values, t.value_stride, t.n, out); break;
      case 3: weigh<CH, 3>(w, t.n, inverse_sums + h, t.values, t.value_stride, t.n, out); break;
      default: weigh<CH, 4>(w, t.n, inverse_sums + h, t.values, t.value_stride, t.n, out); break;
    }
  }
}

void attend_any(const Task& t, int64_t chunks, std::vector<float>& scores) {
  switch (chunks) {
    case 1: return attend<1>(t, scores);
    case 2: return attend<2>(t, scores);
    case 3: return attend<3>(t, scores);
    case 4: return attend<4>(t, scores);
    case 5: return attend<5>(t, scores);
    case 6: return attend<6>(t, scores);
    case 7: return attend<7>(t, scores);
    default: return attend<8>(t, scores);
  }
}

}  // namespace

bool decode_attention_applies(const Tensor& q, const Tensor& keys) {
  if (!skinny_supported() || !q.device().is_cpu() || !keys.device().is_cpu()) return false;
  if (q.scalar_type() != at::kBFloat16 || keys.scalar_type() != at::kBFloat16) return false;
  if (q.dim() != 4 || keys.dim() != 4 || q.size(2) != 1 || q.size(0) != keys.size(0)) return false;
  const int64_t head_dim = q.size(3), heads = q.size(1), kv_heads = keys.size(1);
  return head_dim % 32 == 0 && head_dim <= 32 * kMaxChunks && keys.size(3) == head_dim && kv_heads > 0 &&
         heads % kv_heads == 0 && heads / kv_heads <= kMaxGroup && keys.stride(3) == 1;
}

Tensor decode_attention(const Tensor& q, const Tensor& keys, const Tensor& values, const Tensor& start,
                        const Tensor& end, double scaling) {
  TORCH_CHECK(decode_attention_applies(q, keys), "decode_attention: inputs it does not take (see decode_attention.h)");
  TORCH_CHECK(values.sizes() == keys.sizes() && values.scalar_type() == at::kBFloat16 && values.stride(3) == 1,
              "decode_attention: values must be laid out as keys");
  const int64_t rows = q.size(0), heads = q.size(1), head_dim = q.size(3);
  const int64_t kv_heads = keys.size(1), width = keys.size(2), group = heads / kv_heads;
  const Tensor queries = q.contiguous();
  const Tensor first = start.to(at::kCPU, at::kLong).contiguous(), last = end.to(at::kCPU, at::kLong).contiguous();
  TORCH_CHECK(first.numel() == rows && last.numel() == rows, "decode_attention: one start and end per row");
  Tensor out = at::empty({rows, 1, heads * head_dim}, q.options());
  const uint16_t *qp = bits(queries), *kp = bits(keys), *vp = bits(values);
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t* a = first.data_ptr<int64_t>();
  const int64_t* z = last.data_ptr<int64_t>();
  parallel_for(0, rows * kv_heads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / kv_heads, g = t % kv_heads;
      const int64_t from = std::clamp<int64_t>(a[b], 0, width), to = std::clamp<int64_t>(z[b], from, width);
      uint16_t* o = op + (b * heads + g * group) * head_dim;
      if (to == from) {  // nothing to attend to: zeros (SDPA would give NaN; a decode row always has its own token)
        std::memset(o, 0, sizeof(uint16_t) * group * head_dim);
        continue;
      }
      const Task task{qp + (b * heads + g * group) * head_dim,
                      kp + b * keys.stride(0) + g * keys.stride(1) + from * keys.stride(2),
                      vp + b * values.stride(0) + g * values.stride(1) + from * values.stride(2),
                      keys.stride(2), values.stride(2), to - from, group, static_cast<float>(scaling), o};
      attend_any(task, head_dim / 32, scores);
    }
  });
  return out;
}
