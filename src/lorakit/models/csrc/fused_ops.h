// The bf16 decode step's elementwise work, fused: what ATen runs as dozens of small operations a layer (RMSNorm is
// eight, the rotary embedding fourteen), each a dispatch, an allocation and a pass over a few KB, done here as one
// pass each. The arithmetic is ATen's for bf16 tensors, rounding where it rounds (each bf16 operation's result to
// bf16, to nearest even), so the results are ATen's but for the order of an RMSNorm's sum of squares, the last bits
// of SiLU's exp (within a bf16 rounding: tested against the ATen operations) and values below bf16's normal range,
// which the AVX-512 BF16 conversion flushes to zero.
//
// fused_ops_apply(x): whether x (bf16, on a CPU with AVX-512 BF16, last dimension contiguous) takes them.
// fused_norm_applies(x): whether the two norms below take x: bf16 or fp32 (the fp32 residual stream of
//   inference/residual_stream.py), on such a CPU, contiguous.
// rms_norm(x, weight, eps): transformers' LlamaRMSNorm of (rows, 1, d) x, bf16 weight (d), in bf16; for fp32 x, the
//   fp32 module's output rounded once to bf16 (norm_row.h).
// add_rms_norm(a, b, weight, eps): (a + b, RMSNorm(a + b)): a layer's residual sum (in a's dtype; b bf16) and the
//   norm after it.
// rotary_store_applies(q, k, v, cos, sin, keys, values): whether rotary_store takes these (all bf16 as above,
//   head_dim a multiple of 32, one row of q, k, v, cos and sin per row of the cache layer).
// rotary_store(q, k, v, cos, sin, keys, values, column): q and k (rows, 1, heads · head_dim) rotated as
//   transformers' apply_rotary_pos_emb does with cos, sin (rows, 1, head_dim); the rotated k and v stored in a layer
//   of the static cache (rows, kv_heads, length, head_dim) at column[b] of row b; returns the rotated q as
//   (rows, heads, 1, head_dim).
// silu_mul(gate, up): silu(gate) · up, the SwiGLU MLP's middle.
#pragma once

#include <ATen/ATen.h>

#include <utility>

bool fused_ops_apply(const at::Tensor& x);

bool fused_norm_applies(const at::Tensor& x);

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

std::pair<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& weight,
                                               double eps);

bool rotary_store_applies(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                          const at::Tensor& sin, const at::Tensor& keys, const at::Tensor& values);

at::Tensor rotary_store(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                        const at::Tensor& sin, at::Tensor keys, at::Tensor values, const at::Tensor& column);

at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up);
