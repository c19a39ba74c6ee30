// One decode step of a Llama-family model (Llama, Mistral, Qwen2, Qwen3, SmolLM) through every layer, in C++.
//
// The same ATen calls, in the same order and on the same tensors, as the Python step in decode.py (which mirrors
// transformers' modules), so the results are the same bits in fp32; what it saves is Python's cost for each of the
// dozens of small operations a layer between the matrix products of a one-token step. In bf16 its own kernels take
// the products, the attention and the elementwise passes (fused_ops.h), within bf16 rounding of the Python step.
// compiled_step.py builds the structs below from a model's modules and falls back to the Python step for anything
// they do not describe.
#include <torch/extension.h>

#include <tuple>
#include <vector>

#include "amx_gemm.h"
#include "decode_attention.h"
#include "fused_ops.h"
#include "mixed_lora.h"
#include "skinny_gemm.h"

namespace {

using at::Tensor;
using c10::optional;

// From this many rows a bf16 weight's packed copy (engine/frozen_base.py's DenseBase.pack, oneDNN's blocked layout)
// runs the product: oneDNN's GEMM then skips laying the weight out again, and gives F.linear's bits. With AMX it
// beats skinny_linear from 8 rows; on AVX-512 BF16 alone (AMD's Zen 4) it is slower than skinny_linear's kernel
// (docs/precision.md), so the packed copy takes the rows past the kernel's (past at::linear on the plain weight).
int64_t packed_rows() {
  static const int64_t rows = amx_supported() || !skinny_supported() ? 8 : skinny_max_rows() + 1;
  return rows;
}

Tensor packed_linear(const Tensor& x, const Tensor& packed, const optional<Tensor>& bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                             .typed<Tensor(const Tensor&, const Tensor&, const optional<Tensor>&, c10::string_view,
                                           c10::List<optional<at::Scalar>>, optional<c10::string_view>)>();
  return op.call(x, packed, bias, "none", c10::List<optional<at::Scalar>>(), c10::nullopt);
}

// y = x·Wᵀ + b (nn.Linear, or a LoRA layer whose adapter is merged or off); with an unmerged LoRA adapter
// y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ, computed as engine/function.py's lora_linear does: the LoRA term added into the base product.
// With a row mask, rows of different adapters (engine/mixed_rows.py): A and the scaled B are the adapters' side by
// side, and the mask keeps each row's share of x·Aᵀ to its own adapter.
// bf16 weights (a model cast for inference, inference/precision.py; compiled_step passes adapters in the weight's
// dtype) go through skinny_gemm's kernel, which reads the weight once for the few rows of a decode step; it hands
// larger batches to at::linear itself. int8 weights (with a scale per block of 32 along a row, inference/int8.py) go
// through its int8 kernel, computing in bf16, and past its 32 rows through bf16 GEMMs on rebuilt weights. fp32 stays
// at::linear.
struct Linear {
  Tensor weight;
  optional<Tensor> bias, lora_A, lora_B;
  double scaling;
  optional<Tensor> row_mask, scales, packed;
  bool fp32_logits = false;  // an LM head giving fp32 logits (inference/logits.py): skinny_logits, unrounded
  optional<Tensor> lora_B_pairs;  // rows mixed by adapter in bf16: B as mixed_lora_add takes it

  Linear(Tensor weight, optional<Tensor> bias, optional<Tensor> lora_A, optional<Tensor> lora_B, double scaling,
         optional<Tensor> row_mask, optional<Tensor> scales, optional<Tensor> packed, bool fp32_logits)
      : weight(std::move(weight)), bias(std::move(bias)), lora_A(std::move(lora_A)), lora_B(std::move(lora_B)),
        scaling(scaling), row_mask(std::move(row_mask)), scales(std::move(scales)), packed(std::move(packed)),
        fp32_logits(fp32_logits) {
    if (this->row_mask && this->lora_B && this->lora_B->scalar_type() == at::kBFloat16)
      lora_B_pairs = mixed_lora_pairs(*this->lora_B);
  }

  bool computes_bf16() const { return scales || weight.scalar_type() == at::kBFloat16; }

  Tensor base(const Tensor& x) const {
    if (scales) return skinny_linear_int8(x, weight, *scales, bias);
    if (packed && x.numel() >= packed_rows() * x.size(-1)) return packed_linear(x, *packed, bias);
    return weight.scalar_type() == at::kBFloat16 ? skinny_linear(x, weight, bias) : at::linear(x, weight, bias);
  }

