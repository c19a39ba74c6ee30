// Attention over a whole sequence on CPU, forward and backward, for training: see causal_attention.h.
//
// A task is one (batch row, query head), four query rows at a time. The forward scores the rows against the
// positions they may see (bf16 inputs: AVX-512 BF16 dot products on pairs along the head dimension, the keys laid
// out once per kv head; fp32 inputs: FMAs on the keys transposed; 32 positions a pass), takes the softmax in fp32,
// sums the values weighted by it and rounds once; it keeps each row's log-sum-exp. The backward recomputes the
// weights from it (as flash attention does: nothing T x T is kept between the passes), 64 rows at a time: their
// scores' gradients give dq at once, and a pass down each 4 positions' columns adds the rows' share to the head's
// dk and dv in fp32; a kv head's query heads' shares are summed and rounded once at the end. A block of rows stops
// at the last position any of them may see (causal rows: their own), and a column's pass starts at the first row
// that may see it.
#include "causal_attention.h"

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "bf16_vectors.h"
#include "parallel.h"

namespace {

using at::Tensor;
using lorakit_kernels::exp_ps;
using lorakit_kernels::parallel_for;
using lorakit_kernels::tail_mask;

#define ATTN_TARGET BF16_TARGET
#define ATTN_INLINE BF16_INLINE

constexpr int64_t kRows = 4;  // query rows a block
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A (rows, D) view of a [B, heads, T, D]-shaped tensor's slice for one batch row and head, read as fp32
struct Rows {
  const char* base;
  int64_t row_stride;  // bytes between positions
  bool bf16;

  ATTN_TARGET void row(int64_t i, int64_t D, float* out) const {  // D a multiple of 16
    const char* p = base + i * row_stride;
    for (int64_t d = 0; d < D; d += 16)
      _mm512_storeu_ps(out + d, bf16 ? lorakit_kernels::widen(reinterpret_cast<const uint16_t*>(p) + d)
                                     : _mm512_loadu_ps(reinterpret_cast<const float*>(p) + d));
  }
};

Rows rows_of(const Tensor& t, int64_t b, int64_t h) {  // t: [B, heads, T, D] with unit stride along D
  const int64_t size = t.element_size();
  const char* p = static_cast<const char*>(t.data_ptr()) + (b * t.stride(0) + h * t.stride(1)) * size;
  return {p, t.stride(2) * size, t.scalar_type() == at::kBFloat16};
}

// scale · v[0 .. D) rounded to out's dtype (bf16: once, to nearest even)
ATTN_TARGET void store_row(const float* v, int64_t D, float scale, char* out, bool bf16) {
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t d = 0; d < D; d += 16) {
    const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(v + d), sc);
    if (bf16)
      lorakit_kernels::store_bf16(reinterpret_cast<uint16_t*>(out) + d, x);
    else
      _mm512_storeu_ps(reinterpret_cast<float*>(out) + d, x);
  }
}

// Scores of fp32 rows against fp32 columns laid out (D, Sp): an FMA a product
struct Fp32Products {
  using Row = float;
  using Column = float;
  static constexpr int64_t kPerStep = 1;  // elements of d an instruction takes
  ATTN_INLINE static __m512 column(const float* b) { return _mm512_loadu_ps(b); }
  ATTN_INLINE static __m512 row(const float* a, int64_t d) { return _mm512_set1_ps(a[d]); }
  ATTN_INLINE static __m512 add(__m512 acc, __m512 x, __m512 b) { return _mm512_fmadd_ps(x, b, acc); }
};

