// The Python module of kvpareto's kernels: one binding per kernel, each defined in its own file
// (which includes ATen alone; only this file pays for torch/extension.h and pybind11).
#include <torch/extension.h>

#include <tuple>
#include <vector>

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                            const std::vector<at::Tensor>& k_store,
                            const std::vector<int64_t>& k_layout,
                            const std::vector<at::Tensor>& v_store,
                            const std::vector<int64_t>& v_layout, const at::Tensor& k_mean,
                            const at::Tensor& k_rot, const at::Tensor& v_rot, int64_t lo,
                            int64_t kept, double scaling);
at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_tokens(const at::Tensor& x, int64_t bits,
                                                               int64_t group, bool symmetric);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention,
        "Attention of one query token over a packed KV store (see decode_attention.cpp)");
  m.def("decode_linear", &decode_linear,
        "x W^T + b for one row x and a bf16 weight W (see decode_linear.cpp)");
  m.def("quantize_tokens", &quantize_tokens,
        "fp32 rows in per-token tiles as packed codes, fp16 scale and zero "
        "(see quantize_tokens.cpp)");
}
