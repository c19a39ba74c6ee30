// Rows mixed by adapter, their LoRA term in one pass: see mixed_lora.h.
#include "mixed_lora.h"

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "bf16_vectors.h"
#include "elementwise.h"
#include "parallel.h"

namespace {

using at::Tensor;
using lorakit_kernels::bits;
using lorakit_kernels::rows_of;
using lorakit_kernels::store_bf16;
using lorakit_kernels::tail_mask;
using lorakit_kernels::widen;

constexpr uint16_t kOne = 0x3F80;  // 1.0 in bf16
constexpr int64_t kRows = 4;  // rows of one adapter computed together: its A and B read once for them
constexpr int64_t kDots = 4;  // rank columns computed together (independent sums, so the dot products overlap)
constexpr int64_t kBlocks = 4;  // blocks of 16 outputs computed together, likewise

struct Run {
  int64_t first, end;  // row's adapter owns rank columns [first, end); first == end: no term; first < 0: not a run
};

// The run of columns where mask row `row` (R wide) is 1: {0, 0} where it is all 0, {-1, -1} where it is no run
Run run_of(const uint16_t* row, int64_t R) {
  int64_t first = 0;
  while (first < R && row[first] == 0) ++first;
  int64_t end = first;
  while (end < R && row[end] == kOne) ++end;
  for (int64_t j = end; j < R; ++j)
    if (row[j] != 0) return {-1, -1};
  return first == R ? Run{0, 0} : Run{first, end};
}

// A group: up to kRows rows (indices into x and out) with the same run
struct Group {
  int64_t rows[kRows];
  int64_t count;
  Run run;
};

// h[r][c] = x[rows[r]]·A[c] for c in the group's run (kept as bf16 bits, columns numbered from the run's first pair),
// each in fp32 from exact bf16 products, rounded to bf16.
// The loops run kRows rows and kDots columns whatever the group has (a missing row repeats the last, a missing column
// the run's last; their sums are not kept), so that the sums stay in registers.
BF16_TARGET void dots(const Group& g, const uint16_t* x, const uint16_t* A, int64_t K, int64_t width, uint16_t* h) {
  const int64_t from = g.run.first / 2 * 2;
  const uint16_t* xs[kRows];
  for (int64_t r = 0; r < kRows; ++r) xs[r] = x + g.rows[std::min(r, g.count - 1)] * K;
  for (int64_t c0 = g.run.first; c0 < g.run.end; c0 += kDots) {
    const uint16_t* as[kDots];
    for (int64_t c = 0; c < kDots; ++c) as[c] = A + std::min(c0 + c, g.run.end - 1) * K;
    __m512 acc[kRows][kDots];
    for (int64_t r = 0; r < kRows; ++r)
      for (int64_t c = 0; c < kDots; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      const int64_t left = K - k;
      const __mmask32 m = left >= 32 ? 0xFFFFFFFFu : (1u << left) - 1;
      __m512bh a[kDots];
      for (int64_t c = 0; c < kDots; ++c) a[c] = (__m512bh)_mm512_maskz_loadu_epi16(m, as[c] + k);
      for (int64_t r = 0; r < kRows; ++r) {
        const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, xs[r] + k);
        for (int64_t c = 0; c < kDots; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xv, a[c]);
      }
    }
    for (int64_t r = 0; r < g.count; ++r)
      for (int64_t c = 0; c < std::min(kDots, g.run.end - c0); ++c)
        h[r * width + c0 - from + c] = static_cast<uint16_t>(_mm_extract_epi16(
            (__m128i)_mm256_castsi256_si128((__m256i)_mm512_cvtneps_pbh(_mm512_set1_ps(_mm512_reduce_add_ps(acc[r][c])))), 0));
  }
}

