// The LoRA term of a bf16 decode step whose rows use different adapters (engine/mixed_rows.py), in one pass over the
// rows: row m's x·Aᵀ over its own adapter's rank columns only (the row mask says which), each rounded to bf16 as the
// masked product's are, then out[m] += h·Bᵀ summed in fp32 and rounded once (as mixed_forward's addmm_ rounds).
// What it replaces: skinny_linear(x, A) over every adapter's columns, the mask multiplied in, skinny_linear(h, B)
// and an add, four operations and three tensors a projection, for a term that is a few thousand products a row.
//
// mixed_lora_applies(out, x, A, mask): whether mixed_lora_add takes these: a CPU with AVX-512 BF16; out (M, N), x
//   (M, K), A (R, K) bf16 and contiguous (any leading dimensions flattened to M rows); mask (M, 1, R) bf16 with, in
//   each row, ones over one run of columns (its adapter's) and zeros elsewhere, or zeros only (a row on the base).
// mixed_lora_add(out, x, A, B_pairs, mask): out += the term, in place; B_pairs: mixed_lora_pairs(B) of the adapters'
//   scaled B's side by side (N, R) bf16.
// mixed_lora_pairs(B): B's rank columns two to a 32-bit lane, ((R + 1) / 2, N, 2) (a zero column past an odd R), as
//   AVX-512 BF16's dot product takes them.
#pragma once

#include <ATen/ATen.h>

bool mixed_lora_applies(const at::Tensor& out, const at::Tensor& x, const at::Tensor& A, const at::Tensor& mask);

void mixed_lora_add(at::Tensor& out, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B_pairs,
                    const at::Tensor& mask);

at::Tensor mixed_lora_pairs(const at::Tensor& B);