  void set_row_mask(const optional<Tensor>& mask) {
    TORCH_CHECK(row_mask.has_value() == mask.has_value() &&
                    (!mask || (mask->size(-1) == lora_A->size(0) && mask->scalar_type() == row_mask->scalar_type())),
                "set_row_mask: other adapters need a view of their own");
    row_mask = mask;
  }

  Tensor operator()(const Tensor& x) const {
    if (!lora_A) return base(x);
    if (computes_bf16() && lora_A->scalar_type() == at::kBFloat16) return bf16_lora(x);
    if (row_mask) {
      Tensor out = at::linear(x, weight, bias);
      Tensor h = at::matmul(x.reshape({x.size(0), -1, x.size(-1)}).to(lora_A->scalar_type()), lora_A->t());
      h.mul_(*row_mask);
      out.view({-1, out.size(-1)}).addmm_(h.view({-1, h.size(-1)}).to(out.scalar_type()),
                                          lora_B->t().to(out.scalar_type()));
      return out;
    }
    Tensor flat = x.to(lora_A->scalar_type()).reshape({-1, x.size(-1)});
    Tensor h = at::linear(flat, *lora_A);
    Tensor out = bias ? at::addmm(*bias, flat, weight.t()) : at::mm(flat, weight.t());
    out.addmm_(h, lora_B->t(), 1, scaling);
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = -1;
    return out.view(shape);
  }

  // bf16 or int8 weights and bf16 adapters: the rank-r products through the skinny kernel too (oneDNN's bf16 GEMM
  // is slow at a few rows, and a step has two per adapted layer); the LoRA term is rounded to bf16 before it is added.
  // Rows mixed by adapter: mixed_lora_add, each row's own adapter's term in one pass.
  Tensor bf16_lora(const Tensor& x) const {
    Tensor out = base(x);
    if (lora_B_pairs && mixed_lora_applies(out, x, *lora_A, *row_mask)) {
      mixed_lora_add(out, x, *lora_A, *lora_B_pairs, *row_mask);
      return out;
    }
    Tensor h = skinny_linear(x, *lora_A, {});
    if (row_mask) {
      h = h.reshape({x.size(0), -1, h.size(-1)}).mul_(*row_mask);
      return out.add_(skinny_linear(h, *lora_B, {}).view_as(out));
    }
    return out.add_(skinny_linear(h, *lora_B, {}), scaling);
  }
};

// transformers' LlamaRMSNorm: x / sqrt(mean(x²) + eps) in fp32, times the weight, given in the weight's dtype (in
// bf16: fused_ops' one pass). A bf16 model's hidden states are fp32 (its residual stream,
// inference/residual_stream.py): the norm then computes in fp32 and rounds once, to the bf16 its products read.
struct RMSNorm {
  Tensor weight;
  double eps;

  bool fuses(const Tensor& x) const { return fused_norm_applies(x) && fused_ops_apply(weight); }

