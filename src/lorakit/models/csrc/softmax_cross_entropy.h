// The softmax cross-entropy of an LM head's logits, a chunk of rows at a time, for the label-only loss
// (training/loss.py): logits [rows, vocab] bf16 or fp32, contiguous, targets [rows] int64. ATen runs it as six passes
// over the rows (a cast to fp32, the max, subtract, exp, sum, divide, a cast back), a vocab-wide row each; this takes
// each row through the cache once.
#pragma once

#include <torch/extension.h>

// whether the kernel takes these inputs (and the CPU has AVX-512 with BF16)
bool softmax_cross_entropy_applies(const at::Tensor& logits, const at::Tensor& targets);

// each row's loss, log(sum(exp(logits))) − logits[target], in fp32; with `softmax`, the logits are overwritten in
// place with softmax(logits) in their dtype (what the gradient needs: softmax minus the target's one-hot), without
// a version bump: pass logits no autograd graph holds
at::Tensor softmax_cross_entropy(at::Tensor logits, const at::Tensor& targets, bool softmax);
