// The Python module of kvpareto's kernels: one binding per kernel, each defined in its own file
// (which includes ATen alone; only this file pays for torch/extension.h and pybind11).
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention,
        "Attention of one query token over a packed KV store (see decode_attention.cpp)");
  m.def("decode_linear", &decode_linear,
        "x W^T + b for one row x and a bf16 weight W (see decode_linear.cpp)");
  m.def("quantize_tokens", &quantize_tokens,
        "fp32 rows in per-token tiles as packed codes, fp16 scale and zero "
        "(see quantize_tokens.cpp)");
}
