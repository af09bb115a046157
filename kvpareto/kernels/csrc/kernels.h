// The kernels the Python module binds (module.cpp), each defined in its own file, which includes
// this header too so that a declaration cannot drift from its definition.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

// decode_attention.cpp
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                            const std::vector<at::Tensor>& k_store,
                            const std::vector<int64_t>& k_layout,
                            const std::vector<at::Tensor>& v_store,
                            const std::vector<int64_t>& v_layout, const at::Tensor& k_mean,
                            const at::Tensor& k_rot, const at::Tensor& v_rot, int64_t lo,
                            int64_t kept, double scaling);
// decode_linear.cpp
at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);
// quantize_tokens.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_tokens(const at::Tensor& x, int64_t bits,
                                                               int64_t group, bool symmetric);