// out[rows[r]][n] += Σ_c h[r][c]·B[n][c] over n < N, each sum in fp32 and the addition rounded once. B_pairs holds B
// two rank columns to a 32-bit lane ((R + 1) / 2, N, 2), so that one dot product instruction takes two columns of
// 16 outputs; h pairs likewise (zero outside the run). kRows rows (h is zero past the group's) and kBlocks blocks of
// 16 outputs at a time: independent sums, kept in registers, so that the dot products overlap.
BF16_TARGET void add_terms(const Group& g, const uint16_t* h, int64_t width, const uint16_t* B_pairs, int64_t N,
                           uint16_t* out) {
  const int64_t from = g.run.first / 2, to = (g.run.end + 1) / 2;
  for (int64_t n0 = 0; n0 < N; n0 += 16 * kBlocks) {
    __mmask32 m[kBlocks];
    for (int64_t b = 0; b < kBlocks; ++b) {
      const int64_t left = std::max<int64_t>(0, N - n0 - 16 * b);
      m[b] = left >= 16 ? 0xFFFFFFFFu : (1u << (2 * left)) - 1;
    }
    __m512 term[kRows][kBlocks];
    for (int64_t r = 0; r < kRows; ++r)
      for (int64_t b = 0; b < kBlocks; ++b) term[r][b] = _mm512_setzero_ps();
    for (int64_t p = from; p < to; ++p) {
      __m512bh w[kBlocks];
      for (int64_t b = 0; b < kBlocks; ++b)
        w[b] = (__m512bh)_mm512_maskz_loadu_epi16(m[b], B_pairs + (p * N + n0 + 16 * b) * 2);
      for (int64_t r = 0; r < kRows; ++r) {
        uint32_t pair;  // h's two bf16 of rank columns 2p, 2p + 1 (as the dot product pairs them)
        std::memcpy(&pair, h + r * width + 2 * (p - from), sizeof(pair));
        const __m512bh hp = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
        for (int64_t b = 0; b < kBlocks; ++b) term[r][b] = _mm512_dpbf16_ps(term[r][b], hp, w[b]);
      }
    }
    for (int64_t r = 0; r < g.count; ++r)
      for (int64_t b = 0; b < kBlocks && n0 + 16 * b < N; ++b) {
        const __mmask16 mb = tail_mask(N - n0 - 16 * b);
        uint16_t* y = out + g.rows[r] * N + n0 + 16 * b;
        store_bf16(y, _mm512_add_ps(widen(y, mb), term[r][b]), mb);
      }
  }
}

// The rows with a term in groups of up to kRows with the same run
std::vector<Group> groups_of(const uint16_t* mask, int64_t M, int64_t R) {
  std::vector<std::pair<Run, int64_t>> rows;
  for (int64_t m = 0; m < M; ++m) {
    const Run run = run_of(mask + m * R, R);
    if (run.end > run.first) rows.push_back({run, m});
  }
  std::stable_sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.first.first < b.first.first; });
  std::vector<Group> groups;
  for (const auto& [run, m] : rows) {
    if (groups.empty() || groups.back().count == kRows || groups.back().run.first != run.first ||
        groups.back().run.end != run.end)
      groups.push_back(Group{{}, 0, run});
    groups.back().rows[groups.back().count++] = m;
  }
  return groups;
}

}  // namespace

bool mixed_lora_applies(const Tensor& out, const Tensor& x, const Tensor& A, const Tensor& mask) {
  if (!lorakit_kernels::bf16_kernels_supported()) return false;
  for (const Tensor* t : {&out, &x, &A, &mask})
    if (!t->device().is_cpu() || t->scalar_type() != at::kBFloat16 || !t->is_contiguous()) return false;
  const int64_t M = rows_of(x), R = A.size(0);
  if (A.dim() != 2 || x.size(-1) != A.size(1) || rows_of(out) != M || mask.numel() != M * R) return false;
  for (int64_t m = 0; m < M; ++m)
    if (run_of(bits(mask) + m * R, R).first < 0) return false;
  return true;
}

void mixed_lora_add(Tensor& out, const Tensor& x, const Tensor& A, const Tensor& B_pairs, const Tensor& mask) {
  const int64_t K = x.size(-1), R = A.size(0), N = out.size(-1);
  TORCH_CHECK(mixed_lora_applies(out, x, A, mask) && B_pairs.scalar_type() == at::kBFloat16 &&
                  B_pairs.is_contiguous() && B_pairs.dim() == 3 && B_pairs.size(0) == (R + 1) / 2 &&
                  B_pairs.size(1) == N && B_pairs.size(2) == 2,
              "mixed_lora_add: inputs it does not take (see mixed_lora.h)");
  const std::vector<Group> groups = groups_of(bits(mask), rows_of(x), R);
  uint16_t* y = bits(out);
  const int64_t width = (R + 1) / 2 * 2 + 2;  // h's columns a row: room for a run's pairs from an odd first column
  lorakit_kernels::parallel_for(0, static_cast<int64_t>(groups.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> h(kRows * width);
    for (int64_t i = begin; i < end; ++i) {
      std::fill(h.begin(), h.end(), 0);
      dots(groups[i], bits(x), bits(A), K, width, h.data());
      add_terms(groups[i], h.data(), width, bits(B_pairs), N, y);
    }
  });
}

Tensor mixed_lora_pairs(const Tensor& B) {
  const int64_t N = B.size(0), R = B.size(1), even = (R + 1) / 2 * 2;
  const Tensor padded = even == R ? B : at::constant_pad_nd(B, {0, even - R});
  return padded.reshape({N, even / 2, 2}).permute({1, 0, 2}).contiguous();
}
