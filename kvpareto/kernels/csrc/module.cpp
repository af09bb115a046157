// The Python module of kvpareto's kernels: one binding per kernel, each defined in its own file.
#include <torch/extension.h>

#include <tuple>
#include <vector>

torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k_new,
                               const torch::Tensor& v_new, const std::vector<torch::Tensor>& k_store,
                               const std::vector<int64_t>& k_layout,
                               const std::vector<torch::Tensor>& v_store,
                               const std::vector<int64_t>& v_layout, const torch::Tensor& k_mean,
                               const torch::Tensor& k_rot, const torch::Tensor& v_rot, int64_t lo,
                               int64_t kept, double scaling);
torch::Tensor decode_linear(const torch::Tensor& x, const torch::Tensor& weight,
                            const torch::Tensor& bias);
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> quantize_tokens(const torch::Tensor& x,
                                                                         int64_t bits,
                                                                         int64_t group,
                                                                         bool symmetric);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention,
        "Attention of one query token over a packed KV store (see decode_attention.cpp)");
  m.def("decode_linear", &decode_linear,
        "x W^T + b for one row x and a bf16 weight W (see decode_linear.cpp)");
  m.def("quantize_tokens", &quantize_tokens,
        "Per-token tiles of fp32 rows as packed codes, fp16 scale and zero (see quantize_tokens.cpp)");
}