// Scores of bf16 rows against bf16 pairs along d laid out (D / 2, Sp): AVX-512 BF16's dot products, 32 products an
// instruction (exact, summed in fp32) where an FMA makes 16
struct PairProducts {
  using Row = uint16_t;
  using Column = uint32_t;
  static constexpr int64_t kPerStep = 2;
  ATTN_INLINE static __m512bh column(const uint32_t* b) { return (__m512bh)_mm512_loadu_si512(b); }
  ATTN_INLINE static __m512bh row(const uint16_t* a, int64_t d) {
    uint32_t pair;
    std::memcpy(&pair, a + 2 * d, sizeof pair);
    return (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
  }
  ATTN_INLINE static __m512 add(__m512 acc, __m512bh x, __m512bh b) { return _mm512_dpbf16_ps(acc, x, b); }
};

// s[r · Sp + j'] = scale · Σ_d a[r][d] · b[d][j'] for the kRows rows of a (kRows, D) and the 16·J positions from j
template <class P, int J>
ATTN_INLINE void product_block(const typename P::Row* a, const typename P::Column* b, int64_t D, int64_t Sp, int64_t j,
                               __m512 scale, float* s) {
  __m512 acc[kRows][J];
#pragma GCC unroll 4
  for (int64_t r = 0; r < kRows; ++r)
#pragma GCC unroll 2
    for (int q = 0; q < J; ++q) acc[r][q] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D / P::kPerStep; ++d) {
    decltype(P::column(b)) columns[J];
#pragma GCC unroll 2
    for (int q = 0; q < J; ++q) columns[q] = P::column(b + d * Sp + j + 16 * q);
#pragma GCC unroll 4
    for (int64_t r = 0; r < kRows; ++r) {
      const auto x = P::row(a + r * D, d);
#pragma GCC unroll 2
      for (int q = 0; q < J; ++q) acc[r][q] = P::add(acc[r][q], x, columns[q]);
    }
  }
#pragma GCC unroll 4
  for (int64_t r = 0; r < kRows; ++r)
#pragma GCC unroll 2
    for (int q = 0; q < J; ++q) _mm512_storeu_ps(s + r * Sp + j + 16 * q, _mm512_mul_ps(acc[r][q], scale));
}

// s[r · Sp + j] = scale · Σ_d a[r][d] · b[d][j] for kRows rows of a and j < n (a multiple of 16), 32 positions a
// pass
template <class P>
ATTN_TARGET void products(const typename P::Row* a, const typename P::Column* b, int64_t D, int64_t Sp, int64_t n,
                          float scale, float* s) {
  const __m512 sc = _mm512_set1_ps(scale);
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) product_block<P, 2>(a, b, D, Sp, j, sc, s);
  for (; j < n; j += 16) product_block<P, 1>(a, b, D, Sp, j, sc, s);
}

// A block of kRows query rows (zeros past T): fp32, and for bf16 inputs the bf16 rows as they are
struct Block {
  std::vector<uint16_t> raw;

  void load(const Rows& from, int64_t i0, int64_t T, int64_t D, float* at) {
    std::fill(at, at + kRows * D, 0.f);
    for (int64_t r = 0; r < kRows && i0 + r < T; ++r) from.row(i0 + r, D, at + r * D);
    if (!from.bf16) return;
    raw.assign(kRows * D, 0);
    for (int64_t r = 0; r < kRows && i0 + r < T; ++r) std::memcpy(raw.data() + r * D, from.base + (i0 + r) *
                                                                   from.row_stride, D * sizeof(uint16_t));
  }
};

// What one task reads of the keys and values: K and V as (S, D) fp32, and laid out for scores against them (D, Sp)
// zero past S: fp32 transposed, or bf16 pairs for bf16 inputs
struct KeyBlock {
  int64_t S, Sp, D;
  bool bf16 = false;
  std::vector<float> k, v, kt, vt;
  std::vector<uint32_t> kp, vp;

  void load(const Rows& keys, const Rows& values, bool scores_against_values) {
    bf16 = keys.bf16;
    k.assign(S * D, 0.f);
    v.assign(S * D, 0.f);
    for (int64_t j = 0; j < S; ++j) {
      keys.row(j, D, k.data() + j * D);
      values.row(j, D, v.data() + j * D);
    }
    lay_out(keys, k, kt, kp);
    if (scores_against_values) lay_out(values, v, vt, vp);
  }

  void lay_out(const Rows& from, const std::vector<float>& rows, std::vector<float>& t, std::vector<uint32_t>& p) {
    if (bf16) {
      p.assign(D / 2 * Sp, 0);
      for (int64_t j = 0; j < S; ++j) {
        const char* row = from.base + j * from.row_stride;
        for (int64_t d = 0; d < D / 2; ++d) std::memcpy(&p[d * Sp + j], row + d * sizeof(uint32_t), sizeof(uint32_t));
      }
      return;
    }
    t.assign(D * Sp, 0.f);
    for (int64_t j = 0; j < S; ++j)
      for (int64_t d = 0; d < D; ++d) t[d * Sp + j] = rows[j * D + d];
  }

