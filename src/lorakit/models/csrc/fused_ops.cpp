// The bf16 decode step's elementwise work, one pass each: see fused_ops.h.
#include "fused_ops.h"

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "bf16_vectors.h"
#include "elementwise.h"
#include "norm_row.h"
#include "parallel.h"
#include "skinny_gemm.h"

namespace {

using at::Tensor;
using lorakit_kernels::bits;
using lorakit_kernels::exp_ps;
using lorakit_kernels::load;
using lorakit_kernels::norm_row;
using lorakit_kernels::round_bf16;
using lorakit_kernels::rows_of;
using lorakit_kernels::store;
using lorakit_kernels::store_bf16;
using lorakit_kernels::tail_mask;
using lorakit_kernels::widen;


// out = a + b (a and out of one type: fp32, or bf16 bits rounded to nearest even; b bf16)
template <class T>
BF16_TARGET void add_row(const T* a, const uint16_t* b, int64_t d, T* out) {
  for (int64_t j = 0; j < d; j += 16) {
    const __mmask16 m = tail_mask(d - j);
    store(out + j, _mm512_add_ps(load(a + j, m), widen(b + j, m)), m);
  }
}

// One head of apply_rotary_pos_emb: x·cos + rotate_half(x)·sin, each product and the sum rounded to bf16 (half a
// multiple of 16)
BF16_TARGET void rotate_head(const uint16_t* x, const uint16_t* cos, const uint16_t* sin, int64_t half,
                             uint16_t* out) {
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  for (int64_t j = 0; j < half; j += 16) {
    const __m512 first = widen(x + j), second = widen(x + half + j);
    const __m512 c1 = widen(cos + j), c2 = widen(cos + half + j), s1 = widen(sin + j), s2 = widen(sin + half + j);
    const __m512 negated = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(second), sign));
    const __m512 rotated1 = round_bf16(_mm512_mul_ps(negated, s1));
    const __m512 rotated2 = round_bf16(_mm512_mul_ps(first, s2));
    store_bf16(out + j, _mm512_add_ps(round_bf16(_mm512_mul_ps(first, c1)), rotated1));
    store_bf16(out + half + j, _mm512_add_ps(round_bf16(_mm512_mul_ps(second, c2)), rotated2));
  }
}

// silu(gate) · up: gate / (1 + e^-gate) rounded to bf16, times up, rounded
BF16_TARGET void silu_mul_row(const uint16_t* gate, const uint16_t* up, int64_t d, uint16_t* out) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t j = 0; j < d; j += 16) {
    const __mmask16 m = tail_mask(d - j);
    const __m512 g = widen(gate + j, m);
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g));
    const __m512 silu = round_bf16(_mm512_div_ps(g, _mm512_add_ps(one, e)));
    store_bf16(out + j, _mm512_mul_ps(silu, widen(up + j, m)), m);
  }
}

constexpr int64_t kRowsATask = 64;  // a decode step's rows run on one thread; a prompt's thousands, on all

// f(r) for every row r of x, rows split between threads from kRowsATask rows on
template <class F>
void each_row(const Tensor& x, const F& f) {
  lorakit_kernels::parallel_for(0, rows_of(x), kRowsATask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) f(r);
  });
}

// x's data as the element type of the kernels' loops: fp32, or bf16 bits
template <class Tag>
using Element = std::conditional_t<sizeof(Tag) == 2, uint16_t, float>;

}  // namespace

bool fused_ops_apply(const Tensor& x) {
  return skinny_supported() && x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.is_contiguous();
}

bool fused_norm_applies(const Tensor& x) {
  return skinny_supported() && x.device().is_cpu() && x.is_contiguous() &&
         (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat);
}

Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  TORCH_CHECK(fused_norm_applies(x) && fused_ops_apply(weight) && weight.numel() == x.size(-1),
              "rms_norm: bf16 or fp32 rows, a bf16 weight");
  Tensor out = at::empty(x.sizes(), x.options().dtype(at::kBFloat16));
  const int64_t d = x.size(-1);
  const float e = static_cast<float>(eps);
  lorakit_kernels::by_dtype(x, [&](auto tag) {
    const auto* rows = reinterpret_cast<const Element<decltype(tag)>*>(x.data_ptr());
    each_row(x, [&](int64_t r) { norm_row(rows + r * d, bits(weight), d, e, bits(out) + r * d); });
  });
  return out;
}

