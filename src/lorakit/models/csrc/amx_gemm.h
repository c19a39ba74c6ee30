// fp32 logits from a bf16 LM head on AMX tiles, for the rows of a batched decode step (or many positions at once):
// oneDNN's batch-reduce GEMM micro-kernel (ATen's cpublas::brgemm) multiplies bf16 and leaves its fp32 sums as they
// are, where ATen's bf16 GEMMs round their output to bf16. The weight is read from a copy laid out once for it
// (pack_for_amx): W (N, K) in blocks of 64 output columns, each block in AMX's VNNI order (for each pair of k, the
// block's 64 columns' two weights side by side), N padded to a multiple of 64, K to a multiple of 2.
#pragma once

#include <ATen/ATen.h>

// Whether this CPU and PyTorch build run the micro-kernel for bf16 (AMX), checked at run time.
bool amx_supported();

// weight (N, K) bf16 -> the copy amx_logits reads.
at::Tensor pack_for_amx(const at::Tensor& weight);

// (x (..., K) bf16 or fp32, rounded to bf16) · Wᵀ -> (..., N) fp32, W given as pack_for_amx's copy.
at::Tensor amx_logits(const at::Tensor& x, const at::Tensor& packed, int64_t N);