  // s = scale · block · (K or V)ᵀ for the block's rows and positions j < n (a multiple of 16)
  void scores(const Block& block, const float* rows, bool of_values, int64_t n, float scale, float* s) const {
    if (bf16)
      products<PairProducts>(block.raw.data(), (of_values ? vp : kp).data(), D, Sp, n, scale, s);
    else
      products<Fp32Products>(rows, (of_values ? vt : kt).data(), D, Sp, n, scale, s);
  }
};

// out[r][c .. c + 16W) = Σ_j w[r · Sp + j] · m[j][c .. c + 16W) for kRows rows, j < n
template <int W>
ATTN_TARGET void weighted_chunk(const float* w, int64_t Sp, const float* m, int64_t D, int64_t c, int64_t n,
                                float* out) {
  __m512 acc[kRows][W];
#pragma GCC unroll 4
  for (int64_t r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int p = 0; p < W; ++p) acc[r][p] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    __m512 mv[W];
#pragma GCC unroll 4
    for (int p = 0; p < W; ++p) mv[p] = _mm512_loadu_ps(m + j * D + c + 16 * p);
#pragma GCC unroll 4
    for (int64_t r = 0; r < kRows; ++r) {
      const __m512 x = _mm512_set1_ps(w[r * Sp + j]);
#pragma GCC unroll 4
      for (int p = 0; p < W; ++p) acc[r][p] = _mm512_fmadd_ps(x, mv[p], acc[r][p]);
    }
  }
#pragma GCC unroll 4
  for (int64_t r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int p = 0; p < W; ++p) _mm512_storeu_ps(out + r * D + c + 16 * p, acc[r][p]);
}

// out[r][:] = Σ_j w[r · Sp + j] · m[j][:] for kRows rows, j < n; D a multiple of 16, 64 columns a pass
void weighted_rows(const float* w, int64_t Sp, const float* m, int64_t D, int64_t n, float* out) {
  for (int64_t c = 0; c < D; c += 64) {
    switch (std::min<int64_t>(4, (D - c) / 16)) {
      case 1: weighted_chunk<1>(w, Sp, m, D, c, n, out); break;
      case 2: weighted_chunk<2>(w, Sp, m, D, c, n, out); break;
      case 3: weighted_chunk<3>(w, Sp, m, D, c, n, out); break;
      default: weighted_chunk<4>(w, Sp, m, D, c, n, out); break;
    }
  }
}