  Tensor operator()(const Tensor& x) const {
    if (fuses(x)) return rms_norm(x, weight, eps);
    Tensor h = x.to(at::kFloat);
    Tensor variance = h.pow(2).mean(-1, true);
    h = h * at::rsqrt(variance + eps);
    return (weight * h.to(x.scalar_type())).to(weight.scalar_type());
  }
};

struct Layer {
  RMSNorm input_norm, post_attention_norm;
  optional<RMSNorm> q_norm, k_norm;  // Qwen3 normalises q and k per head
  Linear q, k, v, o, gate, up, down;
  int64_t head_dim;
  double scaling;
};

// The slots of kv_cache.py's KVCache this step writes and reads (see Slots there)
struct Slots {
  Tensor rows, column;
  int64_t width;
  optional<Tensor> mask, start;
};

Tensor rotate_half(const Tensor& x) {
  int64_t half = x.size(-1) / 2;
  return at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
}

// Attend the one query per row over the slot's positions of layer i's cache (its new key and value stored): SDPA as
// the Python step calls it, or in bf16 (where the CPU has AVX-512 BF16) decode_attention over each row's [start,
// column] alone.
Tensor attend_stored(const Tensor& keys_i, const Tensor& values_i, const Tensor& q, const Slots& slots,
                     double scaling) {
  int64_t rows = q.size(0), heads = q.size(1), head_dim = q.size(3);
  Tensor keys = keys_i.slice(2, 0, slots.width), values = values_i.slice(2, 0, slots.width);
  if (slots.start && decode_attention_applies(q, keys))
    return decode_attention(q, keys, values, *slots.start, slots.column + 1, scaling);
  Tensor out;
  if (!slots.mask) {
    out = at::scaled_dot_product_attention(q, keys, values, {}, 0.0, false, scaling, heads != keys.size(1));
  } else {
    Tensor grouped = q.reshape({rows, keys.size(1), -1, head_dim});
    out = at::scaled_dot_product_attention(grouped, keys, values, slots.mask, 0.0, false, scaling);
  }
  return out.reshape({rows, heads, 1, head_dim}).transpose(1, 2).reshape({rows, 1, -1});
}

// q, k, v of a layer's step (rows, 1, heads · head_dim) rotated (transformers' apply_rotary_pos_emb), the new key
// and value stored at each slot's column, then attention; in bf16 the rotation and the store are fused_ops' one pass.
Tensor rotate_and_attend(const Layer& layer, Tensor q, Tensor k, Tensor v, const Tensor& cos, const Tensor& sin,
                         Tensor keys_i, Tensor values_i, const Slots& slots) {
  using at::indexing::Slice;
  const std::vector<int64_t> head = {q.size(0), 1, -1, layer.head_dim};
  if (!layer.q_norm && slots.rows.size(0) == keys_i.size(0) &&
      rotary_store_applies(q, k, v, cos, sin, keys_i, values_i)) {
    Tensor rotated = rotary_store(q, k, v, cos, sin, keys_i, values_i, slots.column);
    return attend_stored(keys_i, values_i, rotated, slots, layer.scaling);
  }
  q = q.view(head);
  k = k.view(head);
  if (layer.q_norm) {
    q = (*layer.q_norm)(q);
    k = (*layer.k_norm)(k);
  }
  q = q.transpose(1, 2);
  k = k.transpose(1, 2);
  Tensor c = cos.unsqueeze(1), s = sin.unsqueeze(1);
  Tensor q_rotated = (q * c) + (rotate_half(q) * s);
  Tensor k_rotated = (k * c) + (rotate_half(k) * s);
  keys_i.index_put_({slots.rows, Slice(), slots.column}, k_rotated.select(2, 0));
  values_i.index_put_({slots.rows, Slice(), slots.column}, v.view(head).transpose(1, 2).select(2, 0));
  return attend_stored(keys_i, values_i, q_rotated, slots, layer.scaling);
}

Tensor layer_step(const Layer& layer, const Tensor& hidden, const Tensor& cos, const Tensor& sin,
                  Tensor keys_i, Tensor values_i, const Slots& slots) {
  Tensor x = layer.input_norm(hidden);
  Tensor out = rotate_and_attend(layer, layer.q(x), layer.k(x), layer.v(x), cos, sin, keys_i, values_i, slots);
  Tensor attended = layer.o(out), h, y;
  if (layer.post_attention_norm.fuses(hidden) && fused_ops_apply(attended)) {  // the sum and the norm at once
    std::tie(h, y) = add_rms_norm(hidden, attended, layer.post_attention_norm.weight, layer.post_attention_norm.eps);
  } else {
    h = hidden + attended;
    y = layer.post_attention_norm(h);
  }
  Tensor gate = layer.gate(y), up = layer.up(y);
  return h + layer.down(fused_ops_apply(gate) && fused_ops_apply(up) ? silu_mul(gate, up) : at::silu(gate) * up);
}

// Every layer, the final norm and the LM head: the next-token logits [rows, vocab] in fp32
struct Model {
  std::vector<Layer> layers;
  RMSNorm norm;
  Linear lm_head;

  // Rows mixed by adapter: each product's row mask (each layer's seven, q k v o gate up down, then the LM head) for
  // other rows of the same adapters; a product without one keeps none.
  void set_row_masks(const std::vector<optional<Tensor>>& masks) {
    TORCH_CHECK(masks.size() == layers.size() * 7 + 1, "set_row_masks: a mask or None for each product");
    size_t i = 0;
    for (Layer& layer : layers)
      for (Linear* linear : {&layer.q, &layer.k, &layer.v, &layer.o, &layer.gate, &layer.up, &layer.down})
        linear->set_row_mask(masks[i++]);
    lm_head.set_row_mask(masks[i]);
  }

