// The Python module of lorakit's training kernels (one extension, built once): attention (causal_attention.h),
// RMSNorm (rms_norm.h), the SwiGLU product (swiglu.h) and the LM head's softmax cross-entropy
// (softmax_cross_entropy.h). Each computes with the GIL released.
#include <torch/extension.h>

#include "causal_attention.h"
#include "rms_norm.h"
#include "softmax_cross_entropy.h"
#include "swiglu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  const auto released = py::call_guard<py::gil_scoped_release>();
  m.def("attention_applies", &causal_attention_applies, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"));
  m.def("attention_forward", &causal_attention_forward, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"),
        py::arg("causal"), py::arg("scaling"), released);
  m.def("attention_backward", &causal_attention_backward, py::arg("grad"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("mask"), py::arg("causal"), py::arg("scaling"), released);
  m.def("rms_norm_applies", &rms_norm_applies, py::arg("x"), py::arg("weight"));
  m.def("rms_norm_forward", &rms_norm_forward, py::arg("x"), py::arg("weight"), py::arg("eps"), released);
  m.def("rms_norm_backward", &rms_norm_backward, py::arg("grad"), py::arg("x"), py::arg("weight"), py::arg("rstd"),
        released);
  m.def("swiglu_applies", &swiglu_applies, py::arg("gate"), py::arg("up"));
  m.def("swiglu_forward", &swiglu_forward, py::arg("gate"), py::arg("up"), released);
  m.def("swiglu_backward", &swiglu_backward, py::arg("grad"), py::arg("gate"), py::arg("up"), released);
  m.def("cross_entropy_applies", &softmax_cross_entropy_applies, py::arg("logits"), py::arg("targets"));
  m.def("cross_entropy", &softmax_cross_entropy, py::arg("logits"), py::arg("targets"), py::arg("softmax"),
        released);
}