std::pair<Tensor, Tensor> add_rms_norm(const Tensor& a, const Tensor& b, const Tensor& weight, double eps) {
  TORCH_CHECK(fused_norm_applies(a) && fused_ops_apply(b) && a.sizes() == b.sizes(),
              "add_rms_norm: bf16 or fp32 a, bf16 b");
  Tensor sum = at::empty_like(a);
  const int64_t d = a.size(-1);
  lorakit_kernels::by_dtype(a, [&](auto tag) {
    const auto* from = reinterpret_cast<const Element<decltype(tag)>*>(a.data_ptr());
    auto* to = reinterpret_cast<Element<decltype(tag)>*>(sum.data_ptr());
    each_row(a, [&](int64_t r) { add_row(from + r * d, bits(b) + r * d, d, to + r * d); });
  });
  return {sum, rms_norm(sum, weight, eps)};
}

bool rotary_store_applies(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cos, const Tensor& sin,
                          const Tensor& keys, const Tensor& values) {
  if (!(fused_ops_apply(q) && fused_ops_apply(k) && fused_ops_apply(v) && fused_ops_apply(cos) &&
        fused_ops_apply(sin) && keys.dim() == 4 && keys.scalar_type() == at::kBFloat16 && keys.device().is_cpu() &&
        values.sizes() == keys.sizes() && values.scalar_type() == at::kBFloat16 && keys.stride(3) == 1 &&
        values.stride(3) == 1))
    return false;
  const int64_t rows = keys.size(0), kv_heads = keys.size(1), head_dim = keys.size(3);
  return head_dim % 32 == 0 && rows_of(q) == rows && q.size(-1) % head_dim == 0 && rows_of(cos) == rows &&
         cos.size(-1) == head_dim && sin.sizes() == cos.sizes() && k.numel() == rows * kv_heads * head_dim &&
         v.numel() == k.numel();
}

Tensor rotary_store(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cos, const Tensor& sin,
                    Tensor keys, Tensor values, const Tensor& column) {
  TORCH_CHECK(rotary_store_applies(q, k, v, cos, sin, keys, values),
              "rotary_store: inputs it does not take (see fused_ops.h)");
  const int64_t rows = keys.size(0), kv_heads = keys.size(1), head_dim = keys.size(3), length = keys.size(2);
  const int64_t heads = q.size(-1) / head_dim, half = head_dim / 2;
  Tensor out = at::empty({rows, heads, 1, head_dim}, q.options());
  const Tensor columns = column.to(at::kCPU, at::kLong).contiguous();
  TORCH_CHECK(columns.numel() == rows, "rotary_store: one column per row");
  const int64_t* at_column = columns.data_ptr<int64_t>();
  for (int64_t b = 0; b < rows; ++b)
    TORCH_CHECK(at_column[b] >= 0 && at_column[b] < length, "rotary_store: a column outside the cache");
  for (int64_t b = 0; b < rows; ++b) {
    const uint16_t *c = bits(cos) + b * head_dim, *s = bits(sin) + b * head_dim;
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t offset = (b * heads + h) * head_dim;
      rotate_head(bits(q) + offset, c, s, half, bits(out) + offset);
    }
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t from = (b * kv_heads + h) * head_dim;
      const int64_t to_k = b * keys.stride(0) + h * keys.stride(1) + at_column[b] * keys.stride(2);
      const int64_t to_v = b * values.stride(0) + h * values.stride(1) + at_column[b] * values.stride(2);
      rotate_head(bits(k) + from, c, s, half, bits(keys) + to_k);
      std::copy(bits(v) + from, bits(v) + from + head_dim, bits(values) + to_v);
    }
  }
  return out;
}

Tensor silu_mul(const Tensor& gate, const Tensor& up) {
  TORCH_CHECK(fused_ops_apply(gate) && fused_ops_apply(up) && gate.sizes() == up.sizes(), "silu_mul: bf16 inputs");
  Tensor out = at::empty_like(gate);
  const int64_t d = gate.size(-1);
  each_row(gate, [&](int64_t r) { silu_mul_row(bits(gate) + r * d, bits(up) + r * d, d, bits(out) + r * d); });
  return out;
}
