// Attention over a whole sequence on CPU for training (queries and keys the same positions), forward and backward:
// q [B, H, T, D], k and v [B, KV, T, D] (H a multiple of KV: grouped queries), bf16 or fp32 with unit stride along
// D (D a multiple of 16), causal and/or a bool mask [B or 1, 1, T, T] (true: may attend). The forward also takes
// keys of S > T positions (a prompt's prefill after cached ones) with a bool mask [B or 1, 1, T, S] saying which.
// Products exact and summed in fp32, softmax in fp32, each output rounded once; a row that may see nothing gives
// zeros and no gradient.
// torch's CPU flash attention spends most of a short sequence's time outside its products; this keeps them in
// registers (causal_attention.cpp).
#pragma once

#include <torch/extension.h>

#include <tuple>

// whether the kernels take these inputs (and the CPU has AVX-512 with BF16)
bool causal_attention_applies(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const c10::optional<at::Tensor>& mask);

// (out [B, T, H, D], as transformers' attention functions return it; log-sum-exp [B, H, T] fp32)
std::tuple<at::Tensor, at::Tensor> causal_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const c10::optional<at::Tensor>& mask,
                                                            bool causal, double scaling);

// (dq, dk, dv), each shaped as its input; grad and out [B, H, T, D] (views of [B, T, H, D] will do)
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& mask, bool causal, double scaling);
