// Matrix products for decoding on CPU: a few rows of activations times a large weight, which is memory-bound, so the
// kernels read each weight once for all rows and spend as little as possible on anything else.
//
// skinny_linear: y = x·Wᵀ (+ bias), the same product as at::linear(x, W, bias) for bf16 tensors.
//   x      (..., K) bf16 or fp32 (fp32 is rounded to bf16 once up front; the product and output are then bf16);
//          any strides (a non-contiguous x is copied)
//   weight (N, K) bf16, row-major contiguous
//   bias   (N) bf16 or fp32, or none
//   -> y   (..., N) bf16, each output accumulated in fp32 (exact bf16 products, fp32 sums), plus the bias in fp32,
//          rounded to bf16 once (to nearest even; fp32 sums below 2^-126 in magnitude flush to zero).
// For x with few rows, M = numel(x) / K <= skinny_max_rows() (12, or 24 where the products are dot products; up to 32
// where N or K is at most 64 and M·N·K stays small: an adapter's rank-r product, which oneDNN spends ~20 us a call
// setting up): reads W once for all rows, at close to memory bandwidth. Anything else
// (more rows, where oneDNN's GEMM is faster; no AVX-512 BF16 on this CPU; other dtypes or devices; a non-contiguous
// weight) goes to at::linear, with x and bias cast to the weight's dtype (so an fp32 weight gives an fp32 y there).
//
// skinny_linear_int8: y = (x·w_intᵀ) · scales (+ bias), int8 weights with one symmetric scale per output channel, or
// one per block of 32 along each row.
//   x      (..., K) bf16 or fp32 (fp32 rounded to bf16 once up front)
//   weight (N, K) int8, row-major contiguous
//   scales (N) fp32 or bf16: one per output channel; or (N, ceil(K / 32)) fp32, contiguous: row n's weights
//          k = 32b .. 32b+31 are w_int[n, k] · scales[n, b] (llama.cpp's q8_0 blocks), multiplied in fp32 in registers
//   bias   (N) bf16 or fp32, or none
//   -> y   (..., N) bf16: x·w_int accumulated in fp32 and times the scale (with block scales, applied in fp32 to
//   each block's weights, or for a single row to each block's partial sum), plus the bias, in fp32, rounded to bf16
//   once. The kernel takes up to 32 rows of x; where it does not apply (more rows, no AVX-512 BF16, other dtypes or
//   layouts) the product is bf16 GEMMs (at::linear) on the weight rebuilt in bf16 4,096 rows at a time, as
//   inference/int8.py's dequantized_linear computes it: within a bf16 rounding or two of the kernel.
//   For comparison, ATen's torch._weight_int8pack_mm (bf16 scales) computes the same thing.
//
// skinny_logits: the next-token logits of a bf16 or int8 model in fp32: y = x·Wᵀ (· block scales) with the sums left
// unrounded, as llama.cpp keeps its logits. Rounding them to bf16 (a step of 1/16 to 1/8 at the logits' size) makes
// near ties and exact ties of tokens that fp32 tells apart; half of bf16's teacher-forced top-1 disagreement with fp32
// was that rounding (docs/precision.md).
//   x      (..., K) bf16 or fp32 (rounded to bf16 once)
//   weight (N, K) bf16, or int8 codes with `scales` (N, ceil(K / 32)) fp32 as skinny_linear_int8 takes them
//   -> y   (..., N) fp32. The kernel up to 32 rows; past that (or without AVX-512 BF16) fp32 GEMMs on the weight
//          widened to fp32 a chunk of rows at a time: the same exact products, summed in another order.
#pragma once

#include <ATen/ATen.h>

// y = x·Wᵀ (+ bias) for a few rows of x; see above.
at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

// y = (x·w_intᵀ)·scales (+ bias) for a few rows of x and int8 weights with per-row or per-block scales; see above.
at::Tensor skinny_linear_int8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                              const c10::optional<at::Tensor>& bias);

// The logits x·Wᵀ in fp32 for a bf16 weight, or int8 codes with block scales; see above.
at::Tensor skinny_logits(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scales);

// Whether this CPU has the instructions the kernels use (AVX-512F/BW/VL, AVX-512 BF16, FMA), checked at run time.
bool skinny_supported();

// Whether skinny_linear's products for several rows are AVX-512 BF16 dot products (on AMD's CPUs, which retire them
// at twice the products of FMAs) rather than fp32 FMAs (Intel's); LORAKIT_SKINNY_DOT=1 or 0 chooses instead (read
// once, at the first product; another value is named on stderr and the default kept).
bool skinny_dot_rows();

// The most rows skinny_linear's kernel takes for a bf16 weight (at::linear past them).
int64_t skinny_max_rows();
