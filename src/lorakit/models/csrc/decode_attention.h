// Attention for a decode step on CPU: one query per row over that row's cached keys and values, in bf16.
//
// decode_attention(q, keys, values, start, end, scaling):
//   q       (rows, heads, 1, head_dim) bf16: the step's rotated queries
//   keys    (rows, kv_heads, width, head_dim) bf16, values the same: a layer of the static cache (kv_cache.py), each
//           (row, kv head) a run of positions with head_dim contiguous (the cache's slots may be strided)
//   start, end (rows) int64: row b attends to positions [start[b], end[b]) (its new key and value already stored)
//   -> (rows, 1, heads · head_dim) bf16: softmax(scaling · q·kᵀ)·v per head, query head h reading kv head
//      h / (heads / kv_heads) (grouped-query attention, as SDPA's enable_gqa and transformers' repeat_kv).
// Exact bf16 products summed in fp32 (AVX-512 BF16's dot product), the softmax and the weighted sum of values in fp32,
// each output rounded to bf16 once. Why not SDPA: its CPU flash kernel spends ~0.4 ms a layer on a 16-row step whose
// attention is a few MFLOP (its blocking is for long query sequences); here each (row, kv head) is one task over its
// own positions, with no mask to build or read.
// decode_attention_applies says whether it takes these inputs (bf16 on a CPU with AVX-512 BF16, head_dim a multiple
// of 32 up to 256, at most 16 query heads per kv head); elsewhere the step keeps SDPA.
#pragma once

#include <ATen/ATen.h>

bool decode_attention_applies(const at::Tensor& q, const at::Tensor& keys);

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& start, const at::Tensor& end, double scaling);
