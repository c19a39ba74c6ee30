// The SwiGLU MLP's middle on CPU for training, forward and backward: silu(gate) · up for gate and up [..., n] bf16
// or fp32, contiguous, the same shape and dtype. ATen runs the backward as seven elementwise operations over the
// intermediate width (a sigmoid, products, sums), each a pass with its own rounding; this makes one.
#pragma once

#include <torch/extension.h>

#include <tuple>

// whether the kernels take these inputs (and the CPU has AVX-512 with BF16)
bool swiglu_applies(const at::Tensor& gate, const at::Tensor& up);

// silu(gate) · up, rounded where ATen rounds (silu(gate) to the inputs' dtype, then the product)
at::Tensor swiglu_forward(const at::Tensor& gate, const at::Tensor& up);

// (d gate, d up) for the output's gradient, computed in fp32 and rounded once
std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& grad, const at::Tensor& gate,
                                                   const at::Tensor& up);
