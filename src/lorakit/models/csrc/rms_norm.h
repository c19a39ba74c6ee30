// transformers' RMSNorm (LlamaRMSNorm's formula, a frozen weight) on CPU for training, forward and backward in one
// pass over each row: x [..., d] bf16 or fp32, contiguous, weight [d] of x's dtype. ATen runs the module as eight
// operations each way, with fp32 copies of the rows between them; this reads a row, sums in fp32 and writes once.
#pragma once

#include <torch/extension.h>

#include <tuple>

// whether the kernels take these inputs (and the CPU has AVX-512 with BF16)
bool rms_norm_applies(const at::Tensor& x, const at::Tensor& weight);

// (weight · round(x / sqrt(mean(x²) + eps)) rounded to x's dtype, as LlamaRMSNorm computes it; each row's
// 1 / sqrt(mean(x²) + eps) in fp32, for the backward)
std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps);

// the gradient for x, given the output's gradient, x, the weight and the forward's per-row factors; computed in
// fp32 and rounded once
at::Tensor rms_norm_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& rstd);
