// Per-token quantization of new K/V rows into packed codes, bit-identical to codec.quantize for
// per-token tiles (1 x g) without clipping.
//
// A decode step moves one token out of each stream's full-precision tail into its packed store.
// In torch that is a few dozen small ops per stream (tile min/max, the directed fp16 rounding of
// the scale and zero, the codes, the packing): about 150 per layer and step, measured at 10-15
// ms a step for SmolLM2. Here it is one call. Every float operation mirrors codec.py's, one
// IEEE operation at a time (the build passes -ffp-contract=off, so that no multiply-add is
// fused where torch rounds twice): tests/test_quantize_tokens.py checks the codes, scales and
// zeros are equal to codec.quantize's.
// ATen alone, not torch/extension.h: the Python bindings live in module.cpp, and this file then
// compiles in a quarter of the time.
#include <ATen/ATen.h>

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "kernels.h"

namespace {

constexpr float kF16Max = 65504.f;

// codec._round_f16: fp32 to fp16, rounded up (>= x) or down (<= x). Round to nearest, then redo a
// value that landed on the wrong side with x nudged by one fp16 ulp (2^-10 relative, plus the
// smallest subnormal).
inline c10::Half round_f16(float x, bool up) {
  x = std::min(std::max(x, -kF16Max), kF16Max);  // NaN stays NaN, as torch's clamp keeps it
  const c10::Half nearest(x);
  const float n = static_cast<float>(nearest);
  if (up ? !(n < x) : !(n > x)) return nearest;
  const float nudge = std::fabs(x) * 0x1p-10f + 0x1p-24f;
  return c10::Half(up ? x + nudge : x - nudge);
}

}  // namespace

// x: fp32 [..., T, D] contiguous; returns (codes uint8 [..., T, D*bits/8], scale fp16
// [..., T, D/g], zero fp16 [..., T, D/g], or an empty tensor when symmetric).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_tokens(const at::Tensor& x, int64_t bits,
                                                               int64_t group, bool symmetric) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1,
              "quantize_tokens: x must be a contiguous fp32 tensor");
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "quantize_tokens: bits must be 2, 4 or 8");
  const int64_t D = x.size(-1), per = 8 / bits;
  TORCH_CHECK(group > 0 && group <= 256 && D % group == 0 && group % per == 0,
              "quantize_tokens: the group (at most 256) must divide the row and hold whole bytes");
  const int64_t rows = x.numel() / D, groups = D / group;

  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = D / per;
  at::Tensor codes = at::empty(shape, x.options().dtype(at::kByte));
  shape.back() = groups;
  at::Tensor scale = at::empty(shape, x.options().dtype(at::kHalf));
  at::Tensor zero =
      symmetric ? at::empty({0}, scale.options()) : at::empty(shape, scale.options());

  const float* xp = x.data_ptr<float>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  c10::Half* sp = scale.data_ptr<c10::Half>();
  c10::Half* zp = symmetric ? nullptr : zero.data_ptr<c10::Half>();
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1);  // symmetric
  const float levels = static_cast<float>((1 << bits) - 1);     // asymmetric
  const float offset = static_cast<float>(1 << (bits - 1));

  at::parallel_for(0, rows * groups, 64, [&](int64_t begin, int64_t end) {
    uint8_t q[256];
    for (int64_t i = begin; i < end; ++i) {
      const float* v = xp + i * group;  // rows are whole groups, so tile i starts at i * group
      float c;
      if (symmetric) {
        float absmax = 0.f;
        bool nan = false;
        for (int64_t j = 0; j < group; ++j) {
          absmax = std::max(absmax, std::fabs(v[j]));
          nan |= std::isnan(v[j]);
        }
        if (nan) absmax = NAN;  // as torch's amax; std::max would skip it
        const c10::Half s = round_f16(absmax / qmax, true);
        const float sf = static_cast<float>(s);
        const float safe = sf > 0.f ? sf : 1.f;
        sp[i] = s;
        for (int64_t j = 0; j < group; ++j) {
          c = std::nearbyint(v[j] / safe);
          c = std::min(std::max(c, -qmax), qmax) + offset;
          q[j] = std::isnan(c) ? 0 : static_cast<uint8_t>(c);
        }
      } else {
        float lo = v[0], hi = v[0];
        bool nan = false;
        for (int64_t j = 0; j < group; ++j) {
          lo = std::min(lo, v[j]);
          hi = std::max(hi, v[j]);
          nan |= std::isnan(v[j]);
        }
        if (nan) lo = hi = NAN;
        const c10::Half z = round_f16(lo, false);
        const float zf = static_cast<float>(z);
        const c10::Half s = round_f16((hi - zf) / levels, true);
        const float sf = static_cast<float>(s);
        const float safe = sf > 0.f ? sf : 1.f;
        sp[i] = s;
        zp[i] = z;
        for (int64_t j = 0; j < group; ++j) {
          c = std::nearbyint((v[j] - zf) / safe);
          q[j] = std::isnan(c) ? 0 : static_cast<uint8_t>(std::min(std::max(c, 0.f), levels));
        }
      }
      uint8_t* out = cp + i * (group / per);
      for (int64_t b = 0; b < group / per; ++b) {
        uint8_t byte = 0;
        for (int64_t f = 0; f < per; ++f)
          byte |= static_cast<uint8_t>(q[b * per + f] << (f * bits));
        out[b] = byte;
      }
    }
  });
  return {codes, scale, zero};
}
