// fp32 logits on AMX tiles: see amx_gemm.h.
#include "amx_gemm.h"
#include "parallel.h"

#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kBlockN = 64;  // output columns per micro-kernel call: one packed block of the weight
constexpr int64_t kBlockM = 32;  // rows of x per call

int64_t padded_k(int64_t K) { return (K + 1) / 2 * 2; }

// x as the micro-kernel reads it: (M, Kp) bf16, contiguous, zero past K
at::Tensor rows_of(const at::Tensor& x, int64_t Kp) {
  const int64_t K = x.size(-1);
  at::Tensor x2 = x.to(at::kBFloat16).reshape({-1, K});
  if (Kp != K) x2 = at::constant_pad_nd(x2, {0, Kp - K});
  return x2.contiguous();
}

std::vector<int64_t> output_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

void check_fits(const at::Tensor& x, const at::Tensor& packed, int64_t N) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() &&
                  packed.device().is_cpu() && packed.size(1) % kBlockN == 0 &&
                  padded_k(x.size(-1)) == packed.size(1) / kBlockN && packed.size(0) == (N + kBlockN - 1) / kBlockN,
              "amx_logits: the packed weight does not fit x");
}

// Releases the AMX tile configuration of this thread at the end of its share, however it ends.
struct TilesReleased {
  ~TilesReleased() { at::native::cpublas::brgemm_release(true); }
};

}  // namespace

bool amx_supported() { return at::native::cpublas::could_pack(at::kBFloat16); }

at::Tensor pack_for_amx(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16, "pack_for_amx: a 2-D bf16 weight");
  const int64_t N = weight.size(0), K = weight.size(1), Kp = padded_k(K);
  const int64_t blocks = (N + kBlockN - 1) / kBlockN;
  // VNNI order for bf16 (cpublas::pack's, checked equal): a block's rows of W as 32-bit pairs, transposed
  const bool fits = Kp == K && blocks * kBlockN == N;
  const at::Tensor w = (fits ? weight : at::constant_pad_nd(weight, {0, Kp - K, 0, blocks * kBlockN - N})).contiguous();
  return w.view(at::kInt).reshape({blocks, kBlockN, Kp / 2}).transpose(1, 2).contiguous().view(at::kBFloat16)
      .reshape({blocks, Kp * kBlockN});
}

at::Tensor amx_logits(const at::Tensor& x, const at::Tensor& packed, int64_t N) {
  check_fits(x, packed, N);
  const int64_t blocks = packed.size(0), Kp = packed.size(1) / kBlockN;
  const at::Tensor x2 = rows_of(x, Kp);
  const int64_t M = x2.size(0);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const auto* a = x2.data_ptr<at::BFloat16>();
  const auto* w = packed.data_ptr<at::BFloat16>();
  float* out = y.data_ptr<float>();
  // parallel over blocks of 64 columns; each block's sums for 32 rows at a time go to a buffer of the task (the
  // last block may be narrower than the packed one), then to y
  lorakit_kernels::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    const TilesReleased release;
    std::vector<float> sums(kBlockM * kBlockN);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kBlockN, columns = std::min(kBlockN, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += kBlockM) {
        const int64_t rows = std::min(kBlockM, M - m0);
        at::native::cpublas::brgemm(rows, kBlockN, Kp, Kp, kBlockN, kBlockN, false, a + m0 * Kp, w + b * Kp * kBlockN,
                                    sums.data(), true);
        for (int64_t i = 0; i < rows; ++i)
          std::copy(sums.data() + i * kBlockN, sums.data() + i * kBlockN + columns, out + (m0 + i) * N + n0);
      }
    }
  });
  return y.view(output_shape(x, N));
}