// acc[j][c .. c + 16W) += scale · Σ_i w[i · Sp + j] · a[i][c .. c + 16W) for the 4 positions j of [j0, j0 + 4)
// and the rows i of [first, T): a column pass over a chunk of a head's rows' (T, Sp) weights
template <int W>
ATTN_TARGET void column_chunk(const float* w, int64_t Sp, const float* a, int64_t D, int64_t c, int64_t j0,
                              int64_t first, int64_t T, float scale, float* acc) {
  constexpr int64_t J = 4;
  __m512 sum[J][W];
#pragma GCC unroll 4
  for (int64_t q = 0; q < J; ++q)
#pragma GCC unroll 4
    for (int p = 0; p < W; ++p) sum[q][p] = _mm512_setzero_ps();
  for (int64_t i = first; i < T; ++i) {
    __m512 av[W];
#pragma GCC unroll 4
    for (int p = 0; p < W; ++p) av[p] = _mm512_loadu_ps(a + i * D + c + 16 * p);
#pragma GCC unroll 4
    for (int64_t q = 0; q < J; ++q) {
      const __m512 x = _mm512_set1_ps(w[i * Sp + j0 + q]);
#pragma GCC unroll 4
      for (int p = 0; p < W; ++p) sum[q][p] = _mm512_fmadd_ps(x, av[p], sum[q][p]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
#pragma GCC unroll 4
  for (int64_t q = 0; q < J; ++q)
#pragma GCC unroll 4
    for (int p = 0; p < W; ++p) {
      float* o = acc + (j0 + q) * D + c + 16 * p;
      _mm512_storeu_ps(o, _mm512_fmadd_ps(sum[q][p], sc, _mm512_loadu_ps(o)));
    }
}

// acc[j][:] += scale · Σ_i w[i · Sp + j] · a[i][:] for j < n (rounded up to 4 within Sp) over `rows` rows that are
// positions c0.. of the sequence: the keys' and values' gradients from a chunk of a head's rows; rows before the
// first that may see j (`first`, by position) are skipped
void accumulate_columns(const float* w, int64_t Sp, const float* a, int64_t D, int64_t n, int64_t rows, int64_t c0,
                        const std::vector<int64_t>& first, float scale, float* acc) {
  for (int64_t j0 = 0; j0 < n; j0 += 4) {
    const int64_t from = std::clamp<int64_t>(*std::min_element(&first[j0], &first[j0] + 4) - c0, 0, rows);
    for (int64_t c = 0; c < D; c += 64) {
      switch (std::min<int64_t>(4, (D - c) / 16)) {
        case 1: column_chunk<1>(w, Sp, a, D, c, j0, from, rows, scale, acc); break;
        case 2: column_chunk<2>(w, Sp, a, D, c, j0, from, rows, scale, acc); break;
        case 3: column_chunk<3>(w, Sp, a, D, c, j0, from, rows, scale, acc); break;
        default: column_chunk<4>(w, Sp, a, D, c, j0, from, rows, scale, acc); break;
      }
    }
  }
}

// Which positions a block's rows may see: causal (j <= i), the mask's (B or 1, 1, T, S) bools, j < S
struct Visibility {
  const bool* mask;  // this batch row's (T, S), or null
  int64_t S;
  bool causal;

  // positions past every row of the block [i0, i0 + kRows): the block's scores stop there (rounded up to 16)
  int64_t end(int64_t i0, const std::vector<int64_t>& last) const {
    int64_t n = causal ? std::min<int64_t>(S, i0 + kRows) : S;
    if (mask) {
      int64_t seen = 0;
      for (int64_t r = 0; r < kRows; ++r) seen = std::max(seen, last[i0 + r] + 1);
      n = std::min(n, seen);
    }
    return n;
  }
};

// s[r][j] for j < n set to -inf where row i0 + r may not see position j (rows past T: everything); without a
// mask only the 16 positions around the block's own diagonal can hide anything
ATTN_TARGET void hide(float* s, int64_t Sp, int64_t n, int64_t i0, int64_t T, const Visibility& vis) {
  const __m512 none = _mm512_set1_ps(kNegInf);
  for (int64_t r = 0; r < kRows; ++r) {
    const int64_t i = i0 + r;
    const int64_t from = i < T && !vis.mask ? std::min(n, i0) / 16 * 16 : 0;
    for (int64_t j = from; j < n; j += 16) {
      const __mmask16 in = tail_mask(n - j);
      __mmask16 keep = i < T ? in : 0;
      if (vis.causal) keep &= i + 1 - j >= 16 ? in : i + 1 - j <= 0 ? 0 : tail_mask(i + 1 - j);
      if (vis.mask && i < T) {
        const __m128i bytes = _mm_maskz_loadu_epi8(in, vis.mask + i * vis.S + j);
        keep &= _mm_test_epi8_mask(bytes, bytes);
      }
      _mm512_mask_storeu_ps(s + r * Sp + j, in & static_cast<__mmask16>(~keep), none);
    }
  }
}

// a row's first n scores -> e^(s - max) in place, their sum in *sum; returns the row's log-sum-exp (+inf where it
// sees nothing: its weights then all 0)
ATTN_TARGET float exp_row(float* s, int64_t n, float* sum_out) {
  __m512 top = _mm512_set1_ps(kNegInf);
  for (int64_t j = 0; j < n; j += 16) top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, tail_mask(n - j), s + j));
  const float m = _mm512_reduce_max_ps(top);
  *sum_out = 0.f;
  if (m == kNegInf) {
    std::fill(s, s + n, 0.f);
    return std::numeric_limits<float>::infinity();
  }
  __m512 sum = _mm512_setzero_ps();
  const __m512 most = _mm512_set1_ps(m);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask(n - j);
    const __m512 e = _mm512_maskz_mov_ps(k, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), most)));
    _mm512_mask_storeu_ps(s + j, k, e);
    sum = _mm512_add_ps(sum, e);
  }
  *sum_out = _mm512_reduce_add_ps(sum);
  return m + std::log(*sum_out);
}

// Σ_d a[d] · b[d], D a multiple of 16 (the softmax's backward term Σ_d dO·O = Σ_j P·dP)
ATTN_TARGET float dot(const float* a, const float* b, int64_t D) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) sum = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), sum);
  return _mm512_reduce_add_ps(sum);
}

