// y = x W^T + b for a single row x (a decode step), with W held in bf16 [N, K].
//
// At one row a linear layer is a matrix-vector product: each weight is read once and used once,
// so it is bound by the bytes of W. torch's bf16 linear at one row was measured at about half
// the machine's memory read rate on AVX-512 machines (docs/findings.md), and a model computing
// in fp32 with bf16 storage first copies each weight to fp32. This kernel streams W's bf16 rows
// once, widens them to fp32 in registers (bf16 is fp32's upper half) and accumulates in fp32,
// so it serves both compute dtypes without a copy of W.
//
// Rows are taken kRows at a time, sharing each load of x; row blocks are split over threads.
// ATen alone, not torch/extension.h: the Python bindings live in module.cpp, and this file then
// compiles in a quarter of the time.
#include <ATen/ATen.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "vec.h"

namespace {

using namespace kvpareto;

constexpr int64_t kRows = 4;
constexpr int64_t kTaskBytes = 32 * 1024;  // least weight bytes per thread task

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// out[r] = w[r] . x for the `rows` (<= kRows) rows of K bf16 weights starting at w.
template <int64_t R>
inline void dots(const uint16_t* w, int64_t K, const float* x, float* out) {
  Vec acc[R];
  for (int64_t r = 0; r < R; ++r) acc[r] = vzero();
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    const Vec xv = vload(x + k);
    for (int64_t r = 0; r < R; ++r) acc[r] = vfma(vbf16(w + r * K + k), xv, acc[r]);
  }
  for (int64_t r = 0; r < R; ++r) {
    float s = vsum(acc[r]);
    for (int64_t j = k; j < K; ++j) s += bf16_to_float(w[r * K + j]) * x[j];
    out[r] = s;
  }
}

// A contiguous tensor of any of the three float dtypes, as fp32 values.
std::vector<float> as_floats(const at::Tensor& t) {
  std::vector<float> f(t.numel());
  switch (t.scalar_type()) {
    case at::kBFloat16:
      std::copy_n(t.data_ptr<at::BFloat16>(), f.size(), f.begin());
      break;
    case at::kHalf:
      std::copy_n(t.data_ptr<at::Half>(), f.size(), f.begin());
      break;
    default:
      std::copy_n(t.data_ptr<float>(), f.size(), f.begin());
  }
  return f;
}

// Stores v into element i of `out`, rounded once to nearest even as torch's own linear does.
template <typename T>
inline void put(void* out, int64_t i, float v) {
  static_cast<T*>(out)[i] = static_cast<T>(v);
}

}  // namespace

at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == at::kBFloat16,
              "decode_linear: the weight must be a contiguous bf16 matrix");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.numel() == K, "decode_linear: x must be one row of ", K, " values");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "decode_linear: x must be fp32, bf16 or fp16");
  TORCH_CHECK(bias.numel() == 0 || (bias.numel() == N && bias.is_contiguous()),
              "decode_linear: the bias must hold one value per output");

  const std::vector<float> xf = as_floats(x.contiguous());
  const std::vector<float> bias_f = bias.numel() ? as_floats(bias) : std::vector<float>();
  const float* b = bias_f.empty() ? nullptr : bias_f.data();
  auto store = dtype == at::kBFloat16 ? put<at::BFloat16>
               : dtype == at::kHalf   ? put<at::Half>
                                      : put<float>;

  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  at::Tensor out = at::empty(shape, x.options());
  void* o = out.data_ptr();
  const uint16_t* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  const int64_t blocks = (N + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, kTaskBytes / (kRows * K * 2));

  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    float y[kRows];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * kRows, rows = std::min(kRows, N - n0);
      if (rows == kRows)
        dots<kRows>(w + n0 * K, K, xf.data(), y);
      else
        for (int64_t r = 0; r < rows; ++r) dots<1>(w + (n0 + r) * K, K, xf.data(), y + r);
      for (int64_t r = 0; r < rows; ++r) store(o, n0 + r, b ? y[r] + b[n0 + r] : y[r]);
    }
  });
  return out;
}