  Tensor step(Tensor hidden, const Tensor& cos, const Tensor& sin, const Tensor& keys, const Tensor& values,
              const Slots& slots) const {
    for (size_t i = 0; i < layers.size(); ++i) {
      hidden = layer_step(layers[i], hidden, cos, sin, keys.select(0, i), values.select(0, i), slots);
    }
    if (lm_head.fp32_logits) {  // inference/logits.py: AMX's layout packed for batches, else the skinny kernel
      const Tensor last = norm(hidden).select(1, -1);
      if (lm_head.packed && last.size(0) >= packed_rows())
        return amx_logits(last, *lm_head.packed, lm_head.weight.size(0));
      return skinny_logits(last, lm_head.weight, lm_head.scales);
    }
    return lm_head(norm(hidden)).select(1, -1).to(at::kFloat);
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  py::class_<Linear>(m, "Linear")
      .def(py::init<Tensor, optional<Tensor>, optional<Tensor>, optional<Tensor>, double, optional<Tensor>,
                    optional<Tensor>, optional<Tensor>, bool>(),
           py::arg("weight"), py::arg("bias"), py::arg("lora_A"), py::arg("lora_B"), py::arg("scaling"),
           py::arg("row_mask") = py::none(), py::arg("scales") = py::none(), py::arg("packed") = py::none(),
           py::arg("fp32_logits") = false);
  m.def("skinny_linear", &skinny_linear, py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("skinny_logits", &skinny_logits, py::arg("x"), py::arg("weight"), py::arg("scales") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("amx_supported", &amx_supported);
  m.def("packed_rows", &packed_rows);
  m.def("pack_for_amx", &pack_for_amx, py::arg("weight"));
  m.def("amx_logits", &amx_logits, py::arg("x"), py::arg("packed"), py::arg("N"),
        py::call_guard<py::gil_scoped_release>());
  m.def("skinny_linear_int8", &skinny_linear_int8, py::arg("x"), py::arg("weight"), py::arg("scales"),
        py::arg("bias") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("skinny_supported", &skinny_supported);
  m.def("skinny_dot_rows", &skinny_dot_rows);
  m.def("skinny_max_rows", &skinny_max_rows);
  m.def("decode_attention", &decode_attention, py::arg("q"), py::arg("keys"), py::arg("values"), py::arg("start"),
        py::arg("end"), py::arg("scaling"), py::call_guard<py::gil_scoped_release>());
  m.def("decode_attention_applies", &decode_attention_applies);
  m.def("fused_ops_apply", &fused_ops_apply);
  m.def("fused_norm_applies", &fused_norm_applies);
  m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("weight"), py::arg("eps"),
        py::call_guard<py::gil_scoped_release>());
  m.def("add_rms_norm", &add_rms_norm, py::arg("a"), py::arg("b"), py::arg("weight"), py::arg("eps"),
        py::call_guard<py::gil_scoped_release>());
  m.def("rotary_store", &rotary_store, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cos"), py::arg("sin"),
        py::arg("keys"), py::arg("values"), py::arg("column"));
  m.def("silu_mul", &silu_mul, py::arg("gate"), py::arg("up"),
        py::call_guard<py::gil_scoped_release>());
  m.def("mixed_lora_applies", &mixed_lora_applies, py::arg("out"), py::arg("x"), py::arg("A"), py::arg("mask"));
  m.def("mixed_lora_add", &mixed_lora_add, py::arg("out"), py::arg("x"), py::arg("A"), py::arg("B_pairs"),
        py::arg("mask"));
  m.def("mixed_lora_pairs", &mixed_lora_pairs, py::arg("B"));
  py::class_<RMSNorm>(m, "RMSNorm").def(py::init<Tensor, double>(), py::arg("weight"), py::arg("eps"));
  py::class_<Layer>(m, "Layer")
      .def(py::init<RMSNorm, RMSNorm, optional<RMSNorm>, optional<RMSNorm>, Linear, Linear, Linear, Linear, Linear,
                    Linear, Linear, int64_t, double>(),
           py::arg("input_norm"), py::arg("post_attention_norm"), py::arg("q_norm"), py::arg("k_norm"), py::arg("q"),
           py::arg("k"), py::arg("v"), py::arg("o"), py::arg("gate"), py::arg("up"), py::arg("down"),
           py::arg("head_dim"), py::arg("scaling"));
  py::class_<Slots>(m, "Slots")
      .def(py::init<Tensor, Tensor, int64_t, optional<Tensor>, optional<Tensor>>(), py::arg("rows"),
           py::arg("column"), py::arg("width"), py::arg("mask"), py::arg("start") = py::none());
  py::class_<Model>(m, "Model")
      .def(py::init<std::vector<Layer>, RMSNorm, Linear>(), py::arg("layers"), py::arg("norm"), py::arg("lm_head"))
      .def("step", &Model::step, py::call_guard<py::gil_scoped_release>())
      .def("set_row_masks", &Model::set_row_masks, py::arg("masks"));
}