// ds[j] = p[j] · (ds[j] - delta) for j < n: the scores' gradient from the weights' (dP in ds)
ATTN_TARGET void softmax_grad(const float* p, float* ds, int64_t n, float delta) {
  const __m512 dl = _mm512_set1_ps(delta);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask(n - j);
    const __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, ds + j), dl);
    _mm512_mask_storeu_ps(ds + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p + j), x));
  }
}

// s[j] = e^(s[j] - lse) for j < n: the softmax weights again from the forward's log-sum-exp
ATTN_TARGET void weights_again(float* s, int64_t n, float lse) {
  const __m512 l = _mm512_set1_ps(lse);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask(n - j);
    _mm512_mask_storeu_ps(s + j, k, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), l)));
  }
}

struct Shape {
  int64_t B, H, KV, T, S, D, group;
};

Shape shape_of(const Tensor& q, const Tensor& k) {
  return {q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), q.size(1) / k.size(1)};
}

std::vector<int64_t> last_seen(const bool* mask, int64_t T, int64_t S) {  // per row: its last visible position
  std::vector<int64_t> last(T + kRows, -1);
  if (!mask) return last;
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = S - 1; j >= 0; --j)
      if (mask[i * S + j]) {
        last[i] = j;
        break;
      }
  return last;
}

// per position: the first row that may see it (T where none does)
std::vector<int64_t> first_seen(const bool* mask, int64_t T, int64_t S, bool causal) {
  std::vector<int64_t> first(S + 4, T);
  for (int64_t j = 0; j < S; ++j) {
    first[j] = causal ? std::min(j, T) : 0;
    if (!mask) continue;
    while (first[j] < T && !mask[first[j] * S + j]) ++first[j];
  }
  return first;
}

const bool* mask_of(const c10::optional<Tensor>& mask, int64_t b, int64_t T, int64_t S) {
  if (!mask) return nullptr;
  return mask->data_ptr<bool>() + (mask->size(0) == 1 ? 0 : b) * T * S;
}

}  // namespace

bool causal_attention_applies(const Tensor& q, const Tensor& k, const Tensor& v, const c10::optional<Tensor>& mask) {
  if (!lorakit_kernels::bf16_kernels_supported() || !q.device().is_cpu()) return false;
  const auto dt = q.scalar_type();
  if ((dt != at::kBFloat16 && dt != at::kFloat) || k.scalar_type() != dt || v.scalar_type() != dt) return false;
  if (q.dim() != 4 || k.dim() != 4 || v.sizes() != k.sizes() || q.size(0) != k.size(0)) return false;
  if (q.size(3) != k.size(3) || q.size(3) % 16 != 0 || k.size(1) == 0) return false;
  if (q.size(2) != k.size(2) && !(mask && q.size(2) < k.size(2))) return false;  // a longer cache: its mask says
  if (q.size(1) % k.size(1) != 0 || q.stride(3) != 1 || k.stride(3) != 1 || v.stride(3) != 1) return false;
  if (mask) {
    const auto& m = *mask;
    if (m.scalar_type() != at::kBool || m.dim() != 4 || m.size(1) != 1 || m.size(2) != q.size(2) ||
        m.size(3) != k.size(2) || (m.size(0) != 1 && m.size(0) != q.size(0)))
      return false;
  }
  return true;
}

namespace {

// What the forward and backward of one call share: the inputs, their shape, the mask, the scale
struct Call {
  Tensor q, k, v;
  c10::optional<Tensor> mask;
  Shape sh;
  int64_t Sp;
  bool causal;
  float scale;

  Call(const Tensor& q_, const Tensor& k_, const Tensor& v_, const c10::optional<Tensor>& mask_, bool causal_,
       double scaling)
      : q(q_), k(k_), v(v_), sh(shape_of(q_, k_)), Sp((k_.size(2) + 15) / 16 * 16), causal(causal_),
        scale(static_cast<float>(scaling)) {
    TORCH_CHECK(causal_attention_applies(q, k, v, mask_), "causal_attention: inputs it does not take");
    if (mask_) mask = mask_->contiguous();
  }
  Visibility visibility(int64_t b) const { return {mask_of(mask, b, sh.T, sh.S), sh.S, causal}; }
};

// A thread's buffers; the keys of the (batch row, kv head) its last task read, kept for the next head of the group
struct Worker {
  KeyBlock keys;
  Block block, grad_block;
  int64_t b = -1, g = -1;
  std::vector<int64_t> last, first;  // per row its last visible position; per position the first row seeing it

