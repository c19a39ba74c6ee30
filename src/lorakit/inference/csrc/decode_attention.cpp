// Attention for a decode step on CPU (one query per row, bf16 cache): see decode_attention.h.
//
// A task is one (row, kv head): the query heads that share that kv head score every cached position against their
// queries (vdpbf16ps on 32 bf16 at a time, summed across the vector), take the softmax of their scores in fp32 (a
// vectorised exp), then sum the values weighted by it, widened to fp32, in registers, and round once to bf16. The
// kernels carry a target attribute, as skinny_gemm.cpp's do; decode_attention_applies checks the CPU at run time.
#include "decode_attention.h"

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "parallel.h"
#include "skinny_gemm.h"

namespace {

using at::Tensor;
using lorakit_kernels::parallel_for;

#define ATTENTION_TARGET __attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl,fma")))
#define ATTENTION_INLINE ATTENTION_TARGET __attribute__((always_inline)) inline

constexpr int64_t kMaxChunks = 8;  // head_dim / 32: up to 256
constexpr int64_t kMaxGroup = 16;  // query heads per kv head

// e^x for x <= 0 (a score less the row's maximum): x = n·ln 2 + r with n an integer and |r| <= ln 2 / 2 (ln 2 in two
// parts, so r is exact to fp32), e^r by its Taylor series to r^7 (relative error < 1e-8), times 2^n by scalef (0 far
// below).
ATTENTION_INLINE __m512 exp_ps(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  for (float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// 16 bf16 at p, widened to fp32 in order
ATTENTION_INLINE __m512 widen(const uint16_t* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

ATTENTION_INLINE __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

// scores[h·n + j] = scaling · q_h·k_j for the group's query heads h and positions j < n
template <int64_t CH>
ATTENTION_TARGET void score(const uint16_t* q, const uint16_t* keys, int64_t key_stride, int64_t n, int64_t group,
                            float scaling, float* scores) {
  __m512bh qv[kMaxGroup][CH];
  for (int64_t h = 0; h < group; ++h)
    for (int64_t c = 0; c < CH; ++c) qv[h][c] = (__m512bh)_mm512_loadu_si512(q + h * CH * 32 + c * 32);
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t* k = keys + j * key_stride;
    __m512bh kv[CH];
    for (int64_t c = 0; c < CH; ++c) kv[c] = (__m512bh)_mm512_loadu_si512(k + c * 32);
    for (int64_t h = 0; h < group; ++h) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < CH; ++c) acc = _mm512_dpbf16_ps(acc, qv[h][c], kv[c]);
      scores[h * n + j] = _mm512_reduce_add_ps(acc) * scaling;
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

// out_h = Σ_j w_j · v_j / Σ_j w_j for one head (2·CH pieces of 16 fp32 in registers), rounded to bf16
template <int64_t CH>
ATTENTION_TARGET void weigh(const float* w, float inverse_sum, const uint16_t* values, int64_t value_stride,
                            int64_t n, uint16_t* out) {
  __m512 acc[2 * CH];
  for (int64_t p = 0; p < 2 * CH; ++p) acc[p] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const __m512 weight = _mm512_set1_ps(w[j]);
    const uint16_t* v = values + j * value_stride;
    for (int64_t p = 0; p < 2 * CH; ++p) acc[p] = _mm512_fmadd_ps(weight, widen(v + 16 * p), acc[p]);
  }
  const __m512 scale = _mm512_set1_ps(inverse_sum);
  for (int64_t p = 0; p < 2 * CH; ++p) {
    const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[p], scale));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * p), (__m256i)rounded);
  }
}

struct Task {
  const uint16_t *q, *keys, *values;
  int64_t key_stride, value_stride, n, group;
  float scaling;
  uint16_t* out;
};

template <int64_t CH>
void attend(const Task& t, std::vector<float>& scores) {
  scores.resize(t.group * t.n);
  score<CH>(t.q, t.keys, t.key_stride, t.n, t.group, t.scaling, scores.data());
  for (int64_t h = 0; h < t.group; ++h) {
    float* w = scores.data() + h * t.n;
    weigh<CH>(w, softmax(w, t.n), t.values, t.value_stride, t.n, t.out + h * CH * 32);
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

const uint16_t* bits(const Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }

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