  Worker(const Call& c) : keys{c.sh.S, c.Sp, c.sh.D} {}
  const Visibility load(const Call& c, int64_t b_, int64_t h, bool scores_against_values) {
    const Visibility vis = c.visibility(b_);
    if (b_ != b || h / c.sh.group != g) {
      b = b_, g = h / c.sh.group;
      keys.load(rows_of(c.k, b, g), rows_of(c.v, b, g), scores_against_values);
      last = last_seen(vis.mask, c.sh.T, c.sh.S);
      first = first_seen(vis.mask, c.sh.T, c.sh.S, c.causal);
    }
    return vis;
  }
};

char* row_at(const Tensor& t, int64_t b, int64_t i, int64_t h) {  // t: [B, T, H, D] contiguous
  return static_cast<char*>(t.data_ptr()) + (((b * t.size(1) + i) * t.size(2) + h) * t.size(3)) * t.element_size();
}

// Head h of batch row b: its output rows and each row's log-sum-exp
void forward_head(const Call& c, Worker& w, int64_t b, int64_t h, const Tensor& out, float* lse_h) {
  const Visibility vis = w.load(c, b, h, false);
  const Rows queries = rows_of(c.q, b, h);
  std::vector<float> a(kRows * c.sh.D), s(kRows * c.Sp), o(kRows * c.sh.D);
  for (int64_t i0 = 0; i0 < c.sh.T; i0 += kRows) {
    const int64_t n = vis.end(i0, w.last);
    w.block.load(queries, i0, c.sh.T, c.sh.D, a.data());
    w.keys.scores(w.block, a.data(), false, (n + 15) / 16 * 16, c.scale, s.data());
    hide(s.data(), c.Sp, n, i0, c.sh.T, vis);
    float inverse[kRows];
    for (int64_t r = 0; r < kRows; ++r) {
      float sum = 0.f;
      const float l = exp_row(s.data() + r * c.Sp, n, &sum);
      if (i0 + r < c.sh.T) lse_h[i0 + r] = l;
      inverse[r] = sum > 0.f ? 1.f / sum : 0.f;
    }
    weighted_rows(s.data(), c.Sp, w.keys.v.data(), c.sh.D, n, o.data());
    for (int64_t r = 0; r < kRows && i0 + r < c.sh.T; ++r)
      store_row(o.data() + r * c.sh.D, c.sh.D, inverse[r], row_at(out, b, i0 + r, h), queries.bf16);
  }
}

constexpr int64_t kChunk = 64;  // rows whose weights the backward keeps at once (kChunk x S fp32, twice)

// Head h of batch row b, backward: its rows' dq, and its share of dk and dv (fp32 [S, D], added to)
void backward_head(const Call& c, Worker& w, int64_t b, int64_t h, const Tensor& grad, const Tensor& out,
                   const float* lse_h, const Tensor& dq, float* dk_h, float* dv_h) {
  const Visibility vis = w.load(c, b, h, true);
  const Rows queries = rows_of(c.q, b, h), grads = rows_of(grad, b, h), outs = rows_of(out, b, h);
  const int64_t D = c.sh.D, Sp = c.Sp;
  std::vector<float> a(kChunk * D), go(kChunk * D), p(kChunk * Sp), ds(kChunk * Sp), dqr(kRows * D), orow(D);
  for (int64_t c0 = 0; c0 < c.sh.T; c0 += kChunk) {
    const int64_t rows = std::min(kChunk, c.sh.T - c0);
    int64_t widest = 0;
    for (int64_t i0 = c0; i0 < c0 + rows; i0 += kRows) widest = std::max(widest, vis.end(i0, w.last));
    widest = std::min(Sp, (widest + 3) / 4 * 4);  // the column pass reads 4 positions at a time
    for (int64_t i0 = c0; i0 < c0 + rows; i0 += kRows) {
      const int64_t n = vis.end(i0, w.last), at = (i0 - c0);
      float *ai = a.data() + at * D, *gi = go.data() + at * D, *pi = p.data() + at * Sp, *dsi = ds.data() + at * Sp;
      w.block.load(queries, i0, c.sh.T, D, ai);
      w.grad_block.load(grads, i0, c.sh.T, D, gi);
      w.keys.scores(w.block, ai, false, (n + 15) / 16 * 16, c.scale, pi);
      w.keys.scores(w.grad_block, gi, true, (n + 15) / 16 * 16, 1.f, dsi);
      hide(pi, Sp, n, i0, c.sh.T, vis);
      for (int64_t r = 0; r < kRows; ++r) {
        float *pr = pi + r * Sp, *dsr = dsi + r * Sp;
        std::fill(pr + n, pr + std::max(n, widest), 0.f);
        std::fill(dsr + n, dsr + std::max(n, widest), 0.f);
        if (i0 + r >= c.sh.T || std::isinf(lse_h[i0 + r])) {
          std::fill(pr, pr + n, 0.f);
          std::fill(dsr, dsr + n, 0.f);
          continue;
        }
        weights_again(pr, n, lse_h[i0 + r]);
        outs.row(i0 + r, D, orow.data());
        softmax_grad(pr, dsr, n, dot(gi + r * D, orow.data(), D));
      }
      weighted_rows(dsi, Sp, w.keys.k.data(), D, n, dqr.data());
      for (int64_t r = 0; r < kRows && i0 + r < c.sh.T; ++r)
        store_row(dqr.data() + r * D, D, c.scale, row_at(dq, b, i0 + r, h), queries.bf16);
    }
    accumulate_columns(p.data(), Sp, go.data(), D, widest, rows, c0, w.first, 1.f, dv_h);
    accumulate_columns(ds.data(), Sp, a.data(), D, widest, rows, c0, w.first, c.scale, dk_h);
  }
}

}  // namespace

std::tuple<Tensor, Tensor> causal_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                                    const c10::optional<Tensor>& mask, bool causal, double scaling) {
  const Call c(q, k, v, mask, causal, scaling);
  Tensor out = at::empty({c.sh.B, c.sh.T, c.sh.H, c.sh.D}, q.options());
  Tensor lse = at::empty({c.sh.B, c.sh.H, c.sh.T}, q.options().dtype(at::kFloat));
  parallel_for(0, c.sh.B * c.sh.H, 1, [&](int64_t t0, int64_t t1) {
    Worker w(c);
    for (int64_t t = t0; t < t1; ++t)
      forward_head(c, w, t / c.sh.H, t % c.sh.H, out, lse.data_ptr<float>() + t * c.sh.T);
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> causal_attention_backward(const Tensor& grad, const Tensor& q, const Tensor& k,
                                                             const Tensor& v, const Tensor& out, const Tensor& lse,
                                                             const c10::optional<Tensor>& mask, bool causal,
                                                             double scaling) {
  const Call c(q, k, v, mask, causal, scaling);
  const Shape& sh = c.sh;
  TORCH_CHECK(sh.T == sh.S, "causal_attention_backward: queries and keys the same positions");
  const Tensor g_out = grad.stride(3) == 1 ? grad : grad.contiguous();
  Tensor dq = at::empty({sh.B, sh.T, sh.H, sh.D}, q.options());
  // each head's share of dk and dv in fp32 (Sp positions: the column passes write 4 at a time), summed over the kv
  // head's query heads and rounded once after
  Tensor dk_heads = at::zeros({sh.B, sh.H, c.Sp, sh.D}, q.options().dtype(at::kFloat));
  Tensor dv_heads = at::zeros_like(dk_heads);
  parallel_for(0, sh.B * sh.H, 1, [&](int64_t t0, int64_t t1) {
    Worker w(c);
    for (int64_t t = t0; t < t1; ++t)
      backward_head(c, w, t / sh.H, t % sh.H, g_out, out, lse.data_ptr<float>() + t * sh.T, dq,
                    dk_heads.data_ptr<float>() + t * c.Sp * sh.D, dv_heads.data_ptr<float>() + t * c.Sp * sh.D);
  });
  const std::vector<int64_t> grouped = {sh.B, sh.KV, sh.group, c.Sp, sh.D};
  const at::ScalarType dt = k.scalar_type();
  Tensor dk = dk_heads.view(grouped).sum(2).narrow(2, 0, sh.S).to(dt);
  Tensor dv = dv_heads.view(grouped).sum(2).narrow(2, 0, sh.S).to(dt);
  return {dq.transpose(1, 2), dk, dv};
}
